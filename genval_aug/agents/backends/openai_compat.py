"""OpenAI-compatible chat completions over HTTP (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio, ...).

Built on ``httpx``. The API key is read from an environment variable whose *name* is configured; the key
itself lives only in this process' request headers (never in ``repr``, the cache or the bank).
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from genval_aug.agents.backends.base import ChatReply, Message
from genval_aug.errors import BackendError, BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
AUTO_KEY = "auto"              # api_key_env default: $OPENAI_API_KEY for api.openai.com only
NO_KEY = ("", "NONE", "none")  # api_key_env values that send no key (like None)


def resolve_api_key_env(api_key_env: str | None, base_url: str) -> str | None:
    """Name of the variable whose key is sent to ``base_url``: ``"auto"`` means ``OPENAI_API_KEY`` when the
    host is api.openai.com and no key for any other host (a local vLLM/Ollama server never sees the user's
    OpenAI key unless it is named); ``None``, ``""`` or ``"NONE"`` mean no key; any other name is used as is."""
    if api_key_env is None or api_key_env in NO_KEY:
        return None
    if api_key_env == AUTO_KEY:
        return "OPENAI_API_KEY" if (urlsplit(base_url).hostname or "").lower() == OPENAI_HOST else None
    return api_key_env
RETRY_STATUS = frozenset({408, 409, 425, 429})   # plus every 5xx but 501 Not Implemented: see is_transient_status


def is_transient_status(status: int) -> bool:
    """HTTP statuses worth retrying (the server is busy, restarting or behind a failing proxy): 408, 409, 425,
    429 and 5xx except 501. Other 4xx (bad request, key, model name) fail the same way every time."""
    return status in RETRY_STATUS or (500 <= status < 600 and status != 501)


class OpenAICompatibleBackend:
    """Chat completions client with timeouts, retries (429/5xx/timeouts, exponential backoff with jitter,
    ``Retry-After`` honoured), a concurrency limit for :meth:`chat_batch` and clear errors on other 4xx.

    Failures that outlast the retries (connection errors, timeouts, HTTP 408/409/425/429/5xx) raise
    :class:`~genval_aug.errors.BackendUnavailableError` (try again later); anything else (HTTP 400/401/403/404,
    a redirect, an unusable body) raises a plain :class:`~genval_aug.errors.BackendError` (permanent).

    Args:
        model: model name sent in each request.
        base_url: server root including ``/v1``; default ``$OPENAI_BASE_URL`` or OpenAI's.
        api_key_env: name of the environment variable holding the key. ``"auto"`` (default):
            ``OPENAI_API_KEY`` if the host is api.openai.com, else no key; ``None`` or ``"NONE"``: no key.
            A key is required for api.openai.com; optional for local servers.
        timeout: seconds per request (connect, read, write).
        max_retries: retries after the first attempt for retryable failures.
        backoff: first retry delay in seconds (doubles per retry, capped by ``max_backoff``).
        concurrency: parallel requests in ``chat_batch``.
        max_response_bytes: a larger response body is an error (a runaway server must not exhaust memory).
        default_params: sent with every request (e.g. ``{"temperature": 0.7, "max_tokens": 512}``),
            overridden by per-call params.
    """

    def __init__(self, model: str, base_url: str | None = None, *, api_key_env: str | None = AUTO_KEY,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int = 4, default_params: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, transport: httpx.BaseTransport | None = None,
                 max_response_bytes: int = 32 << 20):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        parts = urlsplit(self.base_url)
        self._shown_url = _without_password(self.base_url)  # the URL in messages, repr and logs
        self._url_secret = parts.password or None
        if parts.scheme not in ("http", "https") or not parts.hostname:  # e.g. "localhost:8000/v1": no retries
            raise ConfigError(f"base_url must be an http:// or https:// URL with a host (e.g. "
                              f"http://localhost:8000/v1), got {self._shown_url!r}")
        self.api_key_env = api_key_env = resolve_api_key_env(api_key_env, self.base_url)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if self.max_retries < 0:   # range(0) attempts: every call failed "after 0 attempts" without a request
            raise ConfigError(f"max_retries must be >= 0, got {max_retries!r}")
        if not (self.backoff >= 0 and self.max_backoff >= 0):
            raise ConfigError(f"backoff and max_backoff must be >= 0, got {backoff!r}, {max_backoff!r}")
        self.concurrency = max(1, int(concurrency))
        self.max_response_bytes = int(max_response_bytes)
        self.default_params = dict(default_params or {})
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        key = os.environ.get(api_key_env) if api_key_env else None
        self._secret = key or None  # redacted from every error and log line (a server may echo it back)
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        elif parts.hostname.lower() == OPENAI_HOST:
            raise ConfigError(f"no API key: set the environment variable {api_key_env or 'OPENAI_API_KEY'} "
                              f"to use {self._shown_url}")
        # user:password@ in the URL becomes Basic auth on a URL without it: httpx logs request URLs (INFO)
        client_url, auth = _split_userinfo(self.base_url)
        self._client = httpx.Client(base_url=client_url, headers=hdrs, timeout=self.timeout, transport=transport,
                                    auth=auth)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, base_url={self._shown_url!r}, "
                f"api_key_env={self.api_key_env!r})")

    def cache_identity(self) -> dict[str, Any]:
        return {"backend": "openai-compatible", "base_url": self.base_url, "model": self.model,
                "defaults": self.default_params}

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests -----------------------------------------------------------------------------------
    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            ra = response.headers.get("retry-after")
            if ra:
                try:
                    seconds = float(ra)
                except ValueError:  # an HTTP date: fall back to the backoff
                    seconds = math.nan
                if math.isfinite(seconds):  # "nan" / "inf" parse as floats but time.sleep refuses NaN
                    return min(max(seconds, 0.0), self.max_backoff)
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    def _redact(self, text: str) -> str:
        """``text`` without the API key (servers and proxies sometimes echo request headers) and without a
        password given in the base URL."""
        if self._secret:
            text = text.replace(self._secret, "***")
        if self._shown_url != self.base_url:
            text = text.replace(self.base_url, self._shown_url)
        if self._url_secret and len(self._url_secret) >= 4:
            text = text.replace(self._url_secret, "***")
        return text

    def chat(self, messages: list[Message], **params: Any) -> str:
        body = {**self.default_params, **params, "model": self.model, "messages": messages, "stream": False}
        url = f"{self._shown_url}/chat/completions"
        where = f"POST {url} (model {self.model!r})"
        last = ""
        transient = True    # the last failure was the server being unreachable or busy (not a broken body)
        for attempt in range(self.max_retries + 1):
            response = None
            transient = True
            try:
                response = self._post(body)
            except httpx.TimeoutException as e:
                last = f"timed out after {self.timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                last = self._redact(f"connection failed: {e}")
            except httpx.DecodingError as e:   # a corrupt gzip/deflate body: was a bare httpx error
                last = self._redact(f"undecodable response body: {e}")
                transient = False
            except _TooLarge as e:   # not retried: the same request would get the same answer
                raise BackendError(f"{where}: {e}") from None
            else:
                if 300 <= response.status_code < 400:   # not followed: the key must not go where it was not sent
                    target = self._redact(response.headers.get("location", "?"))
                    raise BackendError(f"{where} -> HTTP {response.status_code} redirect to {target} (not followed; "
                                       f"set base_url to the server's real address, including /v1)")
                if response.status_code < 300:
                    return self._parse(response, where, body)
                detail = self._redact(_error_detail(response))
                if not is_transient_status(response.status_code):
                    hint = ""
                    if response.status_code in (401, 403):
                        hint = f" (check the API key in ${self.api_key_env})" if self.api_key_env else " (no API key sent)"
                    raise BackendError(f"{where} -> HTTP {response.status_code}: {detail}{hint}")
                last = f"HTTP {response.status_code}: {detail}"
            if attempt < self.max_retries:
                delay = self._delay(attempt, response)
                logger.warning("%s %s; retry %d/%d in %.1f s", where, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        error = BackendUnavailableError if transient else BackendError
        raise error(f"{where} failed after {self.max_retries + 1} attempts: {last}")

    def _post(self, body: dict[str, Any]) -> httpx.Response:
        """One request whose whole exchange (not only each read) ends within ``timeout`` seconds: a server
        that trickles its body byte by byte would otherwise hold the build forever."""
        deadline = time.monotonic() + self.timeout
        with self._client.stream("POST", "/chat/completions", json=body) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise _TooLarge(f"response body larger than {self.max_response_bytes} bytes (max_response_bytes); "
                                    f"HTTP {response.status_code}, {response.headers.get('content-type', '?')}")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("response body not complete within the timeout",
                                            request=response.request)
            # the chunks are already decoded: without these headers the body would be gunzipped a second time
            headers = [(k, v) for k, v in response.headers.multi_items()
                       if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
            return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks),
                                  request=response.request)

    def _parse(self, response: httpx.Response, where: str, body: dict[str, Any]) -> ChatReply:
        try:
            data = response.json()
        except ValueError as e:
            raise BackendError(f"{where}: HTTP {response.status_code} response body is not JSON: "
                               f"{self._redact(response.text[:200])!r}") from e
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise BackendError(f"{where}: response has no choices[0].message: "
                               f"{self._redact(str(data)[:200])!r}") from e
        if content is None:
            content = ""
        elif isinstance(content, list):  # some servers return content parts
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        return ChatReply(str(content), choice.get("finish_reason"), limit)

    def chat_batch(self, batch: list[list[Message]], **params: Any) -> list[str]:
        if len(batch) <= 1 or self.concurrency == 1:
            return [self.chat(m, **params) for m in batch]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch))) as pool:
            return list(pool.map(lambda m: self.chat(m, **params), batch))


def _without_password(url: str) -> str:
    """``url`` with the password of a ``user:password@host`` part replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``(url without user:password@, (user, password) or None)``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=host).geturl(), (unquote(parts.username or ""), unquote(parts.password or ""))


class _TooLarge(Exception):
    """A response body over ``max_response_bytes``."""


def _error_detail(response: httpx.Response) -> str:
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    except ValueError:
        return response.text[:300] or response.reason_phrase
