"""Test helpers for the agents: a loopback chat-completions server, scripted backends, tiny random models.

Everything is built in code; nothing touches the network beyond 127.0.0.1.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# --- loopback OpenAI-compatible server ---------------------------------------------------------------


def completion_body(content: str, model: str = "test-model") -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class ChatServer:
    """A chat-completions server on 127.0.0.1 that answers from a script.

    Each request pops the next action (the last one repeats): ``("ok", content)``,
    ``("status", code, body_dict, headers)``, ``("sleep", seconds, content)``, ``("raw", body_text)``,
    or a callable ``request_json -> content`` (or ``-> action``, e.g. a status once the "server" goes down).
    """

    def __init__(self, script: list[Any]):
        self.script = deque(script)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # silence
                pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    action = outer.script.popleft() if len(outer.script) > 1 else outer.script[0]
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if callable(action):
                    action = action(body)
                    if not isinstance(action, tuple):   # the reply text; a tuple is an action as below
                        return self._send(200, completion_body(action, body.get("model", "")))
                kind = action[0]
                if kind == "ok":
                    return self._send(200, completion_body(action[1], body.get("model", "")))
                if kind == "status":
                    return self._send(action[1], action[2], action[3] if len(action) > 3 else None)
                if kind == "sleep":
                    time.sleep(action[1])
                    return self._send(200, completion_body(action[2]))
                if kind == "raw":
                    data = action[1].encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                raise AssertionError(f"bad action {action!r}")

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- scripted in-process backend ----------------------------------------------------------------------


class ScriptedBackend:
    """A deterministic ChatBackend: ``reply(messages, params) -> str``; records every call."""

    def __init__(self, reply, model: str = "scripted"):
        self.reply = reply
        self.model = model
        self.calls: list[tuple[list[dict], dict]] = []

    def chat(self, messages, **params):
        self.calls.append((messages, params))
        return self.reply(messages, params)

    def chat_batch(self, batch, **params):
        return [self.chat(m, **params) for m in batch]


# --- tiny random models (shared/docs/tiny-models.md) --------------------------------------------------


def byte_chars() -> list[str]:
    """GPT-2 bytes-to-unicode: 256 printable stand-ins, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


# transformers 4.x vs 5 (pyproject allows both; CI also runs these tests on the oldest 4.x it allows, see
# `make test-compat`): BPE tokenizers come from genval_aug.generation.tiny.bpe_tokenizer (4.x reads vocab/merges
# from files only, 5 takes them as objects); 4.x VL configs are flat with rope_scaling, 5 nests text_config with
# rope_parameters; the Qwen2.5-VL processor takes a video processor only in newer versions.
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def tiny_clip_tokenizer(max_length: int = 77):
    """Byte-level CLIPTokenizer: every byte one token (+ ``</w>`` forms), start/end tokens added."""
    from genval_aug.generation.tiny import tiny_clip_tokenizer as tiny

    return tiny(max_length)


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_llama(seed: int = 0):
    """Tiny random LlamaForCausalLM + byte-level tokenizer with a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in byte_chars():
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == 259
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen25_vl(seed: int = 0):
    """Tiny random Qwen2.5-VL with an offline processor (shared/docs/tiny-models.md section 5)."""
    import inspect

    import torch
    import transformers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
    )

    from genval_aug.generation.tiny import bpe_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in byte_chars():
        vocab.setdefault(c, len(vocab))
    tok = bpe_tokenizer(Qwen2Tokenizer, vocab, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=specials[1:])
    assert len(tok) == 263, len(tok)
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    video = {}
    if "video_processor" in inspect.signature(Qwen2_5_VLProcessor.__init__).parameters:  # mandatory in 5
        video["video_processor"] = transformers.Qwen2VLVideoProcessor()
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=VL_TEMPLATE, **video)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if _transformers_major() >= 5:
        text = {"text_config": dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                           "mrope_section": [1, 1, 2]})}
    else:  # 4.x: flat text settings
        text.update(rope_theta=1e4, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    cfg = Qwen2_5_VLConfig(
        **text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), proc


# --- valid replies ------------------------------------------------------------------------------------

CRITERIA = ("single_object", "correct_category", "single_view", "intact", "plain_background")


def verdict_json(fail: tuple[str, ...] = (), keep: bool | None = None, confidence: float | None = 0.9,
                 fence: bool = False) -> str:
    crit = {c: {"pass": c not in fail, "reason": f"{c} looks {'bad' if c in fail else 'fine'}."} for c in CRITERIA}
    obj: dict[str, Any] = {"description": "one object on grey", "criteria": crit,
                           "keep": (not fail) if keep is None else keep}
    if confidence is not None:
        obj["confidence"] = confidence
    s = json.dumps(obj)
    return f"Here you go:\n```json\n{s}\n```" if fence else s
