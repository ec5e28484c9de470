"""OpenAI-compatible backend against a loopback chat-completions server; response cache; local backends."""
from __future__ import annotations

import base64
import time

import cv2
import httpx
import numpy as np
import pytest
from agents_support import ChatServer, completion_body

from genval_aug.agents.backends import (
    CachedBackend,
    OpenAICompatibleBackend,
    ResponseCache,
    image_part,
    load_backend,
    text_part,
)
from genval_aug.errors import BackendError, ConfigError

USER = [{"role": "user", "content": "hello"}]


def _backend(server, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 5)
    return OpenAICompatibleBackend("test-model", server.base_url, api_key_env=None, **kw)


def test_plain_request_shape_and_params():
    with ChatServer([("ok", "hi there")]) as srv:
        b = _backend(srv, default_params={"temperature": 0.5, "max_tokens": 9})
        assert b.chat(USER, temperature=0.1) == "hi there"
    body = srv.requests[0]
    assert body["model"] == "test-model"
    assert body["stream"] is False
    assert body["messages"] == USER
    assert body["temperature"] == 0.1 and body["max_tokens"] == 9
    assert "authorization" not in {k.lower() for k in srv.headers[0]}


def test_image_content_parts_sent_as_base64_png():
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:15, 10:20] = (255, 0, 0)
    msgs = [{"role": "user", "content": [image_part(img), text_part("what is this?")]}]
    with ChatServer([("ok", "a red square")]) as srv:
        assert _backend(srv).chat(msgs) == "a red square"
    parts = srv.requests[0]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[1] == {"type": "text", "text": "what is this?"}
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    dec = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape == (20, 30, 3)
    assert tuple(dec[10, 15]) == (0, 0, 255)  # BGR of red: the RGB order survived the round trip


def test_429_then_success_honours_retry_after():
    script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"}), ("ok", "done")]
    with ChatServer(script) as srv:
        t = time.perf_counter()
        assert _backend(srv).chat(USER) == "done"
        assert time.perf_counter() - t >= 0.2
    assert len(srv.requests) == 2


def test_500_exhausts_retries_with_clear_error():
    with ChatServer([("status", 500, {"error": {"message": "boom"}})]) as srv:
        with pytest.raises(BackendError, match=r"failed after 3 attempts: HTTP 500: boom"):
            _backend(srv, max_retries=2).chat(USER)
    assert len(srv.requests) == 3


@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_4xx_fails_at_once(code):
    with ChatServer([("status", code, {"error": {"message": "bad request field x"}})]) as srv:
        with pytest.raises(BackendError, match=rf"HTTP {code}: bad request field x"):
            _backend(srv).chat(USER)
    assert len(srv.requests) == 1


def test_401_names_the_env_var_not_the_key(monkeypatch):
    monkeypatch.setenv("MY_TEST_KEY", "sk-secret-123")
    with ChatServer([("status", 401, {"error": {"message": "invalid key"}})]) as srv:
        b = OpenAICompatibleBackend("m", srv.base_url, api_key_env="MY_TEST_KEY", backoff=0.01)
        assert "sk-secret" not in repr(b)
        with pytest.raises(BackendError) as ei:
            b.chat(USER)
    assert "$MY_TEST_KEY" in str(ei.value) and "sk-secret" not in str(ei.value)
    assert srv.headers[0]["Authorization"] == "Bearer sk-secret-123"


def test_timeout_then_success():
    with ChatServer([("sleep", 1.0, "late"), ("ok", "on time")]) as srv:
        assert _backend(srv, timeout=0.3).chat(USER) == "on time"
    assert len(srv.requests) == 2


def test_timeout_every_time_raises():
    with ChatServer([("sleep", 0.6, "late")]) as srv:
        with pytest.raises(BackendError, match="timed out after 0.2 s"):
            _backend(srv, timeout=0.2, max_retries=1).chat(USER)


def test_non_json_body_and_missing_choices():
    with ChatServer([("raw", "<html>proxy error</html>")]) as srv:
        with pytest.raises(BackendError, match="not JSON"):
            _backend(srv).chat(USER)
    with ChatServer([("raw", '{"object": "chat.completion"}')]) as srv:
        with pytest.raises(BackendError, match=r"no choices\[0\]\.message"):
            _backend(srv).chat(USER)


