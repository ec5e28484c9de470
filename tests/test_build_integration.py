"""The bank build on the real components: tiny random Layer Diffusion, the prompt agent and the VLLM
validation agent over a loopback OpenAI-compatible server (issue 9)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from agents_support import ChatServer, tiny_clip_tokenizer, verdict_json  # noqa: E402

from genval_aug.bank import InstanceBank, verify  # noqa: E402
from genval_aug.build import BankBuilder, load_config  # noqa: E402
from genval_aug.errors import ConfigError  # noqa: E402

ADJ = ["red", "wooden", "small", "shiny", "striped", "old"]


def chat(body):
    """Prompt agent: prompts naming the object; validator: kites fail `single_object`, the rest pass."""
    user = body["messages"][-1]["content"]
    if isinstance(user, list):                                   # the validator sends an image
        text = " ".join(p.get("text", "") for p in user if p.get("type") == "text")
        return verdict_json(fail=("single_object",)) if "Named category: kite" in text else verdict_json(confidence=0.8)
    name = re.search(r"An image of a single ([a-z ]+)", user).group(1)
    return '{"prompts": [' + ", ".join(f'"a {a} {name}, isolated on a plain background"' for a in ADJ[:3]) + "]}"


@pytest.mark.slow
def test_build_with_tiny_layerdiffusion_and_agents_over_loopback(tmp_path):
    torch.set_num_threads(1)
    tok = tmp_path / "clip-tok"
    tiny_clip_tokenizer().save_pretrained(str(tok))
    with ChatServer([chat]) as srv:
        backend = {"kind": "openai", "base_url": srv.base_url, "api_key_env": None, "cache": False}
        cfg = {
            "name": "ld", "seed": 1, "output": {"bank": "bank.lmdb"},
            "classes": {"names": [{"name": "mug", "def": "a cup with a handle"}, {"name": "kite"}], "target": 3},
            "prompts": {"kind": "agent", "n": 3, "params": {"backend": {**backend, "model": "llm"}, "tokenizer": str(tok)}},
            "source": {"kind": "genval_build_testplugins:make_tiny_layerdiffusion", "batch_size": 2,
                       "params": {"negative_prompt": "blurry"}},
            "validator": {"kind": "agent", "batch_size": 4, "params": {"backend": {**backend, "model": "vlm"}}},
            "prefilter": None,
            "pipeline": {"progress": False, "max_attempts_factor": 2},
        }
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
        r = BankBuilder(load_config(tmp_path / "b.yaml")).run()
        n_requests = len(srv.requests)
    bank = InstanceBank(tmp_path / "bank.lmdb")
    assert bank.categories() == {"mug": 3}                     # the VLLM rejected every kite
    assert r.gave_up == ["kite"] and r.rejected["validator:single_object"] == 6
    metas = list(bank.iter_meta("mug"))
    for m in metas:
        assert m["source"]["kind"] == "layerdiffusion" and m["source"]["negative_prompt"] == "blurry"
        assert m["source"]["prompt"].startswith("a ") and "mug" in m["source"]["prompt"]
        assert m["verdict"]["keep"] and m["verdict"]["model"] == "vlm" and m["score"] == pytest.approx(0.8)
    assert [m["source"]["prompt"] for m in metas] == bank.get_status("prompts:ld:mug")["prompts"]
    rejected = [m for m, _ in bank.rejected()]
    assert len(rejected) == 6 and all(m["category"] == "kite" for m in rejected)
    assert verify(tmp_path / "bank.lmdb").ok
    assert n_requests >= 2 + 3                                  # 2 prompt requests, >= 1 judge call per batch


def test_layerdiffusion_factory_passes_config_through(tmp_path, monkeypatch):
    from genval_aug.build.registry import build_component
    from genval_aug.generation.pipeline import LayerDiffusionGenerator

    seen = {}

    def fake_from_pretrained(base_model, **kw):
        seen.update(kw, base_model=base_model)
        return "generator"

    monkeypatch.setattr(LayerDiffusionGenerator, "from_pretrained", staticmethod(fake_from_pretrained))
    cfg = load_config(_write(tmp_path, {"kind": "layerdiffusion", "batch_size": 6, "params": {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0", "dtype": "float16", "num_inference_steps": 20,
        "negative_prompt": "text"}}))
    src = build_component("source", cfg.source, cfg, "source", device="cuda:3")
    assert seen == {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "dtype": "float16",
                    "num_inference_steps": 20, "device": "cuda:3", "batch_size": 6}
    assert src.generator == "generator" and src.negative_prompt == "text" and src.needs_prompts


def _write(tmp_path, source):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"output": {"bank": "b.lmdb"}, "source": source,
                                 "classes": {"names": ["mug"], "target": 1}}))
    return p


def test_prompt_agent_config_error_stops_the_build_instead_of_giving_every_class_up(tmp_path):
    """A missing CLIP tokenizer is a configuration error of the whole build, not a per-class prompt failure:
    it used to be logged once per class and end in a 'successful' build where every class gave up."""
    with ChatServer([chat]) as srv:
        backend = {"kind": "openai", "base_url": srv.base_url, "api_key_env": None, "cache": False, "model": "llm"}
        cfg = {
            "name": "ld", "output": {"bank": "bank.lmdb"},
            "classes": {"names": ["mug", "kite"], "target": 2},
            "prompts": {"kind": "agent", "n": 2,
                        "params": {"backend": backend, "tokenizer": str(tmp_path / "no-such-tokenizer")}},
            "source": {"kind": "genval_build_testplugins:make_tiny_generator", "params": {"size": 48}},
            "validator": "none", "pipeline": {"progress": False},
        }
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError, match="no-such-tokenizer"):
            BankBuilder(load_config(tmp_path / "b.yaml")).run()
    assert not (tmp_path / "bank.lmdb" / "data.mdb").exists() or not InstanceBank(tmp_path / "bank.lmdb").categories()


def test_unparseable_judge_replies_are_counted_as_invalid_and_never_kept(tmp_path):
    """Garbage, a string keep and keep contradicting a failed criterion from the VLLM are audited rejects
    counted as `validator:invalid` (they used to be lumped into an anonymous `validator:rejected`)."""
    import itertools

    bad = ["garbage", '{"keep": "yes"}', verdict_json(keep=True, fail=("intact",)), ""]
    n = itertools.count()

    def judge(body):   # the first batch of 4 gets bad replies, also on the agent's retry; then good ones
        i = next(n)
        return bad[i % len(bad)] if i < 8 else verdict_json()

    with ChatServer([judge]) as srv:
        backend = {"kind": "openai", "base_url": srv.base_url, "api_key_env": None, "cache": False, "model": "vlm",
                   "max_retries": 0, "concurrency": 1}
        cfg = {"name": "inv", "output": {"bank": "bank.lmdb"}, "classes": {"names": ["mug"], "target": 4},
               "source": {"kind": "shapes", "batch_size": 4, "params": {"size": 48, "bad_fraction": 0.0}},
               "validator": {"kind": "agent", "batch_size": 4,
                             "params": {"backend": backend, "prompt_version": None}},
               "prefilter": None, "pipeline": {"progress": False}}
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
        r = BankBuilder(load_config(tmp_path / "b.yaml")).run()
    bank = InstanceBank(tmp_path / "bank.lmdb")
    assert bank.categories() == {"mug": 4} and all(m["verdict"]["status"] == "judged" for m in bank.iter_meta())
    rejected = [m for m, _ in bank.rejected()]
    assert r.rejected["validator:invalid"] == len(rejected) == 4 and "validator:rejected" not in r.rejected
    assert all(m["verdict"]["status"] == "invalid" and m["verdict"]["reasons"]["error"] for m in rejected)
