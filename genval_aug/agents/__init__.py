"""LLM prompt agent and VLLM validation agent (Gen-n-Val), with OpenAI-compatible and local backends.

Importing this package does not import transformers or textgrad; the local backends and the
optimizer (:mod:`genval_aug.agents.optimize`) load them when used.
"""
from __future__ import annotations

from genval_aug.agents.backends import (
    CachedBackend,
    ChatBackend,
    OpenAICompatibleBackend,
    ResponseCache,
    load_backend,
)
from genval_aug.agents.categories import CategoryDefinitions
from genval_aug.agents.prompt_agent import PromptAgent, PromptResult
from genval_aug.agents.prompt_files import PromptFile, list_versions, load_prompt
from genval_aug.agents.validation_agent import CRITERIA, ValidationAgent, Verdict, store_verdicts


def __getattr__(name: str):
    if name in ("TransformersChatBackend", "TransformersVisionBackend"):
        from genval_aug.agents.backends import transformers_backends

        return getattr(transformers_backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CRITERIA", "CachedBackend", "CategoryDefinitions", "ChatBackend", "OpenAICompatibleBackend", "PromptAgent",
    "PromptFile", "PromptResult", "ResponseCache", "TransformersChatBackend", "TransformersVisionBackend",
    "ValidationAgent", "Verdict", "list_versions", "load_backend", "load_prompt", "store_verdicts",
]