def test_chat_batch_keeps_order_under_concurrency():
    def reply(body):
        time.sleep(0.05)
        return "echo:" + body["messages"][0]["content"]

    batch = [[{"role": "user", "content": str(i)}] for i in range(8)]
    with ChatServer([reply]) as srv:
        t = time.perf_counter()
        out = _backend(srv, concurrency=4).chat_batch(batch)
        elapsed = time.perf_counter() - t
    assert out == [f"echo:{i}" for i in range(8)]
    assert elapsed < 8 * 0.05  # ran in parallel


def test_openai_url_without_key_is_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAICompatibleBackend("gpt-4o")


def test_openai_key_goes_only_to_openai_unless_named(monkeypatch):
    """The default sends $OPENAI_API_KEY only to api.openai.com: a local server named in a YAML gets no key."""
    import argparse

    from genval_aug.cli.agents import add_backend_args, backend_from_args

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-user-key")
    monkeypatch.setenv("LOCAL_TEST_KEY", "local-key")
    with ChatServer([("ok", "x")]) as srv:
        OpenAICompatibleBackend("m", srv.base_url).chat(USER)
        load_backend("openai", "m", base_url=srv.base_url, cache=False).chat(USER)
        ap = argparse.ArgumentParser()
        add_backend_args(ap)
        ap.add_argument("--cache", default=None)
        ap.add_argument("--no-cache", action="store_true")
        backend_from_args(ap.parse_args(["--model", "m", "--base-url", srv.base_url, "--no-cache"])).chat(USER)
        backend_from_args(ap.parse_args(["--model", "m", "--base-url", srv.base_url, "--no-cache",
                                         "--api-key-env", "NONE"])).chat(USER)
        OpenAICompatibleBackend("m", srv.base_url, api_key_env="OPENAI_API_KEY").chat(USER)   # named: sent
        OpenAICompatibleBackend("m", srv.base_url, api_key_env="LOCAL_TEST_KEY").chat(USER)
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for h in srv.headers]
    assert auth == [None, None, None, None, "Bearer sk-openai-user-key", "Bearer local-key"]

    seen = []

    def handler(request):
        seen.append((request.url.host, request.headers.get("authorization")))
        return httpx.Response(200, json=completion_body("ok"))

    b = OpenAICompatibleBackend("gpt-4o", "https://api.openai.com/v1", transport=httpx.MockTransport(handler))
    assert b.chat(USER) == "ok"
    assert seen == [("api.openai.com", "Bearer sk-openai-user-key")]


def test_cache_hits_skip_the_server_and_store_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_CACHE_TEST", "sk-never-on-disk")
    with ChatServer([lambda body: "answer-" + str(body.get("seed"))]) as srv:
        raw = OpenAICompatibleBackend("m", srv.base_url, api_key_env="SECRET_FOR_CACHE_TEST", backoff=0.01)
        cached = CachedBackend(raw, ResponseCache(tmp_path / "c.sqlite"))
        assert cached.chat(USER, seed=1) == "answer-1"
        assert cached.chat(USER, seed=1) == "answer-1"
        assert cached.chat(USER, seed=2) == "answer-2"        # params are part of the key
        out = cached.chat_batch([USER, [{"role": "user", "content": "other"}]], seed=1)
        assert out == ["answer-1", "answer-1"]
    assert len(srv.requests) == 3                             # 2 misses + 1 miss in the batch
    assert cached.cache.hits == 2
    cached.cache.close()
    blob = (tmp_path / "c.sqlite").read_bytes()
    for p in tmp_path.iterdir():
        blob += p.read_bytes()
    assert b"sk-never-on-disk" not in blob


def test_cache_can_be_turned_off(tmp_path):
    with ChatServer([("ok", "x")]) as srv:
        b = CachedBackend(_backend(srv), ResponseCache(tmp_path / "c.sqlite", enabled=False))
        b.chat(USER)
        b.chat(USER)
        b2 = load_backend("openai", "m", base_url=srv.base_url, api_key_env=None, cache=False)
        assert isinstance(b2, OpenAICompatibleBackend)
        b2.chat(USER)
    assert len(srv.requests) == 3
    assert not (tmp_path / "c.sqlite").exists()


