"""Scale-out: one bank build across many processes / GPUs / machines with ``torchrun`` or ``accelerate launch``.

- **Deterministic split**: classes are assigned to ranks by longest-processing-time on their deficits
  (computed from the output bank, which no rank writes during the build), so every rank computes the same
  assignment without talking to the others, and a rank re-run alone gets its share again.
- **One shard bank per rank** (``<bank>.shards/rank-RRR-of-WWW.lmdb``): an LMDB environment is never shared
  between processes of different machines or over a network filesystem. Each rank resumes from its shard.
- **Same ids as a single-process build**: each class is built by exactly one rank with the same unit
  sequence, and the pipeline's kept set does not depend on batching (see :mod:`genval_aug.build.pipeline`).
- **Coordination** uses torch.distributed's key-value store (the one ``torchrun`` rendezvous provides):
  ranks publish progress there after every commit, rank 0 shows the aggregate and, when every rank is done,
  merges the shards it can see into the output bank (``genval_aug.bank.merge``, dedup by id). No
  collective runs during the build, so ranks that finish hours apart never hit a collective timeout.
  Each rank bumps a heartbeat counter in the store from a background thread; a rank whose process dies
  (one started by hand, without torchrun's agent to end the job) falls silent, and rank 0 stops waiting
  after ``pipeline.rank_timeout`` seconds (default 600) with a :class:`RankTimeoutError` naming the
  missing ranks and their shards, which can then be re-run alone and merged.
- **Per-rank device**: ``cuda:LOCAL_RANK`` when CUDA is available (``torch.cuda.set_device``), else CPU.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from genval_aug.bank import BankWriter, InstanceBank
from genval_aug.bank import merge as merge_banks
from genval_aug.build.config import BuildConfig
from genval_aug.build.pipeline import (
    BankBuilder,
    BuildReport,
    StageStats,
    longest_numbering,
    merge_unstored,
    units_key,
    unstored_key,
)
from genval_aug.errors import ConfigError, GenValAugError

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "RankTimeoutError", "assign_classes", "build_distributed", "merge_shards", "rank_share",
           "replicate_bank", "shard_path", "shard_paths"]


class RankTimeoutError(GenValAugError, RuntimeError):
    """Rank 0 of a coordinated build gave up waiting for ranks that stopped without finishing."""


@dataclass(frozen=True)
class DistInfo:
    """Rank layout, from the environment ``torchrun`` / ``accelerate launch`` set."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    coordinated: bool = False      # a torch.distributed rendezvous is available (MASTER_ADDR/PORT)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistInfo:
        env = dict(os.environ if env is None else env)
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        if not 0 <= rank < max(1, world):
            from genval_aug.errors import ConfigError

            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   coordinated=world > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def shard_path(bank: str | os.PathLike, rank: int, world_size: int) -> str:
    p = Path(bank).expanduser().resolve()
    return str(p.with_name(p.name + ".shards") / f"rank-{rank:03d}-of-{world_size:03d}.lmdb")


def shard_paths(bank: str | os.PathLike, world_size: int) -> list[str]:
    return [shard_path(bank, r, world_size) for r in range(world_size)]


def _exists(path: str | os.PathLike) -> bool:
    return (Path(path) / "data.mdb").is_file()


