"""One builder per bank: an advisory lock file beside the bank, ``<bank>.build.lock``.

Two builders on one bank would schedule the same units; with a generator whose pixels depend on its batch
mates (Layer Diffusion) their ids differ and a unit is banked twice. ``bank build`` takes the lock for its
run, the top-up worker for its lifetime. The lock is ``flock``-based, so it dies with its process (SIGKILL
included); it is re-entrant within a process. Readers never take it. Where ``fcntl`` is missing (Windows)
it is a no-op.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from genval_aug.errors import BankError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["build_lock", "lock_path"]

_held: dict[str, list[int]] = {}     # lock path -> [fd, depth]
_mutex = threading.Lock()


def lock_path(bank: str | os.PathLike) -> Path:
    p = Path(bank).expanduser().resolve()
    return p.with_name(p.name + ".build.lock")


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def build_lock(bank: str | os.PathLike) -> Iterator[None]:
    """Hold the build lock of ``bank``; raises :class:`BankError` naming the holder's pid if it is taken."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = lock_path(bank)
    key = str(path)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BankError(f"{bank}: is being built by pid {_holder(path)} (lock {path}); one builder per "
                                "bank (stop the other `bank build` / worker, or build into another bank)") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _mutex:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
