"""A cheap channel from training readers to the top-up worker: how often each category is drawn.

Every reader process (DataLoader worker, Ultralytics worker, the main process) keeps its counts in
memory and, at most every ``flush_interval`` seconds and at process exit, replaces one small JSON file
``<dir>/<host>-<pid>.json`` atomically (write + ``os.replace``). No locks, no shared writer, nothing
to corrupt: a reader killed mid-write leaves the previous file intact. The worker sums all files.

Wrap the sampler that feeds the paste transform::

    sampler = TrackingSampler(BankSampler(bank), draws_dir)   # picklable, fork/spawn safe
    transform = GenValPaste(sampler, ...)
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DrawCounter", "TrackingSampler", "default_draws_dir", "read_draws"]


def default_draws_dir(bank_path: str | os.PathLike) -> Path:
    """``<bank>.draws/`` beside the bank directory (never inside it: the bank is an LMDB env)."""
    p = Path(bank_path).expanduser().resolve()
    return p.with_name(p.name + ".draws")


class DrawCounter:
    """Per-process category draw counts, flushed to ``directory`` now and then. Picklable."""

    def __init__(self, directory: str | os.PathLike, flush_interval: float = 5.0):
        self.directory = str(directory)
        self.flush_interval = float(flush_interval)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._counts: Counter = Counter()
        self._last = time.monotonic()
        self._dirty = False
        self._finalizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "flush_interval": self.flush_interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["flush_interval"])

    def _check_process(self) -> None:
        if self._pid != os.getpid():      # forked copy: start this process's own counts and file
            self._reset()
        if self._finalizer is None:       # multiprocessing children skip atexit; Finalize runs there too
            from multiprocessing.util import Finalize

            self._finalizer = Finalize(self, DrawCounter.flush, args=(self,), exitpriority=10)

    def record(self, categories: Iterable[str]) -> None:
        self._check_process()
        n = 0
        for c in categories:
            self._counts[c] += 1
            n += 1
        if n:
            self._dirty = True
            if time.monotonic() - self._last >= self.flush_interval:
                self.flush()

    @property
    def path(self) -> Path:
        return Path(self.directory) / f"{socket.gethostname()}-{os.getpid()}.json"

    def flush(self) -> None:
        """Write this process's cumulative counts (atomic replace)."""
        if not self._dirty or self._pid != os.getpid():
            return
        self._last = time.monotonic()
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "updated": time.time(), "counts": dict(self._counts)}, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:  # a full disk must not stop training
            log.warning("could not write draw counts to %s: %s", self.directory, e)


def read_draws(directory: str | os.PathLike) -> Counter:
    """Sum of the draw counts of every reader process that wrote to ``directory``."""
    total: Counter = Counter()
    d = Path(directory)
    if not d.is_dir():
        return total
    for f in d.glob("*.json"):
        if f.name.startswith(".tmp-"):
            continue
        try:
            counts = json.loads(f.read_text(encoding="utf-8")).get("counts", {})
            total.update({str(k): int(v) for k, v in counts.items()})
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.debug("ignoring unreadable draw file %s: %s", f, e)
    return total


class TrackingSampler:
    """Wraps a sampler (``sample(rng, n) -> list[Instance]``) and counts drawn categories."""

    def __init__(self, sampler: Any, directory: str | os.PathLike | None = None, flush_interval: float = 5.0):
        self.sampler = sampler
        if directory is None:
            directory = default_draws_dir(sampler.bank.path)
        self.counter = DrawCounter(directory, flush_interval)

    def sample(self, rng, n: int):
        out = self.sampler.sample(rng, n)
        self.counter.record(inst.category for inst in out)
        return out

    def __getattr__(self, name: str):
        if name in ("sampler", "counter") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "counter": self.counter}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sampler = state["sampler"]
        self.counter = state["counter"]
