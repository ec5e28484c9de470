"""The background top-up worker: a separate *spawned* process holding the bank's only writer.

Training reads the bank (DataLoader / Ultralytics workers) while this process fills categories below
their target and, optionally, raises the targets of the categories the readers draw most per banked
instance (reported through :mod:`genval_aug.build.draws`). Every batch is one LMDB transaction, so
stopping it at any time (``handle.stop()``, SIGTERM, SIGINT, or even SIGKILL) never leaves a partial
record; a restart resumes from what the bank holds.

    with start_worker("cache/x.lmdb", "build.yaml") as worker:   # spawned; returns at once
        train(...)                                               # readers see new instances
    # leaving the block stops the worker cleanly

Progress is stored in the bank (``InstanceBank(path).get_status("worker")``, ``genval-aug bank stats``).

Errors: a chat server that is *unavailable* (:class:`~genval_aug.errors.BackendUnavailableError`: connection
refused, timeout, HTTP 408/409/425/429/5xx after the backend's retries, a local model out of GPU memory) is
retried every poll interval, with ``last_error`` in the status. Any other error (a permanent ``BackendError``
such as HTTP 400/401/403/404 for a wrong model name or key, any other local ``generate()`` failure, a ``ConfigError``, a stage failing batch after batch)
stops the worker: the status says ``state: failed`` with the ``error``, ``run_worker`` raises it and
``genval-aug worker`` exits with code 2.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from genval_aug.bank import BankWriter, InstanceBank
from genval_aug.build.config import BuildConfig, load_config
from genval_aug.build.draws import default_draws_dir, read_draws
from genval_aug.build.lock import build_lock
from genval_aug.build.pipeline import BankBuilder
from genval_aug.errors import BackendError, BackendUnavailableError, BankError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["WorkerHandle", "run_worker", "start_worker", "STATUS_NAME"]

STATUS_NAME = "worker"


class _Stop:
    """Stop flag checked by the pipeline: a signal, the parent's event, or the parent's death."""

    def __init__(self, event: Any | None = None, parent_pid: int | None = None):
        self._flag = False
        self._event = event
        self._parent = parent_pid

    def set(self) -> None:
        self._flag = True

    def handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        """SIGTERM/SIGINT handler: the first asks for a clean stop after the current commit (which waits
        for a model load or a prompt round to finish); a second one interrupts at once (LMDB commits are
        atomic, so the bank stays consistent)."""
        if self._flag:
            raise KeyboardInterrupt(f"signal {signum} received twice")
        log.warning("top-up worker: signal %d, stopping after the current batch (again to interrupt now)", signum)
        self._flag = True

    def is_set(self) -> bool:
        if self._flag:
            return True
        if self._event is not None and self._event.is_set():
            self._flag = True
        elif self._parent is not None and os.getppid() != self._parent:
            log.warning("top-up worker: parent process %d is gone; stopping", self._parent)
            self._flag = True
        return self._flag

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.is_set() and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        return self.is_set()


def _most_drawn(draws: Counter, counts: dict[str, int], classes: list[str], k: int) -> list[str]:
    """Top ``k`` classes by draws per banked instance (how often each instance gets reused)."""
    scored = [(draws.get(c, 0) / max(1, counts.get(c, 0)), c) for c in classes if draws.get(c, 0) > 0]
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [c for _, c in scored[:k]]


def run_worker(config: BuildConfig | str | os.PathLike, bank: str | os.PathLike | None = None, *,
               stop: Any | None = None, device: str | None = None, draws_dir: str | os.PathLike | None = None,
               exit_when_done: bool = False, poll_interval: float | None = None,
               max_cycles: int | None = None) -> dict[str, Any]:
    """Top the bank up until ``stop`` is set (runs in the calling process; the CLI and the spawned
    worker both use it). Returns the final status dict."""
    cfg = config if isinstance(config, BuildConfig) else load_config(config)
    bank_path = str(Path(bank or cfg.output.bank).expanduser().resolve())
    stop = stop if stop is not None else _Stop()
    wk = cfg.worker
    draws_dir = Path(draws_dir or wk.draws_dir or default_draws_dir(bank_path))
    poll = wk.poll_interval if poll_interval is None else float(poll_interval)
    if not (math.isfinite(poll) and poll >= 0):   # NaN made stop.wait() return at once: a busy loop on the bank
        raise ConfigError(f"poll interval must be a number of seconds >= 0, got {poll_interval!r}")
    totals: dict[str, Any] = {"added": 0, "rejected": 0, "units": 0, "reasons": Counter(), "cycles": 0}
    prev = InstanceBank(bank_path).get_status(STATUS_NAME) if (Path(bank_path) / "data.mdb").is_file() else None
    extra: dict[str, int] = {k: int(v) for k, v in ((prev or {}).get("extra") or {}).items()}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def extra_status(state: str):
        def make(report=None) -> dict[str, Any]:
            reasons = totals["reasons"] + (report.rejected if report is not None else Counter())
            return {"worker_state": state, "started": started, "extra": dict(extra), "cycles": totals["cycles"],
                    "total_added": totals["added"] + (report.total_added if report is not None else 0),
                    "total_rejected": totals["rejected"] + (report.rejected_units if report is not None else 0),
                    "total_reasons": dict(reasons), "draws_dir": str(draws_dir),
                    "last_error": totals.get("last_error")}
        return make

    lock = build_lock(bank_path)      # held for the worker's lifetime: no other builder between cycles
    lock.__enter__()
    builder = BankBuilder(cfg, bank=bank_path, device=device, status_name=STATUS_NAME, progress=False)
    classes = [c.name for c in cfg.classes]
    final: dict[str, Any] = {}
    failure: str | None = None
    try:
        while not stop.is_set():
            targets = {c.name: c.target + extra.get(c.name, 0) for c in cfg.classes}
            try:
                report = builder.run(targets, stop=stop, extra_status=extra_status("filling"))
            except BackendUnavailableError as e:   # a chat server is down or busy (after the backend's retries):
                if exit_when_done:                     # try again later
                    raise
                totals["cycles"] += 1
                totals["last_error"] = str(e)
                log.warning("top-up worker: %s; trying again in %.0f s", e, poll)
                if max_cycles is not None and totals["cycles"] >= max_cycles:
                    break
                final = _write_status(bank_path, {**builder.status, **extra_status("waiting")()})
                stop.wait(poll)
                continue
            totals["cycles"] += 1
            totals["last_error"] = None
            totals["added"] += report.total_added
            totals["units"] += report.units
            totals["rejected"] += report.rejected_units
            totals["reasons"].update(report.rejected)
            final = dict(builder.status)
            if report.total_added or report.units:
                log.info("top-up worker: +%d instances (%d units); %d classes below target",
                         report.total_added, report.units, sum(1 for v in report.deficits.values() if v > 0))
            if stop.is_set():
                break
            if exit_when_done and not any(report.deficits.values()) and wk.most_drawn_top_k == 0:
                break
            if max_cycles is not None and totals["cycles"] >= max_cycles:
                break
            # every target met (or given up): raise the most reused classes, else idle
            raised = []
            if wk.most_drawn_top_k and wk.topup_step:
                counts = InstanceBank(bank_path, refresh_interval=None).categories()
                for c in _most_drawn(read_draws(draws_dir), counts, classes, wk.most_drawn_top_k):
                    room = wk.max_extra_per_class - extra.get(c, 0)
                    if room > 0 and c not in report.gave_up:
                        extra[c] = extra.get(c, 0) + min(wk.topup_step, room)
                        raised.append(c)
            if raised:
                log.info("top-up worker: raising targets of the most drawn classes %s", raised)
                continue
            if exit_when_done:
                break
            final = _write_status(bank_path, {**builder.status, **extra_status("idle")()})
            stop.wait(poll)
    except Exception as e:   # a permanent error (wrong model name or key, ConfigError, ...): retrying would
        failure = f"{type(e).__name__}: {e}"[:500]    # fail the same way every poll, forever
        totals["last_error"] = str(e)[:500]
        if isinstance(e, BackendError):
            log.error("top-up worker: stopping on a permanent backend error (not retried): %s", e)
        raise
    finally:
        builder.close()
        state = "failed" if failure else "stopped" if stop.is_set() else "finished"
        extra_fields = {"error": failure} if failure else {}
        try:
            final = _write_status(bank_path, {**(builder.status or {}), **extra_status(state)(),
                                              "state": state, "pid": os.getpid(), **extra_fields})
        finally:
            lock.__exit__(None, None, None)
    return final


def _write_status(bank_path: str, status: dict[str, Any]) -> dict[str, Any]:
    status = dict(status, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if (Path(bank_path) / "data.mdb").is_file():
        w = BankWriter(bank_path)
        try:
            w.set_status(STATUS_NAME, status)
        finally:
            w.close()
    return status


# ----------------------------------------------------------------------------- spawned process


def _child_main(config: BuildConfig, bank: str, event: Any, parent_pid: int, kwargs: dict[str, Any],
                log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(levelname)s genval-aug-worker[%(process)d] %(name)s: %(message)s")
    stop = _Stop(event, parent_pid)
    signal.signal(signal.SIGTERM, stop.handle_signal)
    signal.signal(signal.SIGINT, stop.handle_signal)
    threads = kwargs.pop("num_threads", None)
    if threads:
        import sys

        if "torch" in sys.modules:  # a plug-in imported at unpickling time; models built later use it
            sys.modules["torch"].set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    run_worker(config, bank, stop=stop, **kwargs)


class WorkerHandle:
    """Handle of a spawned top-up worker. ``stop()`` asks it to finish its current batch and exit."""

    def __init__(self, process: mp.Process, event: Any, bank: str):
        self.process = process
        self._event = event
        self.bank = bank

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def status(self) -> dict[str, Any] | None:
        """The worker's last status in the bank (added, rejected, per-class deficit, state)."""
        if not (Path(self.bank) / "data.mdb").is_file():
            return None
        try:
            return InstanceBank(self.bank, refresh_interval=None).get_status(STATUS_NAME)
        except BankError:  # the worker is creating the bank right now (sub-databases not committed yet)
            return None

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    def stop(self, timeout: float = 60.0) -> int | None:
        """Clean stop: the worker commits its current batch, writes its status and exits.

        Escalates to SIGTERM after ``timeout`` seconds and to SIGKILL after another ``timeout``
        (a kill is still safe for the bank: LMDB commits are atomic).
        """
        if self.process.is_alive():
            self._event.set()
            self.process.join(timeout)
        if self.process.is_alive():
            log.warning("top-up worker %s did not stop in %.0fs; sending SIGTERM", self.pid, timeout)
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():  # pragma: no cover
            log.warning("top-up worker %s ignores SIGTERM; killing it", self.pid)
            self.process.kill()
            self.process.join()
        return self.process.exitcode

    def __enter__(self) -> WorkerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"WorkerHandle(pid={self.pid}, bank={self.bank!r}, alive={self.is_alive()})"


