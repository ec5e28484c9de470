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
