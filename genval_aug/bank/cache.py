"""A per-process LRU of decoded instances in front of an ``InstanceBank`` (repeated draws skip the decode).

Record ids are content hashes and records are never rewritten, so a cached instance never goes stale;
everything else (counts, the category index, new instances from a top-up worker after :meth:`refresh`)
is read from LMDB as by a plain ``InstanceBank``. The cache belongs to one process: a forked child starts
with an empty one (and a fresh lock), and pickling carries only the configuration.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from genval_aug.bank.record import Instance
from genval_aug.bank.store import InstanceBank

__all__ = ["CachedInstanceBank", "DEFAULT_CACHE_MB", "with_cache"]

DEFAULT_CACHE_MB = 256.0  # per-process budget of the adapters' decoded-instance cache


class CachedInstanceBank(InstanceBank):
    """``InstanceBank`` keeping decoded instances in a per-process LRU of ``cache_mb`` megabytes.

    Cached arrays are read-only (one array serves many pastes). Instances larger than the budget are
    decoded every time. ``cache_info()`` reports hits, misses and bytes held in this process.
    """

    def __init__(self, path: str | os.PathLike, *, cache_mb: float = DEFAULT_CACHE_MB, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.cache_bytes = int(cache_mb * (1 << 20))
        self._reset_cache()

    def _reset_cache(self) -> None:
        self._lru: OrderedDict[str, Instance] = OrderedDict()
        self._lru_bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.cache_bytes = state["cache_bytes"]
        self._reset_cache()

    def __repr__(self) -> str:
        return f"CachedInstanceBank({self.path!r}, cache_mb={self.cache_bytes / (1 << 20):g})"

    def _cache(self) -> OrderedDict[str, Instance]:
        if self._pid != os.getpid():  # forked: this process keeps its own cache (and a lock nobody holds)
            self._reset_cache()
        return self._lru

    def get(self, record_id: str) -> Instance:
        lru = self._cache()
        with self._lock:
            inst = lru.get(record_id)
            if inst is not None:
                lru.move_to_end(record_id)
                self._hits += 1
                return inst
        inst = super().get(record_id)  # decode outside the lock
        size = inst.rgba.nbytes
        with self._lock:
            self._misses += 1
            if size <= self.cache_bytes and record_id not in lru:
                inst.rgba.setflags(write=False)
                lru[record_id] = inst
                self._lru_bytes += size
                while self._lru_bytes > self.cache_bytes:
                    _, old = lru.popitem(last=False)
                    self._lru_bytes -= old.rgba.nbytes
        return inst

    def cache_info(self) -> dict[str, int]:
        """This process's counters: ``hits``, ``misses``, ``entries``, ``bytes`` and the ``max_bytes`` budget."""
        self._cache()
        return {"hits": self._hits, "misses": self._misses, "entries": len(self._lru), "bytes": self._lru_bytes,
                "max_bytes": self.cache_bytes}

    def clear_cache(self) -> None:
        """Drop every cached instance of this process."""
        with self._lock:
            self._lru.clear()
            self._lru_bytes = 0


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