def test_empty_replies_are_not_cached(tmp_path):
    # a null/empty content (content filter, reasoning model out of tokens) was cached and replayed forever
    with ChatServer([("ok", ""), ("ok", "   "), ("ok", "real answer")]) as srv:
        b = CachedBackend(_backend(srv), ResponseCache(tmp_path / "c.sqlite"))
        assert [b.chat(USER) for _ in range(4)] == ["", "   ", "real answer", "real answer"]
    assert len(srv.requests) == 3 and len(b.cache) == 1


def test_corrupt_cache_file_is_bypassed_not_fatal(tmp_path, caplog):
    # sqlite3.DatabaseError escaped chat(): the build then marked every batch validator_error
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"not a sqlite database " * 50)
    with ChatServer([("ok", "fresh")]) as srv:
        b = CachedBackend(_backend(srv), ResponseCache(bad))
        assert [b.chat(USER), b.chat(USER)] == ["fresh", "fresh"]
    assert len(srv.requests) == 2 and not b.cache.enabled
    assert "response cache" in caplog.text and "continuing without it" in caplog.text


def test_cache_keys_distinguish_models(tmp_path):
    with ChatServer([lambda body: body["model"]]) as srv:
        c = ResponseCache(tmp_path / "c.sqlite")
        a = CachedBackend(OpenAICompatibleBackend("a", srv.base_url, api_key_env=None), c)
        b = CachedBackend(OpenAICompatibleBackend("b", srv.base_url, api_key_env=None), c)
        assert (a.chat(USER), b.chat(USER), a.chat(USER)) == ("a", "b", "a")
    assert len(srv.requests) == 2 and len(c) == 2


def test_completion_with_content_parts_is_joined():
    body = completion_body("x")
    body["choices"][0]["message"]["content"] = [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]
    import json

    with ChatServer([("raw", json.dumps(body))]) as srv:
        assert _backend(srv).chat(USER) == "abc"


@pytest.mark.parametrize("retry_after", ["nan", "NaN", "inf", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_unusable_retry_after_falls_back_to_backoff(retry_after):
    # "nan" parses as a float and time.sleep(nan) raised ValueError instead of retrying
    script = [("status", 429, {"error": {"message": "slow down"}}, {"Retry-After": retry_after}), ("ok", "done")]
    with ChatServer(script) as srv:
        assert _backend(srv, max_backoff=0.05).chat(USER) == "done"
    assert len(srv.requests) == 2


def test_key_echoed_by_the_server_is_redacted_from_errors_and_logs(monkeypatch, caplog):
    monkeypatch.setenv("MY_TEST_KEY", "sk-secret-echo-42")
    echo = {"error": {"message": "bad header Authorization: Bearer sk-secret-echo-42"}}
    caplog.set_level("DEBUG")
    for script in ([("status", 500, echo)], [("status", 400, echo)], [("raw", "hdr=Bearer sk-secret-echo-42")],
                   [("raw", '{"echo": "sk-secret-echo-42"}')]):
        with ChatServer(script) as srv:
            b = OpenAICompatibleBackend("m", srv.base_url, api_key_env="MY_TEST_KEY", backoff=0.01, max_retries=1)
            with pytest.raises(BackendError) as ei:
                b.chat(USER)
        assert "sk-secret" not in str(ei.value) and "***" in str(ei.value), str(ei.value)
    assert "sk-secret" not in caplog.text and "retry 1/1" in caplog.text


def test_password_in_base_url_stays_out_of_errors_repr_and_logs(caplog):
    # http://user:password@host/v1 (a proxy with basic auth) was shown in errors and repr, and httpx logged it
    caplog.set_level("DEBUG")
    with ChatServer([("status", 500, {"error": {"message": "no"}}), ("ok", "fine")]) as srv:
        url = srv.base_url.replace("http://", "http://bob:pw-s3cret-x@")
        b = OpenAICompatibleBackend("m", url, api_key_env=None, max_retries=1, backoff=0.01)
        assert b.chat(USER) == "fine" and "pw-s3cret" not in repr(b) and "bob:***@" in repr(b)
    assert srv.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"bob:pw-s3cret-x").decode()
    with ChatServer([("status", 500, {"error": {"message": "echo http://bob:pw-s3cret-x@x"}})]) as srv:
        url = srv.base_url.replace("http://", "http://bob:pw-s3cret-x@")
        with pytest.raises(BackendError) as ei:
            OpenAICompatibleBackend("m", url, api_key_env=None, max_retries=1, backoff=0.01).chat(USER)
    assert "pw-s3cret" not in str(ei.value) and "bob:***@" in str(ei.value)
    assert "pw-s3cret" not in caplog.text and "HTTP Request" in caplog.text


def test_trickling_body_times_out_as_a_whole():
    # each chunk arrives well within the read timeout, but the whole body takes far longer than `timeout`
    def slow_body():
        data = httpx.Response(200, json=completion_body("slow")).content
        for i in range(0, len(data), 8):
            time.sleep(0.05)
            yield data[i:i + 8]

    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(200, headers={"Content-Type": "application/json"}, content=slow_body())

    b = OpenAICompatibleBackend("m", "http://127.0.0.1:9/v1", api_key_env=None, timeout=0.3, max_retries=1,
                                backoff=0.01, transport=httpx.MockTransport(handler))
    t = time.perf_counter()
    with pytest.raises(BackendError, match=r"model 'm'.*timed out after 0.3 s"):
        b.chat(USER)
    assert time.perf_counter() - t < 3 and len(calls) == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_responses_are_decoded_once(encoding):
    import gzip
    import json
    import zlib

    raw = json.dumps(completion_body("zipped")).encode()
    data = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)

    def handler(request):
        return httpx.Response(200, headers={"Content-Type": "application/json", "Content-Encoding": encoding},
                              content=data)

    b = OpenAICompatibleBackend("m", "http://127.0.0.1:9/v1", api_key_env=None, transport=httpx.MockTransport(handler))
    assert b.chat(USER) == "zipped"


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://host/v1", "http://", "127.0.0.1:8000"])
def test_base_url_without_http_scheme_or_host_is_a_config_error(url):
    # such URLs were sent, failed as "connection failed: unsupported protocol" and were retried with backoff
    with pytest.raises(ConfigError, match="base_url must be an http:// or https:// URL"):
        OpenAICompatibleBackend("m", url, api_key_env=None)


