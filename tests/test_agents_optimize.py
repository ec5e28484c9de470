"""TextGrad optimization of both agents' system prompts, driven offline by deterministic engines."""
from __future__ import annotations

import csv
import json
import os
import re
import sys

import cv2
import numpy as np
import pytest
from agents_support import ChatServer, ScriptedBackend, tiny_clip_tokenizer, verdict_json

from genval_aug.agents import PromptAgent, PromptFile, ValidationAgent, list_versions, load_prompt
from genval_aug.agents.evaluation import load_labels
from genval_aug.agents.optimize import (
    import_textgrad,
    optimize_prompt_agent,
    optimize_validation_agent,
    textgrad_engine,
)
from genval_aug.errors import ConfigError

TGD_SYSTEM = "optimization system that improves text"


def _user_text(messages):
    c = messages[-1]["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p["type"] == "text")


class Optimizer:
    """Deterministic optimizer/evaluator LLM: scripted TGD proposals, fixed feedback and ratings."""

    def __init__(self, proposals):
        self.proposals = list(proposals)
        self.update_prompts: list[str] = []
        self.backward_prompts: list[str] = []
        self.backend = ScriptedBackend(self.reply, model="deterministic-optimizer")

    def reply(self, messages, params):
        system, user = messages[0]["content"], _user_text(messages)
        if TGD_SYSTEM in system:
            self.update_prompts.append(user)
            return self.proposals.pop(0)
        if user.startswith("Rate this set"):
            return '{"score": 6}'
        self.backward_prompts.append(user)
        return "Feedback: the prompts repeat each other; ask for distinct viewpoints and materials."


def prompt_llm(messages, params):
    """Task LLM whose output quality depends on its system prompt."""
    system, user = messages[0]["content"], _user_text(messages)
    cat = re.search(r"An image of a single ([a-z ]+)", user).group(1).strip()
    k = int(re.search(r"Write (\d+) different prompts", user).group(1))
    if "STYLE-BAD" in system:
        return "Sure! Here are some prompts: cat, dog"
    if "STYLE-GOOD" in system:
        views = ["front view", "side view", "top-down view", "low angle", "close-up", "three-quarter view"]
        return json.dumps({"prompts": [f"Studio photo of a single {cat}, {views[i]}, material {i}" for i in range(k)]})
    return json.dumps({"prompts": [f"Photo of a single {cat}, red", f"Photo of a single {cat}, red!"]})


@pytest.fixture(scope="module")
def clip_tok():
    return tiny_clip_tokenizer()


def test_import_textgrad_has_no_side_effects(tmp_path):
    cwd = os.getcwd()
    saved = {k: os.environ.get(k) for k in ("TEXTGRAD_LOG_DIR", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE")}
    try:
        os.chdir(tmp_path)
        for k in saved:
            os.environ.pop(k, None)
        sys.modules.pop("textgrad", None)
        was_loaded = any(m.startswith("textgrad.") for m in sys.modules)
        tg = import_textgrad()
        assert tg.__version__
        if not was_loaded:
            assert not (tmp_path / "logs").exists()
        for k in saved:
            assert k not in os.environ  # restored: nothing left set in the user's environment
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def test_engine_adapter_call_generate_and_images():
    seen = []
    backend = ScriptedBackend(lambda m, p: (seen.append(m), "answer")[1], model="local-vlm")
    eng = textgrad_engine(backend, temperature=0.0)
    tg = import_textgrad()
    assert isinstance(eng, tg.EngineLM) and eng.model_string == "local-vlm"
    assert eng("hello", system_prompt="sys") == "answer"
    assert seen[0] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    eng.generate([png.tobytes(), "what?"])
    parts = seen[1][1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == "what?"
    # a BlackboxLLM forward pass through the adapter
    out = tg.BlackboxLLM(eng, system_prompt="be brief")(tg.Variable("q", requires_grad=False, role_description="q"))
    assert out.value == "answer"


def test_prompt_agent_optimization_end_to_end(tmp_path, clip_tok):
    tg = import_textgrad()
    user_engine = textgrad_engine(ScriptedBackend(lambda m, p: "x", model="users-own"))
    tg.set_backward_engine(user_engine, override=True)  # a user's global engine must survive untouched
    opt = Optimizer([
        "<IMPROVED_VARIABLE>Write one-object prompts. STYLE-BAD</IMPROVED_VARIABLE>",   # worse on val: reverted
        "<IMPROVED_VARIABLE>Write one-object prompts, all different. STYLE-GOOD</IMPROVED_VARIABLE>",  # accepted
        "I think the prompt is fine as it is.",                                          # no tags: reverted
    ])
    task = ScriptedBackend(prompt_llm, model="task-llm")
    try:
        res = optimize_prompt_agent(task, opt.backend, ["dog", "cat", "cup", "bus"], ["apple", "chair"],
                                    tokenizer=clip_tok, steps=3, batch_size=2, n_prompts=3, out_dir=tmp_path,
                                    prompt_dir=tmp_path)
        assert tg.config.SingletonBackwardEngine().get_engine() is user_engine
    finally:
        tg.config.SingletonBackwardEngine().engine = None
    assert [h.accepted for h in res.history] == [False, True, False]
    assert res.history[0].note.startswith("val 0.")
    assert "no <IMPROVED_VARIABLE> tags" in res.history[2].note
    # start: 1 of 3 prompts usable (duplicate) -> 0.5*(1/3) + 0.5*0.6; after: 3 of 3 -> 0.5 + 0.3
    assert res.val_before == pytest.approx(0.5 / 3 + 0.3)
    assert res.val_after == pytest.approx(0.8)
    assert "STYLE-GOOD" in res.system
    # the loss reached the optimizer: our hard checks and the evaluator's critique are in the backward pass
    assert any("1 of 3 requested prompts usable" in p and "near-duplicates" in p for p in opt.backward_prompts)
    assert any("Feedback: the prompts repeat" in p for p in opt.update_prompts)
    assert all("Do not prescribe an output format" in p for p in opt.update_prompts)
    # a versioned file was written and round-trips
    pf = res.prompt_file
    assert pf is not None and pf.version == "v2" and pf.parent == "v1" and pf.path.parent == tmp_path
    back = PromptFile.load(pf.path)
    assert back == pf
    assert back.optimizer_model == "deterministic-optimizer" and back.task_model == "task-llm"
    assert back.scores["val_after"] == pytest.approx(0.8) and len(back.history) == 3
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", back.created)
    # the agents pick up the new version
    agent = PromptAgent(task, prompt_version="v2", tokenizer=clip_tok, prompt_dir=tmp_path)
    assert agent.prompt_version == "prompt_agent-v2" and "STYLE-GOOD" in agent.system_prompt
    assert len(agent.prompts("dog", 3)) == 3
    assert PromptAgent(task, "latest", clip_tok, prompt_dir=tmp_path).prompt_version == "prompt_agent-v2"
    assert PromptAgent(task, pf.path, clip_tok).prompt_version == "prompt_agent-v2"
    assert PromptAgent(task, None, clip_tok, prompt_dir=tmp_path).prompt_version == "prompt_agent-v1"


def test_no_improvement_writes_nothing(tmp_path, clip_tok):
    opt = Optimizer(["<IMPROVED_VARIABLE>STYLE-BAD</IMPROVED_VARIABLE>"])
    res = optimize_prompt_agent(ScriptedBackend(prompt_llm), opt.backend, ["dog"], ["cat"], tokenizer=clip_tok,
                                steps=1, batch_size=1, n_prompts=3, out_dir=tmp_path)
    assert not res.changed and res.prompt_file is None and list(tmp_path.iterdir()) == []


def test_bad_schedule_and_empty_sets_are_config_errors(tmp_path, clip_tok):
    # batch_size=0 built empty mini-batches and the empty loss list crashed the step with an IndexError
    opt = Optimizer(["<IMPROVED_VARIABLE>x</IMPROVED_VARIABLE>"] * 3)
    task = ScriptedBackend(prompt_llm)
    for kw, pat in (({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"), ({"steps": -1}, "steps")):
        with pytest.raises(ConfigError, match=pat):
            optimize_prompt_agent(task, opt.backend, ["dog"], ["cat"], tokenizer=clip_tok, save=False, **kw)
    with pytest.raises(ConfigError, match="non-empty"):
        optimize_prompt_agent(task, opt.backend, ["dog"], [], tokenizer=clip_tok, save=False)
    labels = load_labels(_labeled_set(tmp_path, 1, 1))
    with pytest.raises(ConfigError, match="batch_size"):
        optimize_validation_agent(ScriptedBackend(judge_vlm), opt.backend, labels, labels, batch_size=0, save=False)
    with pytest.raises(ConfigError, match="non-empty"):
        optimize_validation_agent(ScriptedBackend(judge_vlm), opt.backend, [], labels, save=False)
    assert opt.update_prompts == []


def _labeled_set(root, n_dogs=3, n_cats=3, name="labels.csv"):
    rows = []
    for i in range(n_dogs + n_cats):
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[16:48, 12 + i:44 + i] = (40 * i % 255, 100, 200, 255)
        f = f"{name[:-4]}_{i}.png"
        cv2.imwrite(str(root / f), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        cat = "dog" if i < n_dogs else "cat"
        rows.append([f, cat, int(cat == "dog"), int(cat == "dog")])
    with (root / name).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "category", "keep", "correct_category"])
        w.writerows(rows)
    return root / name


def judge_vlm(messages, params):
    """Task VLLM: keeps everything unless its system prompt tells it about cats (or rejects all)."""
    system, user = messages[0]["content"], _user_text(messages)
    assert messages[1]["content"][0]["type"] == "image_url"
    if "REJECT-ALL" in system:
        return verdict_json(fail=("intact",))
    if "STRICT-CAT" in system and "Named category: cat" in user:
        return verdict_json(fail=("correct_category",))
    return verdict_json()


def test_validator_optimization_end_to_end(tmp_path):
    train = load_labels(_labeled_set(tmp_path, name="train.csv"))
    val = load_labels(_labeled_set(tmp_path, 2, 2, name="val.csv"))
    opt = Optimizer(["<IMPROVED_VARIABLE>Judge carefully. REJECT-ALL</IMPROVED_VARIABLE>",
                     "<IMPROVED_VARIABLE>Judge carefully. STRICT-CAT: cats are not dogs.</IMPROVED_VARIABLE>"])
    task = ScriptedBackend(judge_vlm, model="task-vlm")
    res = optimize_validation_agent(task, opt.backend, train, val, steps=3, batch_size=3, out_dir=tmp_path / "p",
                                    seed=1)
    accepted = [h.accepted for h in res.history]
    assert accepted.count(True) == 1 and res.history[accepted.index(True)].val_score == pytest.approx(1.0)
    reverted = [h for h in res.history if h.val_score is not None and not h.accepted]
    assert reverted and reverted[0].val_score == 0.0
    assert res.metrics_before["precision"] == pytest.approx(0.5) and res.metrics_before["recall"] == 1.0
    assert res.metrics_after["precision"] == 1.0 and res.metrics_after["recall"] == 1.0
    assert "precision before 0.500  after 1.000" in res.summary_table()
    # the misjudged examples are what the optimizer saw
    assert any("WRONG: the agent kept an instance that should be rejected" in p for p in opt.backward_prompts)
    pf = load_prompt("validation_agent", "latest", tmp_path / "p")
    assert pf.version == "v2" and pf.parent == "v1" and "STRICT-CAT" in pf.system
    assert pf.scores["precision_before"] == pytest.approx(0.5) and pf.scores["precision_after"] == 1.0
    agent = ValidationAgent(task, "v2", prompt_dir=tmp_path / "p")
    assert agent.prompt_version == "validation_agent-v2"
    assert [v.keep for v in agent.validate([lab.load_rgba() for lab in val], [lab.category for lab in val])] == \
        [True, True, False, False]


def test_batch_without_mistakes_makes_no_step(tmp_path):
    train = load_labels(_labeled_set(tmp_path, 3, 0, name="train.csv"))
    opt = Optimizer([])
    res = optimize_validation_agent(ScriptedBackend(judge_vlm), opt.backend, train, train, steps=2,
                                    out_dir=tmp_path / "p")
    assert all(h.note.startswith("no misjudged") for h in res.history) and opt.update_prompts == []
    assert res.prompt_file is None


def test_prompt_files_validation(tmp_path):
    (tmp_path / "prompt_agent-v7.yaml").write_text("agent: prompt_agent\nversion: v7\nsystem: hi\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown fields"):
        load_prompt("prompt_agent", "v7", tmp_path)
    (tmp_path / "prompt_agent-v7.yaml").write_text("agent: prompt_agent\nversion: v8\nsystem: hi\n")
    with pytest.raises(ConfigError, match="file name says"):
        load_prompt("prompt_agent", "v7", tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_prompt("validation_agent", "v99", tmp_path)
    assert set(list_versions("validation_agent")) >= {"v1"}


def test_optimize_cli_with_loopback_servers(tmp_path, clip_tok, capsys):
    from genval_aug.cli import main

    clip_tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "train.txt").write_text("dog\ncat  # a comment\n\nbus\n")
    (tmp_path / "val.txt").write_text("apple\n")
    opt = Optimizer(["<IMPROVED_VARIABLE>Be varied. STYLE-GOOD</IMPROVED_VARIABLE>"])

    def task(body):
        return prompt_llm(body["messages"], body)

    def optimizer(body):
        return opt.reply(body["messages"], body)

    with ChatServer([task]) as t, ChatServer([optimizer]) as o:
        rc = main(["agents", "optimize", "--agent", "prompt", "--steps", "1", "--batch-size", "2",
                   "--n-prompts", "3", "--train", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"),
                   "--tokenizer", str(tmp_path / "tok"), "--out-dir", str(tmp_path / "out"),
                   "--model", "task-llm", "--base-url", t.base_url, "--api-key-env", "NO_KEY",
                   "--optimizer-model", "opt-llm", "--optimizer-base-url", o.base_url,
                   "--optimizer-api-key-env", "NO_KEY", "--cache", str(tmp_path / "cache.sqlite")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "step 1: val 0.800 accepted" in out and "best val score 0.800 (start 0.467)" in out
    assert "wrote" in out and "prompt_agent-v2.yaml" in out
    pf = load_prompt("prompt_agent", "v2", tmp_path / "out")
    assert pf.optimizer_model == "opt-llm" and pf.task_model == "task-llm"
    assert all(r["model"] == "task-llm" for r in t.requests)


def test_tiny_random_llm_as_task_and_optimizer(tmp_path, clip_tok):
    """Real local backend end to end: garbage from a random LLM must give a failed (reverted) step, no crash."""
    import torch
    from agents_support import tiny_llama

    from genval_aug.agents.backends import TransformersChatBackend

    torch.set_num_threads(1)
    model, tok = tiny_llama()
    llm = TransformersChatBackend(model, tok, max_new_tokens=12)
    res = optimize_prompt_agent(llm, llm, ["dog"], ["cat"], tokenizer=clip_tok, steps=1, batch_size=1,
                                n_prompts=2, out_dir=tmp_path)
    assert res.val_before == 0.0 and len(res.history) == 1 and not res.history[0].accepted
    assert "IMPROVED_VARIABLE" in res.history[0].note
    assert res.prompt_file is None and not res.changed
