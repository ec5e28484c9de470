"""Plug-in registries for the bank build: instance sources, validators and prompt makers.

A component is named in the YAML config by ``kind``: either a registered name (``"layerdiffusion"``,
``"harvest"``, ``"folder"``, ``"shapes"``; ``"agent"``/``"none"`` validators; ``"template"``/``"agent"``
prompt makers) or an import path ``"package.module:factory"``. Import paths also work inside the
spawned background worker, where registrations made at run time in the parent process do not exist.

A factory is called as ``factory(spec, config, device=...)`` and returns the component::

    from genval_aug.build import register_source

    @register_source("my-renderer")
    def make(spec, config, device=None):
        return MyRenderer(**spec.params)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from genval_aug.errors import ConfigError

if TYPE_CHECKING:
    from genval_aug.build.config import BuildConfig, ClassSpec, ComponentSpec

__all__ = [
    "Candidate",
    "InstanceSource",
    "PromptMaker",
    "Validator",
    "WorkUnit",
    "register_prompt_maker",
    "register_source",
    "register_validator",
    "resolve",
]


@dataclass(frozen=True)
class WorkUnit:
    """One deterministic unit of work: the ``index``-th attempt for ``category``.

    ``seed`` and ``prompt`` are derived from the config seed, the category and the index, so the
    same unit always produces the same instance (and therefore the same content-hash record id).
    ``name`` is the unit's stable identity for sources with named units (``unit_names``, e.g. a file
    name); the pipeline numbers those by first appearance, so ``index`` never changes meaning.
    """

    category: str
    index: int
    seed: int
    prompt: str | None = None
    prompt_index: int | None = None
    name: str | None = None

    @property
    def key(self) -> str:
        return f"{self.category}/{self.index}" + (f" ({self.name})" if self.name is not None else "")


@dataclass
class Candidate:
    """What a source made of a unit: an RGBA instance plus provenance, or an error."""

    unit: WorkUnit
    rgba: np.ndarray | None
    source: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@runtime_checkable
class InstanceSource(Protocol):
    """Makes instances for work units (a generator, a dataset harvester, a folder, ...)."""

    name: str
    needs_prompts: bool

    def capacity(self, cls: ClassSpec) -> int | None:
        """Number of units this source can make for a class; None = unlimited (generators).

        Optional hooks the pipeline uses when a source has them:

        - ``unit_names(cls) -> list[str]``: stable names of the units a finite source holds (file names).
          Unit indices are then assigned by first appearance and stored in the bank (status
          ``units:<build>:<category>``), so items added later in any sort position get new indices and
          a top-up imports exactly them; ``WorkUnit.name`` carries the name and the capacity is the
          length of that numbering. ``unit_name_of(category, source_meta)`` maps the provenance of a
          record built before the numbering existed back to its name (old banks).
        - ``prepare(classes)``: called with the classes about to be built, before ``capacity``
          (a harvest source cuts out only those classes).
        """

    def produce(self, units: list[WorkUnit]) -> list[Candidate]:
        """One candidate per unit, in order. Must be deterministic per unit."""


@runtime_checkable
class Validator(Protocol):
    name: str

    def validate(self, rgbas: list[np.ndarray], categories: list[str]) -> list[Any]:
        """One verdict per instance: an object with ``keep`` and ``to_dict()`` or a dict with ``keep``."""


@runtime_checkable
class PromptMaker(Protocol):
    name: str

    def prompts(self, cls: ClassSpec, n: int) -> list[str]:
        """``n`` prompts for a class."""


Factory = Callable[..., Any]
_REGISTRIES: dict[str, dict[str, Factory]] = {"source": {}, "validator": {}, "prompts": {}}
# built-ins live in these modules and are imported on first lookup (keeps `import genval_aug.build` light)
_BUILTIN_MODULES = {
    "source": "genval_aug.build.sources",
    "validator": "genval_aug.build.validators",
    "prompts": "genval_aug.build.prompts",
}


def _register(table: str, name: str, factory: Factory | None = None):
    def deco(f: Factory) -> Factory:
        _REGISTRIES[table][name] = f
        return f

    return deco(factory) if factory is not None else deco


def register_source(name: str, factory: Factory | None = None):
    """Register an instance-source factory under ``name`` (usable as a decorator)."""
    return _register("source", name, factory)


def register_validator(name: str, factory: Factory | None = None):
    return _register("validator", name, factory)


def register_prompt_maker(name: str, factory: Factory | None = None):
    return _register("prompts", name, factory)


def registered(table: str) -> list[str]:
    importlib.import_module(_BUILTIN_MODULES[table])
    return sorted(_REGISTRIES[table])


def resolve(table: str, kind: str, field_name: str) -> Factory:
    """Find a factory by registered name or ``module:attr`` import path; errors name the config field."""
    if ":" in kind:
        mod_name, _, attr = kind.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError(f"{field_name}: cannot import {mod_name!r} for kind {kind!r}: {e}") from e
        try:
            return getattr(mod, attr)
        except AttributeError as e:
            raise ConfigError(f"{field_name}: module {mod_name!r} has no attribute {attr!r}") from e
    importlib.import_module(_BUILTIN_MODULES[table])
    try:
        return _REGISTRIES[table][kind]
    except KeyError:
        raise ConfigError(
            f"{field_name}: unknown kind {kind!r} (registered: {', '.join(sorted(_REGISTRIES[table]))}; "
            "or give 'module:factory')"
        ) from None


def build_component(table: str, spec: ComponentSpec, config: BuildConfig, field_name: str,
                    device: str | None = None):
    where = f"{config.path}: " if getattr(config, "path", None) else ""
    try:
        factory = resolve(table, spec.kind, f"{field_name}.kind")
        try:
            return factory(spec, config, device=device)
        except TypeError as e:
            raise ConfigError(f"{field_name}.params: {spec.kind!r} rejected its parameters: {e}") from e
    except ConfigError as e:  # name the file, like the errors of load_config
        if not where or str(e).startswith(where):
            raise
        raise ConfigError(f"{where}{e}") from e