def assign_classes(deficits: dict[str, int], world_size: int) -> list[list[str]]:
    """Longest-processing-time assignment: biggest deficit first, to the least loaded rank (ties: lowest
    rank, names break deficit ties). Classes with no deficit are dealt round-robin (they cost nothing)."""
    loads = [0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    todo = sorted(((d, n) for n, d in deficits.items() if d > 0), key=lambda x: (-x[0], x[1]))
    for d, name in todo:
        r = min(range(world_size), key=lambda i: (loads[i], i))
        out[r].append(name)
        loads[r] += d
    for i, name in enumerate(sorted(n for n, d in deficits.items() if d <= 0)):
        out[i % world_size].append(name)
    return out


def rank_share(config: BuildConfig, bank: str | os.PathLike, rank: int, world_size: int) -> list[str]:
    """The classes ``rank`` builds: computed from the output bank only, identical on every rank."""
    counts = InstanceBank(bank, refresh_interval=None).categories() if _exists(bank) else {}
    deficits = {c.name: max(0, c.target - counts.get(c.name, 0)) for c in config.classes}
    return assign_classes(deficits, world_size)[rank]


def default_device(dist: DistInfo) -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if torch.cuda.is_available():
        dev = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(dev)
        return dev
    return None


_SHARD_NAME = re.compile(r"rank-(\d+)-of-(\d+)\.lmdb")


def _shards_on_disk(bank: str | os.PathLike) -> dict[int | None, list[str]]:
    """Shard banks next to ``bank``, grouped by the world size in their names (None: name not recognised)."""
    root = Path(bank).expanduser().resolve()
    out: dict[int | None, list[str]] = {}
    for p in sorted(root.with_name(root.name + ".shards").glob("rank-*.lmdb")):
        if _exists(p):
            m = _SHARD_NAME.fullmatch(p.name)
            out.setdefault(int(m.group(2)) if m else None, []).append(str(p))
    return out


def replicate_bank(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """A compacted copy of a bank for read-only deployment (one copy per training node, local disk).

    Open the copy with ``InstanceBank(dst, lock=False)``: no lock file is written or needed because no
    writer will ever open that copy. Keep ``lock=True`` for a bank a top-up worker writes to.
    """
    import lmdb

    dst = Path(dst).expanduser().resolve()
    if _exists(dst):
        from genval_aug.errors import BankError

        raise BankError(f"{dst} already holds a bank; refusing to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    src_bank = InstanceBank(src)
    src_bank.close()
    env = lmdb.open(str(Path(src_bank.path)), readonly=True, lock=True, max_dbs=16, max_readers=1024)
    try:
        env.copy(str(dst), compact=True)
    finally:
        env.close()
    return str(dst)


def merge_shards(config: BuildConfig, bank: str | os.PathLike | None = None, world_size: int | None = None,
                 shards: list[str] | None = None) -> dict[str, int]:
    """Merge the shard banks of a build into its output bank (dedup by id; safe to repeat).

    The world size is in each shard's name (``rank-RRR-of-WWW.lmdb``). Without ``world_size`` the shards
    on disk must all come from one run: shards of several world sizes (stale ones of an earlier run split
    differently) raise :class:`ConfigError` naming them, instead of merging classes built twice.
    """
    bank = str(bank or config.output.bank)
    if shards is None:
        found = _shards_on_disk(bank)
        if world_size is None:
            if len(found) > 1 or None in found:
                groups = "; ".join(f"world size {w}: {', '.join(found[w])}" if w is not None
                                   else f"unrecognised names: {', '.join(found[w])}"
                                   for w in sorted(found, key=lambda w: (w is None, w or 0)))
                raise ConfigError(f"{bank}: shards of more than one run ({groups}); pass --world-size "
                                  f"(merge_shards(world_size=...)) to merge one run's shards, and remove the "
                                  f"stale ones")
            world_size = next(iter(found), None)
        shards = [s for s in shard_paths(bank, world_size) if _exists(s)] if world_size else []
        ignored = [p for w, ps in found.items() if w != world_size for p in ps]
        if ignored:
            log.warning("merge of %s: ignoring shards of another world size than %d: %s", bank, world_size,
                        ", ".join(ignored))
    if not shards:
        return {"added": 0, "duplicates": 0, "skipped": 0}
    out = merge_banks(bank, shards)
    # the prompt caches travel too, so a later single-process run continues with the same prompts;
    # so do the units settled without output (union with what the output bank already lists) and the
    # unit numberings of named sources (the longest: a shard's extends the output bank's)
    prefix = f"prompts:{config.name}:"
    uprefix = unstored_key(config.name, "")
    nprefix = units_key(config.name, "")
    cached: dict[str, Any] = {}
    unstored: dict[str, Any] = {}
    numberings: dict[str, list[Any]] = {}
    for sh in shards:
        shard_bank = InstanceBank(sh, refresh_interval=None)
        cached.update(shard_bank.statuses(prefix))
        for name, value in shard_bank.statuses(uprefix).items():
            unstored[name] = merge_unstored(unstored.get(name), value)
        for name, value in shard_bank.statuses(nprefix).items():
            numberings.setdefault(name, []).append(value)
    if unstored or numberings:
        out_bank = InstanceBank(bank, refresh_interval=None)
        existing = out_bank.statuses(uprefix)
        for name in unstored:
            cached[name] = merge_unstored(existing.get(name), unstored[name])
        existing = out_bank.statuses(nprefix)
        for name, values in numberings.items():
            best = longest_numbering([existing.get(name), *values], f"{name} of {bank} and its shards")
            if best is not None and best != existing.get(name):
                cached[name] = best
    if cached:
        w = BankWriter(bank)
        try:
            for name, value in cached.items():
                w.set_status(name, value)
        finally:
            w.close()
    log.info("merged %d shard(s) into %s: %s", len(shards), bank, out)
    return out


# ----------------------------------------------------------------------------- coordination


class _Coordinator:
    """Progress and completion through torch.distributed's key-value store (no collectives)."""

    def __init__(self, dist: DistInfo, build: str):
        import torch.distributed as tdist

        self.dist = dist
        self.build = build
        self._own_pg = False
        if not tdist.is_initialized():
            tdist.init_process_group(backend="gloo", timeout=timedelta(days=7))
            self._own_pg = True
        from torch.distributed import distributed_c10d

        self.store = tdist.PrefixStore(f"genval-aug-build/{build}/", distributed_c10d._get_default_store())
        self._lock = threading.Lock()     # the progress thread and the pipeline share one client
        self._last = 0.0
        self._bar_stop = threading.Event()
        self._bar_thread: threading.Thread | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def start_heartbeat(self, interval: float) -> None:
        """Bump ``alive/<rank>`` every ``interval`` seconds from a daemon thread, whatever the pipeline does
        (a model load or a long GPU batch); it stops when the process dies, which is what rank 0 watches."""
        key = f"alive/{self.dist.rank}"

        def loop():
            failing = False
            while True:
                try:
                    with self._lock:
                        self.store.add(key, 1)
                    failing = False
                except Exception as e:  # noqa: BLE001 - store unreachable for now: try again next beat
                    if not failing:
                        log.warning("rank %d: heartbeat to the store failed (%s); retrying", self.dist.rank, e)
                    failing = True
                if self._beat_stop.wait(interval):
                    return

        self._beat_thread = threading.Thread(target=loop, name="genval-build-heartbeat", daemon=True)
        self._beat_thread.start()

    def publish(self, status: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 1.0:
            self._last = now
            value = json.dumps({k: status.get(k) for k in ("added", "rejected", "units", "missing",
                                                           "classes_below_target", "state")})
            with self._lock:
                self.store.set(f"progress/{self.dist.rank}", value)

    def finish(self, report: BuildReport) -> None:
        with self._lock:
            self.store.set(f"report/{self.dist.rank}", json.dumps(report.to_dict()))
            self.store.add("done", 1)

    def progress(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            for r in range(self.dist.world_size):
                key = f"progress/{r}"
                out.append(json.loads(self.store.get(key)) if self.store.check([key]) else {})
        return out

    def done(self) -> int:
        with self._lock:
            return int(self.store.add("done", 0))

    def start_bar(self, total: int, poll: float = 1.0) -> None:
        """Rank 0: one aggregate bar over every rank, updated from the store while the build runs."""
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"banked (all {self.dist.world_size} ranks)", unit="inst")

        def loop():
            while True:
                prog = self.progress()
                bar.n = sum(int(p.get("added") or 0) for p in prog)
                bar.set_postfix_str(f"missing {sum(int(p.get('missing') or 0) for p in prog)}, "
                                    f"{self.done()}/{self.dist.world_size} ranks done", refresh=True)
                if self._bar_stop.wait(poll):
                    bar.close()
                    return

        self._bar_thread = threading.Thread(target=loop, name="genval-build-progress", daemon=True)
        self._bar_thread.start()

    def wait_all(self, timeout: float, poll: float = 0.5, shards: list[str] | None = None) -> list[dict[str, Any]]:
        """Reports of every rank, once all are done. A rank that has not finished and whose heartbeat
        (``alive/<rank>``) has not moved for ``timeout`` seconds is taken for dead (killed, or started
        by hand outside torchrun, which would otherwise tear the job down): raises
        :class:`RankTimeoutError` naming the missing ranks and their shards. Heartbeat
        counters are compared with rank 0's own clock, so clock skew between machines does not matter."""
        world = self.dist.world_size
        seen: dict[int, int] = {}
        moved = {r: time.monotonic() for r in range(world)}
        while True:
            with self._lock:
                finished = [r for r in range(world) if self.store.check([f"report/{r}"])]
                pending = [r for r in range(world) if r not in finished]
                beats = {r: int(self.store.add(f"alive/{r}", 0)) for r in pending}
            if not pending:
                break
            now = time.monotonic()
            for r, b in beats.items():
                if b != seen.get(r):
                    seen[r], moved[r] = b, now
            dead = [r for r in pending if now - moved[r] > timeout]
            if dead:
                where = shards or [""] * world
                names = ", ".join(f"rank {r}" + (f" (shard {where[r]})" if where[r] else "") for r in dead)
                rerun = "; ".join(f"--rank {r} --world-size {world}" for r in dead)
                raise RankTimeoutError(
                    f"build {self.build}: {names} did not finish and sent no heartbeat for {timeout:g} s "
                    f"(pipeline.rank_timeout): its process is gone. What it built stays in its shard; re-run it "
                    f"alone (genval-aug bank build --config ... {rerun}), then merge with --merge-shards")
            time.sleep(poll)
        with self._lock:
            return [json.loads(self.store.get(f"report/{r}")) for r in range(world)]

    def close(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(10)
        if self._bar_thread is not None:
            self._bar_stop.set()
            self._bar_thread.join(10)
        if self._own_pg:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _combine(reports: list[dict[str, Any]]) -> BuildReport:
    out = BuildReport(stages={})
    for r in reports:
        out.added.update(r.get("added_per_class", {}))
        out.rejected.update(r.get("rejected", {}))
        out.units += int(r.get("units", 0))
        out.rejected_units += int(r.get("rejected_units", 0))
        out.duplicates += int(r.get("duplicates", 0))
        out.deficits.update(r.get("deficits", {}))
        out.gave_up += list(r.get("gave_up", []))
        out.wall_s = max(out.wall_s, float(r.get("wall_s", 0.0)))
        out.stopped |= bool(r.get("stopped"))
        for k, s in r.get("stages", {}).items():
            st = out.stages.setdefault(k, StageStats(k))
            st.items += int(s["items"])
            st.batches += int(s["batches"])
            st.busy_s += float(s["busy_s"])
    out.added = Counter({k: v for k, v in out.added.items() if v})
    return out


def build_distributed(config: BuildConfig, *, bank: str | os.PathLike | None = None, device: str | None = None,
                      merge: bool = True, dist: DistInfo | None = None, progress: bool | None = None) -> BuildReport:
    """Build this process's share. Single process (``WORLD_SIZE`` unset or 1): an ordinary build.

    Under ``torchrun``: rank ``r`` builds :func:`rank_share` into its shard; rank 0 shows aggregate
    progress, waits for every rank and merges the shards into the output bank (``merge=False`` leaves
    them). Without a rendezvous (``RANK``/``WORLD_SIZE`` set by hand, e.g. to re-run a crashed rank),
    the rank builds its share and returns; merge later with :func:`merge_shards` / ``bank merge``.
    Returns the aggregate report on rank 0 (coordinated runs), the rank's own report otherwise.
    """
    dist = dist or DistInfo.from_env()
    bank = str(Path(bank or config.output.bank).expanduser().resolve())
    show = config.pipeline.progress if progress is None else progress
    if not dist.distributed:
        b = BankBuilder(config, bank=bank, device=device, progress=show)
        try:
            return b.run()
        finally:
            b.close()

    device = device or default_device(dist)
    share = rank_share(config, bank, dist.rank, dist.world_size)
    shard = shard_path(bank, dist.rank, dist.world_size)
    Path(shard).parent.mkdir(parents=True, exist_ok=True)
    coord = _Coordinator(dist, config.name) if dist.coordinated else None
    log.info("rank %d/%d: %d classes into %s on %s", dist.rank, dist.world_size, len(share), shard, device or "cpu")
    b = BankBuilder(config, bank=shard, classes=share, base_banks=[bank] if _exists(bank) else [],
                    device=device, status_name=f"build:{config.name}:rank{dist.rank}",
                    progress=show and dist.rank == 0 and coord is None,
                    on_commit=(lambda _b, st: coord.publish(st)) if coord else None)
    if coord is not None:
        coord.start_heartbeat(min(30.0, config.pipeline.rank_timeout / 4))
    if coord is not None and show and dist.rank == 0:
        coord.start_bar(total=sum(v for v in BankBuilder(config, bank=bank).deficits().values()) if _exists(bank)
                        else sum(c.target for c in config.classes))
    try:
        try:
            report = b.run() if share else BuildReport(stages={})
        finally:
            b.close()
        if coord is None:
            return report
        coord.publish(b.status or {"added": 0, "state": "done"}, force=True)
        coord.finish(report)
        if dist.rank != 0:
            return report
        agg = _combine(coord.wait_all(config.pipeline.rank_timeout,
                                      shards=shard_paths(bank, dist.world_size)))
        if merge:
            missing = [s for s in shard_paths(bank, dist.world_size) if not _exists(s)]
            if missing:   # other machines' shards (or ranks with no classes)
                log.warning("shards not on this machine (or empty): %s; copy them here and run "
                            "`genval-aug bank build --config ... --merge-shards`", missing)
            merge_shards(config, bank, dist.world_size)
        return agg
    finally:
        if coord is not None:
            coord.close()