def test_corrupt_compressed_body_is_a_backend_error():
    # httpx.DecodingError is not a TransportError: it escaped chat() as a bare httpx exception
    def handler(request):
        return httpx.Response(200, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                              content=b"not gzip at all")

    b = OpenAICompatibleBackend("m", "http://127.0.0.1:9/v1", api_key_env=None, max_retries=1, backoff=0.01,
                                transport=httpx.MockTransport(handler))
    with pytest.raises(BackendError, match=r"model 'm'.*failed after 2 attempts: undecodable response body"):
        b.chat(USER)


def test_endless_body_is_cut_at_max_response_bytes_not_buffered():
    # an endless body arriving fast was buffered whole: a runaway server could exhaust the build's memory
    sent = []

    def endless():
        while True:
            sent.append(1)
            yield b"x" * 65536

    def handler(request):
        return httpx.Response(200, headers={"Content-Type": "application/json"}, content=endless())

    b = OpenAICompatibleBackend("m", "http://127.0.0.1:9/v1", api_key_env=None, timeout=30, max_retries=3,
                                max_response_bytes=1 << 20, transport=httpx.MockTransport(handler))
    with pytest.raises(BackendError, match=r"model 'm'.*larger than 1048576 bytes"):
        b.chat(USER)
    assert len(sent) <= 17   # read up to the limit, once (the same request would get the same answer)


@pytest.mark.parametrize("code", [301, 307, 308])
def test_redirect_is_reported_not_parsed_as_an_empty_body(code):
    # a redirect (http -> https, a missing /v1) used to surface as "response body is not JSON: ''"
    def handler(request):
        return httpx.Response(code, headers={"Location": "https://llm.example/v1/chat/completions"})

    b = OpenAICompatibleBackend("m", "http://127.0.0.1:9/v1", api_key_env=None, transport=httpx.MockTransport(handler))
    with pytest.raises(BackendError, match=rf"HTTP {code} redirect to https://llm\.example/v1/chat/completions"):
        b.chat(USER)


