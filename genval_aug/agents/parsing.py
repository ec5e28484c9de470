"""Strict JSON extraction from model replies.

Accepted: the whole reply is one JSON object, or the reply holds exactly one fenced code block
(```json ... ```) whose content is one JSON object. A leading ``<think>...</think>`` block (reasoning
models served without a reasoning parser) is dropped first. Nothing is guessed from free text; duplicate
keys, NaN and Infinity are rejected.
"""
from __future__ import annotations

import json
import re
from typing import Any

_THINK = re.compile(r"\A\s*<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)\r?\n?[ \t]*```", re.DOTALL)


class OutputParseError(ValueError):
    """A model reply does not follow the requested JSON format."""


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise OutputParseError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str):
    raise OutputParseError(f"non-standard JSON constant {name}")


def loads_strict(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_dupes, parse_constant=_no_constants)
    except OutputParseError:
        raise
    except ValueError as e:  # JSONDecodeError, and integers longer than sys.get_int_max_str_digits()
        raise OutputParseError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise OutputParseError("JSON nested too deeply") from None


def extract_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model reply (see module doc); raises :class:`OutputParseError`."""
    if not isinstance(text, str):
        raise OutputParseError(f"reply is {type(text).__name__}, not text")
    s = _THINK.sub("", text, count=1).strip()
    if not s:
        raise OutputParseError("empty reply")
    if not s.startswith("{"):
        blocks = _FENCE.findall(s)
        if len(blocks) != 1:
            raise OutputParseError("reply is not a JSON object" if not blocks else "reply holds several code blocks")
        s = blocks[0].strip()
    obj = loads_strict(s)
    if not isinstance(obj, dict):
        raise OutputParseError(f"reply JSON is a {type(obj).__name__}, not an object")
    return obj


def truncation_note(reply: Any, model: str, setting: str = "max_tokens") -> str | None:
    """Why a reply that does not parse is incomplete, when the backend says it was cut at its token limit
    (``finish_reason == "length"``, see :class:`~genval_aug.agents.backends.base.ChatReply`); else None.
    ``setting`` names where the user raises the limit."""
    if getattr(reply, "finish_reason", None) != "length":
        return None
    limit = getattr(reply, "max_tokens", None)
    at = f"max_tokens={limit}" if limit is not None else "its max_tokens"
    more = f" (e.g. {2 * limit})" if limit is not None else ""
    return (f"reply truncated at {at} by model {model!r} (finish_reason 'length'): the JSON is incomplete; "
            f"raise {setting}{more}")


def excerpt(text: Any, n: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 3] + "..."
