"""Chat backends for the agents: one small interface (:class:`ChatBackend`), several implementations.

``transformers`` is imported only when a local backend is built.
"""
from __future__ import annotations

from typing import Any

from genval_aug.agents.backends.base import (
    ChatBackend,
    ChatReply,
    Message,
    cache_identity,
    decode_image_data_url,
    encode_image_data_url,
    image_part,
    text_part,
)
from genval_aug.agents.backends.cache import CachedBackend, ResponseCache, default_cache_path
from genval_aug.agents.backends.openai_compat import OpenAICompatibleBackend
from genval_aug.errors import ConfigError

BACKEND_KINDS = ("openai", "transformers", "transformers-vision")


def __getattr__(name: str):
    if name in ("TransformersChatBackend", "TransformersVisionBackend"):
        from genval_aug.agents.backends import transformers_backends

        return getattr(transformers_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_backend(kind: str, model: str, *, base_url: str | None = None, api_key_env: str | None = "auto",
                 device: str | None = None, dtype: str = "auto", cache: bool | str = True,
                 **kwargs: Any) -> ChatBackend:
    """Build a backend by kind: ``openai`` (any OpenAI-compatible server), ``transformers`` (text LLM)
    or ``transformers-vision`` (VLLM). ``cache``: True = default response cache, a path = that cache,
    False = no cache. ``api_key_env="auto"`` sends ``$OPENAI_API_KEY`` to api.openai.com only; name a
    variable to send a key to another server."""
    if kind == "openai":
        backend: Any = OpenAICompatibleBackend(model, base_url, api_key_env=api_key_env, **kwargs)
    elif kind == "transformers":
        from genval_aug.agents.backends.transformers_backends import TransformersChatBackend

        backend = TransformersChatBackend.from_pretrained(model, device=device, dtype=dtype, **kwargs)
    elif kind == "transformers-vision":
        from genval_aug.agents.backends.transformers_backends import TransformersVisionBackend

        backend = TransformersVisionBackend.from_pretrained(model, device=device, dtype=dtype, **kwargs)
    else:
        raise ConfigError(f"backend kind must be one of {BACKEND_KINDS}, got {kind!r}")
    if cache is False or cache is None:
        return backend
    return CachedBackend(backend, None if cache is True else ResponseCache(cache))


__all__ = [
    "BACKEND_KINDS", "CachedBackend", "ChatBackend", "ChatReply", "Message", "OpenAICompatibleBackend", "ResponseCache",
    "TransformersChatBackend", "TransformersVisionBackend", "cache_identity", "decode_image_data_url",
    "default_cache_path", "encode_image_data_url", "image_part", "load_backend", "text_part",
]
