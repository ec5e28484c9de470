"""Built-in prompt makers: ``template`` (no model) and ``agent`` (an LLM via the PromptAgent)."""
from __future__ import annotations

from genval_aug.build.registry import register_prompt_maker
from genval_aug.errors import ConfigError

__all__ = ["TemplatePrompts"]


class TemplatePrompts:
    """Fills ``{name}``, ``{definition}`` and ``{synonym}`` into templates, cycling over synonyms."""

    name = "template"

    def __init__(self, templates: tuple[str, ...] | list[str]):
        self.templates = tuple(templates)

    def prompts(self, cls, n: int) -> list[str]:
        names = [s.replace("_", " ") for s in (cls.synonyms or (cls.name,))]
        display = cls.name.replace("_", " ")
        definition = cls.definition or display
        out = []
        for i in range(n):
            t = self.templates[i % len(self.templates)]
            syn = names[(i // len(self.templates)) % len(names)]
            out.append(t.format(name=display, definition=definition, synonym=syn).strip())
        return out


def _make_template(spec, config, device=None):  # noqa: ARG001
    return TemplatePrompts(config.prompts.templates)


def _make_agent(spec, config, device=None):
    try:
        from genval_aug.agents import PromptAgent
    except ImportError as e:
        raise ConfigError(f"prompts.kind: 'agent' needs genval_aug.agents: {e}") from e
    from genval_aug.build.validators import make_backend

    params = dict(config.prompts.params)
    if "backend" not in params:
        raise ConfigError("prompts.params.backend: missing (e.g. {kind: openai, model: ..., base_url: ...})")
    backend = make_backend(params.pop("backend"), "prompts.params.backend", device=device)
    agent = PromptAgent(backend, **params)

    class _Adapter:
        name = f"agent:{getattr(backend, 'model', '?')}"

        def prompts(self, cls, n: int) -> list[str]:
            return list(agent.prompts(cls.name.replace("_", " "), n, definition=cls.definition))

        def prompts_many(self, classes, n: int, existing: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
            """All classes in batched chat calls (one request per class per round, sent together). ``existing``:
            prompts a class already has (class name -> prompts); only the missing ones are asked for, and the
            model is told not to repeat those."""
            names = [c.name.replace("_", " ") for c in classes]
            defs = {nm: c.definition for nm, c in zip(names, classes, strict=True) if c.definition}
            have = {nm: list((existing or {}).get(c.name) or []) for nm, c in zip(names, classes, strict=True)}
            results = agent.run_many(names, n, defs or None, existing={k: v for k, v in have.items() if v} or None)
            return {c.name: list(r.prompts) for c, r in zip(classes, results, strict=True)}

    return _Adapter()


register_prompt_maker("template", _make_template)
register_prompt_maker("agent", _make_agent)
