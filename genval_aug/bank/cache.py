"""A per-process LRU of decoded instances in front of an ``InstanceBank`` (repeated draws skip the decode).

Record ids are content hashes and records are never rewritten, so a cached instance never goes stale;
everything else (counts, the category index, new instances from a top-up worker after :meth:`refresh`)
is read from LMDB as by a plain ``InstanceBank``. The cache belongs to one process: a forked child starts
with an empty one (and a fresh lock), and pickling carries only the configuration.
"""
from __future__ import annotations

import os
from typing import Any

from genval_aug.bank.record import Instance
from genval_aug.bank.store import InstanceBank
from genval_aug.lru import ProcessLRU

__all__ = ["CachedInstanceBank", "DEFAULT_CACHE_MB", "with_cache"]

DEFAULT_CACHE_MB = 256.0  # per-process budget of the adapters' decoded-instance cache


def _instance_bytes(inst: Instance) -> int:
    return inst.rgba.nbytes


def _freeze(inst: Instance) -> None:
    inst.rgba.setflags(write=False)


class CachedInstanceBank(InstanceBank):
    """``InstanceBank`` keeping decoded instances in a per-process LRU of ``cache_mb`` megabytes.

    Cached arrays are read-only (one array serves many pastes). Instances larger than the budget are
    decoded every time. ``cache_info()`` reports hits, misses and bytes held in this process.
    """

    def __init__(self, path: str | os.PathLike, *, cache_mb: float = DEFAULT_CACHE_MB, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.cache_bytes = int(cache_mb * (1 << 20))
        self._lru: ProcessLRU[Instance] = ProcessLRU(self.cache_bytes, _instance_bytes)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.cache_bytes = state["cache_bytes"]
        self._lru = ProcessLRU(self.cache_bytes, _instance_bytes)

    def __repr__(self) -> str:
        return f"CachedInstanceBank({self.path!r}, cache_mb={self.cache_bytes / (1 << 20):g})"

    def get(self, record_id: str) -> Instance:
        return self._lru.get_or_create(record_id, lambda: InstanceBank.get(self, record_id), _freeze)

    def cache_info(self) -> dict[str, int]:
        """This process's counters: ``hits``, ``misses``, ``entries``, ``bytes`` and the ``max_bytes`` budget."""
        return self._lru.info()

    def clear_cache(self) -> None:
        """Drop every cached instance of this process."""
        self._lru.clear()


def with_cache(bank: Any, cache_mb: float = DEFAULT_CACHE_MB) -> Any:
    """A reader for the paste engine: with ``cache_mb`` > 0 a bank path or a plain ``InstanceBank`` becomes a
    ``CachedInstanceBank`` (same path and options), else a path opens an ``InstanceBank``; anything else
    (an ``InstanceBank`` without caching, a sampler, a custom bank) is returned as is."""
    if isinstance(bank, (str, os.PathLike)):
        path, kw = bank, {}
    elif type(bank) is InstanceBank:
        if not cache_mb or cache_mb <= 0:
            return bank
        path, kw = bank.path, {"lock": bank.lock, "refresh_interval": bank.refresh_interval}
    else:
        return bank
    if cache_mb and cache_mb > 0:
        return CachedInstanceBank(path, cache_mb=cache_mb, **kw)
    return InstanceBank(path, **kw)