def start_worker(bank: str | os.PathLike | None, config: BuildConfig | str | os.PathLike, *,
                 device: str | None = None, draws_dir: str | os.PathLike | None = None,
                 poll_interval: float | None = None, exit_when_done: bool = False,
                 num_threads: int = 1, log_level: int | None = None) -> WorkerHandle:
    """Spawn the top-up worker for ``bank`` (default: the config's output bank) and return at once.

    The process is started with the ``spawn`` method whatever the platform default, so it inherits
    no LMDB handle from the caller, and it stops by itself if the caller dies.
    """
    cfg = config if isinstance(config, BuildConfig) else load_config(config)
    if poll_interval is not None and not (math.isfinite(float(poll_interval)) and float(poll_interval) >= 0):
        raise ConfigError(f"poll interval must be a number of seconds >= 0, got {poll_interval!r}")
    bank_path = str(Path(bank or cfg.output.bank).expanduser().resolve())
    ctx = mp.get_context("spawn")
    event = ctx.Event()
    kwargs = {"device": device, "draws_dir": str(draws_dir) if draws_dir else None,
              "poll_interval": poll_interval, "exit_when_done": exit_when_done, "num_threads": num_threads}
    level = log_level if log_level is not None else logging.getLogger("genval_aug").getEffectiveLevel()
    proc = ctx.Process(target=_child_main, args=(cfg, bank_path, event, os.getpid(), kwargs, level),
                       name="genval-aug-topup-worker", daemon=False)
    proc.start()
    log.info("started top-up worker pid %d for %s", proc.pid, bank_path)
    return WorkerHandle(proc, event, bank_path)

