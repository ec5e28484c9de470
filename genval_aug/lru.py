"""A byte-bounded LRU cache that belongs to one process (pure Python; no framework imports).

Used for decoded bank instances (:class:`genval_aug.bank.CachedInstanceBank`) and for instances prepared by
the paste engine (:class:`genval_aug.paste.augment.SourceCache`). Thread-safe; pickling carries only the
budget; a forked child starts empty with a fresh lock (DataLoader workers each hold their own).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class ProcessLRU(Generic[V]):
    """``get_or_create(key, make)``: the cached value, or ``make()`` stored if it fits in ``max_bytes``."""

    def __init__(self, max_bytes: int, nbytes: Callable[[V], int]) -> None:
        self.max_bytes = int(max_bytes)
        self._nbytes = nbytes
        self._reset()

    def _reset(self) -> None:
        self._lru: OrderedDict[Hashable, V] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _own(self) -> OrderedDict[Hashable, V]:
        if self._pid != os.getpid():  # forked: this process keeps its own entries (and a lock nobody holds)
            self._reset()
        return self._lru

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "nbytes": self._nbytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"], state["nbytes"])

    def __len__(self) -> int:
        return len(self._own())

    def get_or_create(self, key: Hashable, make: Callable[[], V], on_insert: Callable[[V], None] | None = None) -> V:
        """``make`` runs outside the lock; ``on_insert`` (e.g. freezing arrays) runs only for stored values."""
        lru = self._own()
        with self._lock:
            value = lru.get(key)
            if value is not None:
                lru.move_to_end(key)
                self.hits += 1
                return value
            self.misses += 1
        value = make()
        size = self._nbytes(value)
        if 0 < size <= self.max_bytes:
            with self._lock:
                if key not in lru:
                    if on_insert is not None:
                        on_insert(value)
                    lru[key] = value
                    self.bytes += size
                while self.bytes > self.max_bytes:
                    _, old = lru.popitem(last=False)
                    self.bytes -= self._nbytes(old)
        return value

    def info(self) -> dict[str, int]:
        """``hits``, ``misses``, ``entries``, ``bytes`` held and the ``max_bytes`` budget, in this process."""
        lru = self._own()
        return {"hits": self.hits, "misses": self.misses, "entries": len(lru), "bytes": self.bytes,
                "max_bytes": self.max_bytes}

    def clear(self) -> None:
        with self._lock:
            self._own().clear()
            self.bytes = 0