def test_malformed_2xx_bodies_name_the_model_and_bad_parts_do_not_crash():
    import json

    body = completion_body("x")
    body["choices"][0]["message"]["content"] = [{"type": "text", "text": 5}, "junk", None, {"text": "ok"}]
    with ChatServer([("raw", json.dumps(body))]) as srv:
        assert _backend(srv).chat(USER) == "ok"
    with ChatServer([("raw", '{"error": {"message": "overloaded"}}')]) as srv:
        with pytest.raises(BackendError, match=r"model 'test-model'.*no choices.*overloaded"):
            _backend(srv).chat(USER)


# --- local transformers backends -------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)


def test_transformers_chat_backend_batched_and_reloaded(tmp_path, torch_one_thread):
    from agents_support import tiny_llama

    from genval_aug.agents.backends import TransformersChatBackend

    model, tok = tiny_llama()
    b = TransformersChatBackend(model, tok, max_new_tokens=6, batch_size=2)
    convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": "u" * k}] for k in range(1, 4)]
    out = b.chat_batch(convs)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # batched generation with left padding gives the same greedy answer as one at a time
    assert out[2] == b.chat(convs[2])
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    b2 = TransformersChatBackend.from_pretrained(str(tmp_path / "llm"), device="cpu", dtype="float32",
                                                 local_files_only=True, max_new_tokens=6)
    assert b2.chat(convs[2]) == out[2]
    with pytest.raises(BackendError, match="text-only"):
        b.chat([{"role": "user", "content": [image_part(np.zeros((4, 4, 3), np.uint8))]}])


def test_local_generate_out_of_memory_is_transient(torch_one_thread, monkeypatch):
    """A GPU out-of-memory error in a local model is worth retrying later (the top-up worker shares the GPU with
    training): BackendUnavailableError; other generate() failures stay permanent BackendErrors."""
    import torch
    from agents_support import tiny_llama

    from genval_aug.agents.backends import TransformersChatBackend
    from genval_aug.errors import BackendUnavailableError

    model, tok = tiny_llama()
    b = TransformersChatBackend(model, tok, max_new_tokens=4)
    conv = [{"role": "user", "content": "u"}]

    def oom(**kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "generate", oom)
    with pytest.raises(BackendUnavailableError, match="out of memory"):
        b.chat(conv)

    def broken(**kw):
        raise RuntimeError("shape mismatch in attention")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(BackendError, match="generate\\(\\) failed: shape mismatch") as e:
        b.chat(conv)
    assert not isinstance(e.value, BackendUnavailableError)


def test_transformers_vision_backend_reads_data_url_images(tmp_path, torch_one_thread):
    from agents_support import tiny_qwen25_vl

    from genval_aug.agents.backends import TransformersVisionBackend

    model, proc = tiny_qwen25_vl()
    b = TransformersVisionBackend(model, proc, max_new_tokens=5, batch_size=2)
    rng = np.random.default_rng(0)
    msgs = [[{"role": "system", "content": "judge"},
             {"role": "user", "content": [image_part(rng.integers(0, 255, (48 + 8 * k, 64, 3), dtype=np.uint8)),
                                          text_part("cat?")]}] for k in range(3)]
    out = b.chat_batch(msgs)
    assert len(out) == 3
    model.save_pretrained(tmp_path / "vlm")
    proc.save_pretrained(tmp_path / "vlm")
    b2 = TransformersVisionBackend.from_pretrained(str(tmp_path / "vlm"), device="cpu", local_files_only=True,
                                                   max_new_tokens=5)
    assert b2.chat(msgs[0]) == b.chat(msgs[0])
    with pytest.raises(BackendError, match="data URL"):
        b.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_dtype_is_validated():
    from genval_aug.agents.backends.transformers_backends import _torch_dtype

    with pytest.raises(ConfigError, match="dtype"):
        _torch_dtype("int3")


def test_transformers_backend_refuses_pickle_checkpoints(tmp_path, torch_one_thread):
    """A model folder holding only ``pytorch_model.bin`` (a pickle) is refused with an error naming the folder;
    transformers would otherwise fall back to unpickling it."""
    import torch
    from agents_support import tiny_llama

    from genval_aug.agents.backends import TransformersChatBackend

    model, tok = tiny_llama()
    d = tmp_path / "llm-bin"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"llm-bin.*safetensors"):
        TransformersChatBackend.from_pretrained(str(d), device="cpu", dtype="float32", local_files_only=True)
