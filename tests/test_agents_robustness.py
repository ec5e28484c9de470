"""Agents' robustness (agentfix): replies cut at max_tokens are named as such; TextGrad optimization keeps its
progress when a server fails mid-run and never overwrites another run's prompt version."""
from __future__ import annotations

import json

import numpy as np
import pytest
from agents_support import ChatServer, completion_body

from genval_aug.agents import PromptAgent, ValidationAgent
from genval_aug.agents.backends import CachedBackend, ChatReply, OpenAICompatibleBackend, ResponseCache
from genval_aug.errors import AgentOutputError

# ----------------------------------------------------------------------------- 2. finish_reason "length"


def cut_reply(content: str, model: str = "llm") -> tuple[str, str]:
    """A server action: a 200 reply whose generation stopped at the token limit."""
    body = completion_body(content, model)
    body["choices"][0]["finish_reason"] = "length"
    return ("raw", json.dumps(body))


def square() -> np.ndarray:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 40, 40, 255)
    return rgba


def test_prompt_reply_cut_at_max_tokens_is_reported_as_truncated(tmp_path):
    # the agent said only "invalid JSON: Unterminated string", which sent users looking at the prompt, not the limit
    with ChatServer([cut_reply('{"prompts": ["A photo of a single mug, side view", "A photo of a si')]) as srv:
        backend = OpenAICompatibleBackend("qwen-small", srv.base_url, api_key_env=None, backoff=0)
        agent = PromptAgent(backend, max_retries=0, params={"max_tokens": 24})
        with pytest.raises(AgentOutputError) as info:
            agent.prompts("mug", 4)
    msg = str(info.value)
    assert "truncated at max_tokens=24 by model 'qwen-small'" in msg and "raise max_tokens" in msg
    assert "invalid JSON" in msg                       # the parser's own reason is still there
    assert srv.requests[0]["max_tokens"] == 24


def test_validator_reply_cut_at_max_tokens_is_an_invalid_verdict_saying_so(tmp_path):
    with ChatServer([cut_reply('{"description": "a red square", "criteria": {"single_object": {"pa')]) as srv:
        backend = OpenAICompatibleBackend("judge-vlm", srv.base_url, api_key_env=None, backoff=0,
                                          default_params={"max_tokens": 4096})
        cached = CachedBackend(backend, ResponseCache(tmp_path / "c.sqlite"))
        agent = ValidationAgent(cached, max_retries=0)      # agent params (1024) override the backend default
        for _ in range(2):                                  # the cut reply is not cached: same message again
            v = agent.validate_one(square(), "mug")
            assert v.status == "invalid" and not v.keep
            assert "truncated at max_tokens=1024 by model 'judge-vlm'" in v.reasons["error"]
            assert "ValidationAgent(params=" in v.reasons["error"] and "validator.params.params" in v.reasons["error"]
        assert len(srv.requests) == 2 and len(cached.cache) == 0


def test_complete_replies_are_not_called_truncated():
    with ChatServer([("ok", "not json at all")]) as srv:
        backend = OpenAICompatibleBackend("judge-vlm", srv.base_url, api_key_env=None, backoff=0)
        reply = backend.chat([{"role": "user", "content": "hi"}], max_tokens=7)
        assert isinstance(reply, ChatReply) and reply.finish_reason == "stop" and not reply.truncated
        assert reply.max_tokens == 7
        v = ValidationAgent(backend, max_retries=0).validate_one(square(), "mug")
    assert v.status == "invalid" and "truncated" not in v.reasons["error"]


def test_build_config_can_raise_the_judge_max_tokens(tmp_path):
    import yaml

    from genval_aug.build import load_config
    from genval_aug.build.registry import build_component

    backend = {"kind": "openai", "model": "j", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "NONE",
               "cache": False}
    cfg = {"name": "x", "output": {"bank": "b.lmdb"}, "classes": {"names": ["mug"], "target": 1},
           "source": {"kind": "shapes"},
           "validator": {"kind": "agent", "params": {"backend": backend, "params": {"max_tokens": 3000}}}}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "x.yaml")
    v = build_component("validator", c.validator, c, "validator")
    assert v.agent.params["max_tokens"] == 3000


def test_local_transformers_reply_knows_it_was_cut():
    import torch
    from agents_support import tiny_llama

    from genval_aug.agents.backends import TransformersChatBackend

    torch.set_num_threads(1)
    model, tok = tiny_llama()
    llm = TransformersChatBackend(model, tok, max_new_tokens=4)
    reply = llm.chat([{"role": "user", "content": "write JSON"}])
    assert isinstance(reply, ChatReply) and reply.truncated and reply.max_tokens == 4
    with pytest.raises(AgentOutputError, match=r"truncated at max_tokens=4 by model"):
        PromptAgent(llm, max_retries=0, params={"max_tokens": 4}).prompts("mug", 2)


# ----------------------------------------------------------------------------- 5. TextGrad runs that fail


@pytest.fixture(scope="module")
def clip_tok():
    from agents_support import tiny_clip_tokenizer

    return tiny_clip_tokenizer()


