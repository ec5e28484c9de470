"""Built-in validators: ``none`` (keep every pre-filtered instance) and ``agent`` (a VLM judge)."""
from __future__ import annotations

from typing import Any

import numpy as np

from genval_aug.build.registry import register_validator
from genval_aug.errors import ConfigError

__all__ = ["KeepAll", "make_backend"]


class KeepAll:
    """Accepts everything that passed the pre-filters (for harvest/folder builds or smoke tests)."""

    name = "none"

    def validate(self, rgbas: list[np.ndarray], categories: list[str]) -> list[dict[str, Any]]:  # noqa: ARG002
        return [{"keep": True, "score": 1.0, "criteria": {}, "reasons": {}, "model": "none",
                 "prompt_version": None} for _ in rgbas]


@register_validator("none")
def _none(spec, config, device=None):  # noqa: ARG001
    return KeepAll()


def make_backend(params: dict[str, Any], field: str, device: str | None = None):
    """Build a ``ChatBackend`` from ``{kind: openai|transformers|transformers-vision, model: ..., ...}``
    with :func:`genval_aug.agents.backends.load_backend` (API keys come from the environment only)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{field}: expected a mapping such as {{kind: openai, model: ..., base_url: ...}}, "
                          f"got {params!r:.60}")
    params = dict(params)
    kind = params.pop("kind", "openai")
    try:
        from genval_aug.agents.backends import load_backend
    except ImportError as e:
        raise ConfigError(f"{field}: the agents module is not available: {e}") from e
    if "model" not in params:
        raise ConfigError(f"{field}.model: missing")
    if kind != "openai" and device is not None:
        params.setdefault("device", device)
    try:
        return load_backend(kind, params.pop("model"), **params)
    except ConfigError as e:
        raise ConfigError(f"{field}: {e}") from e
    except (TypeError, ValueError) as e:   # an unknown keyword, or e.g. timeout: "fast"
        raise ConfigError(f"{field}: backend {kind!r} rejected its parameters: {e}") from e


class _AgentValidator:
    """Adapts ``ValidationAgent`` to the build's validator protocol, passing class definitions."""

    def __init__(self, agent: Any, definitions: dict[str, str | None]):
        self.agent = agent
        self.definitions = definitions
        self.name = f"agent:{getattr(agent.backend, 'model', '?')}"

    def validate(self, rgbas: list[np.ndarray], categories: list[str]) -> list[Any]:
        names = [c.replace("_", " ") for c in categories]
        return self.agent.validate(rgbas, names, definitions=[self.definitions.get(c) for c in categories])


@register_validator("agent")
def _agent(spec, config, device=None):
    try:
        from genval_aug.agents import ValidationAgent
    except ImportError as e:
        raise ConfigError(f"validator.kind: 'agent' needs genval_aug.agents: {e}") from e
    params = dict(spec.params)
    if "backend" not in params:
        raise ConfigError("validator.params.backend: missing (e.g. {kind: openai, model: ..., base_url: ...})")
    backend = make_backend(params.pop("backend"), "validator.params.backend", device=device)
    kwargs: dict[str, Any] = {}
    if "prompt_version" in params:
        kwargs["prompt_version"] = params.pop("prompt_version")
    if "params" in params:   # generation parameters of the judge requests, e.g. {max_tokens: 2048}
        gen = params.pop("params")
        if not isinstance(gen, dict):
            raise ConfigError(f"validator.params.params: expected a mapping such as {{max_tokens: 2048}}, got {gen!r:.60}")
        kwargs["params"] = dict(gen)
    from genval_aug.quality import QualityRules

    # the agent re-checks the pipeline's pre-filter rules (cheap); `prefilter: null` turns both off
    kwargs["rules"] = (QualityRules(**config.prefilter) if config.prefilter is not None else
                       QualityRules(min_area=None, min_side=None, coverage=None, min_largest_fraction=None,
                                    max_aspect=None))
    if params:
        raise ConfigError(f"validator.params.{sorted(params)[0]}: unknown field (allowed: backend, prompt_version, "
                          f"params)")
    return _AgentValidator(ValidationAgent(backend, **kwargs), {c.name: c.definition for c in config.classes})
