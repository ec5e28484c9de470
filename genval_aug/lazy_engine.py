"""A paste engine built lazily once per process: what the framework adapters hold.

Adapters (torchvision, albumentations) keep a :class:`LazyPasteEngine`; it stores only picklable things
(the bank object or path, the config, the class map) and builds :class:`genval_aug.paste.PasteEngine`
on first use in each process, so a DataLoader worker started by fork or spawn opens the bank itself.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from genval_aug.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["LazyPasteEngine", "make_config", "open_source", "dataloader_worker_id"]


def dataloader_worker_id() -> int | None:
    """The torch DataLoader worker id of this process, or None outside a worker (torch is never imported here)."""
    data = sys.modules.get("torch.utils.data")
    if data is None:
        return None
    info = data.get_worker_info()
    return None if info is None else int(info.id)


def make_config(config: Any = None, options: Mapping[str, Any] | None = None):
    """A ``PasteConfig`` from None / a mapping / a PasteConfig, with ``options`` overriding its fields."""
    from genval_aug.paste import PasteConfig

    options = dict(options or {})
    if config is None:
        config = {}
    try:
        if isinstance(config, PasteConfig):
            return dataclasses.replace(config, **options) if options else config
        if isinstance(config, Mapping):
            return PasteConfig(**{**dict(config), **options})
    except TypeError as e:  # unknown field name
        fields = sorted(f.name for f in dataclasses.fields(PasteConfig))
        raise ConfigError(f"paste options: {e}; PasteConfig fields are {fields}") from None
    raise ConfigError(f"config must be a PasteConfig, a mapping or None, got {type(config).__name__}")


def open_source(bank: Any, cache_mb: float = 0):
    """The engine's reader: a path opens an ``InstanceBank`` (a ``CachedInstanceBank`` when ``cache_mb`` > 0,
    which also wraps a plain ``InstanceBank``); a sampler or custom bank object is returned as is."""
    from genval_aug.bank.cache import with_cache

    if isinstance(bank, (str, os.PathLike)) or hasattr(bank, "random_instance") or hasattr(bank, "sample"):
        return with_cache(Path(bank) if isinstance(bank, (str, os.PathLike)) else bank, cache_mb)
    raise ConfigError(f"bank must be a bank path, an InstanceBank or a BankSampler, got {type(bank).__name__}")


class LazyPasteEngine:
    """Picklable holder of (source, config, class_map); ``.engine`` is a PasteEngine built per process.

    ``cache_mb``: per-process LRU of decoded instances (``genval_aug.bank.CachedInstanceBank``) when the bank
    is a path or a plain ``InstanceBank``; 0 turns it off. Samplers and custom banks are used as given.
    """

    def __init__(self, bank: Any, config: Any = None, class_map: Mapping[str, Any] | Callable | None = None,
                 *, cache_mb: float | None = None, **options: Any) -> None:
        from genval_aug.bank.cache import DEFAULT_CACHE_MB

        self.cache_mb = DEFAULT_CACHE_MB if cache_mb is None else float(cache_mb)
        self.source = open_source(bank, self.cache_mb)
        self.config = make_config(config, options)
        if class_map is not None and not callable(class_map):
            if not isinstance(class_map, Mapping) or not class_map:
                raise ConfigError("class_map must be a non-empty {bank category: dataset label} mapping, "
                                  "a callable or None")
            class_map = dict(class_map)
        self.class_map = class_map
        self._engine = None
        self._pid: int | None = None

    @property
    def engine(self):
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            from genval_aug.paste import PasteEngine

            self._engine = PasteEngine(self.source, config=self._effective_config(), class_map=self.class_map)
            self._pid = pid
            logger.debug("built PasteEngine in process %d", pid)
        return self._engine

    def _effective_config(self):
        """With a dict class_map and a bank source, sample only the mapped categories (checked against the bank)."""
        cfg = self.config
        if hasattr(self.source, "sample") or not hasattr(self.source, "categories"):
            return cfg  # a sampler: the caller controls what it draws
        name = getattr(self.source, "path", "the bank")
        cats = self.source.categories()
        if not cats:
            logger.warning("%s is empty: nothing will be pasted until instances are added", name)
        if not isinstance(self.class_map, Mapping):
            return cfg
        present = [c for c in self.class_map if cats.get(c, 0) > 0]
        if cats and not present:
            raise ConfigError(f"{name}: none of the class_map categories {sorted(self.class_map)} is in the bank "
                              f"(it has {sorted(cats)})")
        missing = sorted(set(self.class_map) - set(present))
        if missing and cats:
            logger.info("class_map categories absent from %s (not pasted): %s", name, missing)
        if cfg.sampler_classes is None:
            cfg = dataclasses.replace(cfg, sampler_classes=sorted(self.class_map))
        return cfg

    def __call__(self, image, targets, rng, channel_order: str = "rgb"):
        return self.engine(image, targets, rng, channel_order=channel_order)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        src = getattr(self.source, "path", self.source)
        return f"LazyPasteEngine(source={src!r}, config={self.config!r}, class_map={self.class_map!r})"