def test_server_failing_mid_optimization_keeps_the_best_prompt_and_says_where_it_stopped(tmp_path, clip_tok):
    # the error escaped optimize_prompt_agent and the prompt accepted at step 1 was lost with it
    from agents_support import ScriptedBackend
    from test_agents_optimize import TGD_SYSTEM, Optimizer, prompt_llm

    from genval_aug.agents import load_prompt
    from genval_aug.agents.optimize import OptimizationStopped, optimize_prompt_agent
    from genval_aug.errors import BackendUnavailableError

    opt = Optimizer(["<IMPROVED_VARIABLE>Write one-object prompts, all different. STYLE-GOOD</IMPROVED_VARIABLE>"])

    def optimizer(body):
        if TGD_SYSTEM in body["messages"][0]["content"] and opt.update_prompts:   # step 2's update: down
            return ("status", 503, {"error": {"message": "optimizer overloaded"}})
        return opt.reply(body["messages"], body)

    with ChatServer([optimizer]) as srv:
        backend = OpenAICompatibleBackend("opt-llm", srv.base_url, api_key_env=None, max_retries=0)
        with pytest.raises(OptimizationStopped) as info:
            optimize_prompt_agent(ScriptedBackend(prompt_llm, model="task-llm"), backend, ["dog", "cat", "cup"],
                                  ["apple"], tokenizer=clip_tok, steps=3, batch_size=1, n_prompts=3,
                                  out_dir=tmp_path, prompt_dir=tmp_path)
    err = info.value
    msg = str(err)
    assert "prompt agent optimization stopped at step 2 of 3" in msg and "BackendUnavailableError" in msg
    assert "optimizer overloaded" in msg and "model 'opt-llm'" in msg
    assert f"saved as {tmp_path / 'prompt_agent-v2.yaml'}" in msg and "val 0.800, step 1" in msg
    assert isinstance(err.__cause__, BackendUnavailableError) and err.step == 2
    pf = load_prompt("prompt_agent", "v2", tmp_path)
    assert "STYLE-GOOD" in pf.system and pf.scores["val_after"] == pytest.approx(0.8)
    assert [h["accepted"] for h in pf.history] == [True, False] and pf.history[1]["note"].startswith("failed: ")
    assert "stopped at step 2 of 3" in pf.notes
    assert err.result.prompt_file == pf and err.result.system == pf.system


def test_failure_before_any_improvement_saves_nothing_and_says_so(tmp_path):
    from agents_support import ScriptedBackend
    from test_agents_optimize import TGD_SYSTEM, _labeled_set, judge_vlm

    from genval_aug.agents.evaluation import load_labels
    from genval_aug.agents.optimize import OptimizationStopped, optimize_validation_agent
    from genval_aug.errors import BackendError

    def down(messages, params):
        if TGD_SYSTEM in messages[0]["content"]:
            raise BackendError("POST http://127.0.0.1:9/v1/chat/completions (model 'opt') -> HTTP 401: bad key")
        return "Feedback: be stricter about cats."

    train = load_labels(_labeled_set(tmp_path, name="train.csv"))
    with pytest.raises(OptimizationStopped, match=r"validation agent optimization stopped at step 1 of 2 "
                                                  r"\(BackendError: .*HTTP 401.*no earlier step had improved"):
        optimize_validation_agent(ScriptedBackend(judge_vlm), ScriptedBackend(down, model="opt"), train, train,
                                  steps=2, batch_size=6, out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def _result(agent: str = "prompt_agent"):
    from genval_aug.agents import load_prompt
    from genval_aug.agents.optimize import OptimizationResult

    parent = load_prompt(agent)
    return OptimizationResult(agent, parent, parent.system + " improved", 0.1, 0.2)


def test_saving_never_overwrites_a_version_another_run_wrote(tmp_path, monkeypatch):
    from genval_aug.agents import load_prompt, optimize

    other = _result()
    other.system = "written by the other run"
    first = optimize._save(other, tmp_path, "o", "t", {}, "other")
    assert first.version == "v2"
    with pytest.raises(FileExistsError):
        first.save(tmp_path, exclusive=True)
    # both runs looked for the next free version before either wrote: both saw v2
    monkeypatch.setattr(optimize, "next_version", lambda agent, d: "v2")
    mine = optimize._save(_result(), tmp_path, "o", "t", {}, "mine")
    again = optimize._save(_result(), tmp_path, "o", "t", {}, "mine again")
    assert (mine.version, again.version) == ("v3", "v4")
    assert load_prompt("prompt_agent", "v2", tmp_path).system == "written by the other run"
    assert load_prompt("prompt_agent", "v3", tmp_path).notes == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"prompt_agent-v{i}.yaml" for i in (2, 3, 4)]


def test_concurrent_saves_get_distinct_versions(tmp_path, monkeypatch):
    import threading
    import time

    from genval_aug.agents import list_versions, load_prompt, optimize

    real = optimize.next_version

    def slow_next_version(agent, directory):   # every run looks before any writes: the race, every time
        v = real(agent, directory)
        time.sleep(0.05)
        return v

    monkeypatch.setattr(optimize, "next_version", slow_next_version)
    barrier = threading.Barrier(6)
    got: list[str] = []

    def run(i):
        r = _result("validation_agent")
        r.system = f"prompt of run {i}"
        barrier.wait()
        got.append(optimize._save(r, tmp_path, "o", "t", {}, f"run {i}").version)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(2, 8)]
    systems = {load_prompt("validation_agent", v, tmp_path).system for v in list_versions("validation_agent", tmp_path)
               if v != "v1"}
    assert systems == {f"prompt of run {i}" for i in range(6)}
