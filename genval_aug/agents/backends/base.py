"""The chat backend interface and helpers for OpenAI-style chat messages.

Every backend speaks OpenAI chat-completions messages: ``{"role": ..., "content": str | list[part]}``
where a part is ``{"type": "text", "text": ...}`` or
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from genval_aug.errors import BackendError

Message = dict[str, Any]


class ChatReply(str):
    """The assistant text (a ``str``) plus how generation ended, where the backend knows it.

    ``finish_reason``: ``"stop"``, ``"length"`` (cut at the token limit), ... or None; ``max_tokens``: the limit
    the request had, or None. Plain ``str`` replies (a response cache hit, a plug-in backend) mean "unknown".
    """

    finish_reason: str | None
    max_tokens: int | None

    def __new__(cls, text: str, finish_reason: str | None = None, max_tokens: int | None = None):
        obj = super().__new__(cls, text)
        obj.finish_reason = finish_reason if isinstance(finish_reason, str) else None
        obj.max_tokens = int(max_tokens) if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None
        return obj

    @property
    def truncated(self) -> bool:
        """The model stopped because it reached ``max_tokens``, not because it was done."""
        return self.finish_reason == "length"

    def __reduce__(self):
        return (ChatReply, (str(self), self.finish_reason, self.max_tokens))


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model: OpenAI-compatible server, local transformers LLM or vision-language model."""

    model: str

    def chat(self, messages: list[Message], **params: Any) -> str:
        """One completion for one conversation; returns the assistant text."""

    def chat_batch(self, batch: list[list[Message]], **params: Any) -> list[str]:
        """One completion per conversation, in order."""


def cache_identity(backend: Any) -> dict[str, Any]:
    """What identifies a backend's answers in the response cache (never secrets)."""
    ident = getattr(backend, "cache_identity", None)
    if callable(ident):
        return dict(ident())
    return {"backend": type(backend).__name__, "model": getattr(backend, "model", "?")}


def encode_image_data_url(image: np.ndarray, fmt: str = "png") -> str:
    """Encode an RGB or RGBA uint8 array as a ``data:image/...;base64,`` URL."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected HxWx3/4 uint8 image, got shape {img.shape} dtype {img.dtype}")
    code = cv2.COLOR_RGBA2BGRA if img.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ext = ".jpg" if fmt.lower() in ("jpg", "jpeg") else ".png"
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, code))
    if not ok:  # pragma: no cover - OpenCV failure
        raise ValueError("could not encode image")
    mime = "jpeg" if ext == ".jpg" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def decode_image_data_url(url: str):
    """Decode a base64 data URL into a PIL RGB image (only data URLs: backends never fetch remote images)."""
    from PIL import Image

    if not url.startswith("data:") or ";base64," not in url:
        raise BackendError(f"image_url must be a base64 data URL, got {url[:40]!r}...")
    raw = base64.b64decode(url.split(";base64,", 1)[1], validate=False)
    try:
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several types
        raise BackendError(f"image_url data does not decode as an image: {e}") from e


def image_part(image: np.ndarray) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part for an RGB(A) uint8 array."""
    return {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def iter_parts(message: Message) -> list[dict[str, Any]]:
    """A message's content as a list of parts (a plain string becomes one text part)."""
    content = message.get("content", "")
    if content is None:
        return []
    if isinstance(content, str):
        return [text_part(content)]
    if isinstance(content, list):
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("text", "image_url"):
                raise BackendError(f"unsupported content part in {message.get('role')!r} message: {p!r:.80}")
        return list(content)
    raise BackendError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def message_text(message: Message) -> str:
    """All text parts of a message joined with newlines; raises if the message holds an image."""
    parts = iter_parts(message)
    if any(p["type"] == "image_url" for p in parts):
        raise BackendError("this backend is text-only but a message holds an image part")
    return "\n".join(p["text"] for p in parts)
