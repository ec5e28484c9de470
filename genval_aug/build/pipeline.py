"""The bank-build pipeline: prompts -> source -> pre-filters -> validator -> bank.

Stages overlap: a generator thread makes the next batch while a validator thread judges the previous
one and the calling thread writes verdicts to the bank; stages are joined by bounded queues.

Work is cut into deterministic **units** ``(category, index)``: unit ``i`` uses prompt ``i % n`` and
seed ``hash(config.seed, category, i)``. A source with named units (a folder's files, ``unit_names``) gets
its indices by first appearance, stored in the bank status ``units:<build>:<category>``: a file added later
gets the next free index wherever it sorts, so a top-up imports exactly the new files. Each unit's outcome
is stored with the record (``source.build`` and ``source.unit``, plus ``source.unit_name`` for named units;
rejected instances go to the bank's audit table), one LMDB transaction per batch,
so a killed build restarts where it stopped and a finished one does nothing. Units with no storable
outcome (a source or validator error on that unit, an alpha the bank refuses) are settled too: their
indices go to the bank status ``unstored:<build>:<category>`` (written with the batch), so a top-up worker
does not make them again every poll. A chat server that is down (``BackendError``, after the backend's
retries) or a ``ConfigError`` raised by the source or the validator while working (a model path that
does not load, ...) settles nothing: it stops the run and a later run retries; settled as failures,
they would use up every class's attempts. Any other exception from the source's ``produce`` or the
validator's ``validate`` settles that batch's units as ``source_error`` / ``validator_error`` (a unit that
breaks a model must not be retried forever), but :data:`MAX_FAILED_BATCHES` (3) failed batches *in a row*
(for the source: ``produce`` raised, or every unit of the batch is an exception error such as the
generator's ``generation_error``) stop the run with a :class:`~genval_aug.errors.BuildStageError`: a plug-in
that raises on every batch would otherwise burn every class's attempts. Targets are minimum counts per
category, measured on what the bank holds.

Prompts are cached in the bank status ``prompts:<build>:<category>``. A cached set shorter than
``prompts.n`` (the model returned fewer) is used as is and completed once per run: the prompt maker is asked
for the missing ones (told the cached ones when it takes ``existing``), which are appended after them.

Scheduling never overshoots (with ``pipeline.overgenerate: 1``): for a category with deficit ``d``
and no units in flight, the next ``d`` untried indices are scheduled. The kept instances are then
exactly "the first units, in index order, until the target is reached", independent of batching,
restarts and how many processes share the work (see :mod:`genval_aug.build.distributed`).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genval_aug.bank import BankWriter, InstanceBank
from genval_aug.build.config import BuildConfig, ClassSpec
from genval_aug.build.lock import build_lock
from genval_aug.build.registry import Candidate, WorkUnit, build_component
from genval_aug.errors import BackendError, BadInstanceError, BuildStageError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["BankBuilder", "BuildReport", "StageStats", "build_bank", "scan_units", "unit_seed"]

MAX_FAILED_BATCHES = 3          # consecutive failed source / validator batches that stop a run
UNSTORED_PREFIX = "unstored:"   # bank status "unstored:<build>:<category>" -> {"units": [...], "reasons": {...}}
UNITS_PREFIX = "units:"         # bank status "units:<build>:<category>" -> {"names": [...]}: unit i = names[i]


def unstored_key(build: str, category: str) -> str:
    """Bank status name listing the settled units of ``build`` / ``category`` that left nothing in the bank."""
    return f"{UNSTORED_PREFIX}{build}:{category}"


def units_key(build: str, category: str) -> str:
    """Bank status name holding the unit numbering of a source with named units (``unit_names``)."""
    return f"{UNITS_PREFIX}{build}:{category}"


def longest_numbering(values: Iterable[dict[str, Any] | None], where: str = "") -> dict[str, Any] | None:
    """The most complete of several ``units:`` status values (each extends the previous ones; a
    numbering that is not a prefix of the longest is reported and loses)."""
    vals = [v for v in values if v and isinstance(v.get("names"), list)]
    if not vals:
        return None
    best = max(vals, key=lambda v: len(v["names"]))
    for v in vals:
        if best["names"][:len(v["names"])] != v["names"]:
            log.warning("unit numbering %s differs between banks; using the longest (%d units)", where,
                        len(best["names"]))
            break
    return best


def merge_unstored(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """Union of two ``unstored:`` status values (units and reason counts per unit are kept once)."""
    units: dict[int, str] = {}
    for v in (a or {}), (b or {}):
        for i, r in zip(v.get("units", []), v.get("reasons", []), strict=False):
            units.setdefault(int(i), str(r))
    order = sorted(units)
    return {"units": order, "reasons": [units[i] for i in order]}


def unit_seed(base_seed: int, category: str, index: int) -> int:
    """Deterministic 31-bit seed of a unit."""
    h = hashlib.blake2b(f"{base_seed}\x1f{category}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def _spec_fingerprint(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def scan_units(bank: InstanceBank, build: str) -> dict[str, set[int]]:
    """Unit indices of ``build`` already settled in a bank (kept, rejected or unstored), per category.

    One read transaction, a cursor over the records and the rejected-audit table; metadata without
    the build tag is skipped without JSON parsing. Units that left nothing storable are read from the
    ``unstored:<build>:`` status entries.
    """
    tag = f'"build":{_json_str(build)}'.encode()
    out: dict[str, set[int]] = {}
    for meta in bank.scan_meta(("records", "rejected"), contains=tag):
        src = meta.get("source") or {}
        if src.get("build") == build and isinstance(src.get("unit"), int):
            out.setdefault(meta["category"], set()).add(src["unit"])
    prefix = unstored_key(build, "")
    for name, value in bank.statuses(prefix).items():
        units = (value or {}).get("units") or []
        out.setdefault(name[len(prefix):], set()).update(int(i) for i in units)
    return out


def _check_verdict(v: Any) -> dict[str, Any]:
    """A validator's verdict as a dict the bank can store, or an ``{"error": ...}`` verdict saying what is
    wrong with it: ``keep`` must be a real boolean (the string ``"false"`` is truthy and used to keep the
    instance), ``score`` a finite number or absent, ``criteria`` a mapping, everything JSON-encodable."""
    import numbers

    from genval_aug.bank.record import dumps

    try:
        d = v.to_dict() if hasattr(v, "to_dict") else v
        if not isinstance(d, dict):
            return {"error": f"validator_error:bad_verdict: expected a dict, got {type(d).__name__}"}
        d = dict(d)
        if "error" in d:
            d["error"] = str(d["error"])
            return d
        keep = d.get("keep")
        if not isinstance(keep, (bool, np.bool_)):
            return {"error": f"validator_error:bad_verdict: 'keep' must be true or false, got {keep!r:.40}"}
        d["keep"] = bool(keep)
        score = d.get("score")
        if score is not None and (isinstance(score, (bool, np.bool_)) or not isinstance(score, numbers.Real)
                                  or not math.isfinite(float(score))):
            return {"error": f"validator_error:bad_verdict: 'score' must be a finite number, got {score!r:.40}"}
        if not isinstance(d.get("criteria") or {}, dict):
            return {"error": "validator_error:bad_verdict: 'criteria' must be a mapping"}
        dumps(d)
    except Exception as e:  # noqa: BLE001 - a broken verdict object: reported per unit, the build goes on
        return {"error": f"validator_error:bad_verdict: {type(e).__name__}: {e}"[:300]}
    return d


def _keep(v: Any) -> bool:
    if v is None:
        return False
    d = v if isinstance(v, dict) else (v.to_dict() if hasattr(v, "to_dict") else {"keep": getattr(v, "keep", False)})
    return bool(d.get("keep", False)) and "error" not in d


def _exception_error(error: str | None) -> bool:
    """A candidate error that records an exception (``source_error:TypeError``, ``generation_error: ...``), not
    a data problem of that unit (a missing or unreadable file)."""
    return bool(error) and error.split(":")[0].strip() in ("source_error", "generation_error")


def _check_failures(failed_in_row: int, stage: str, error: BaseException | str) -> None:
    """Raise :class:`BuildStageError` once ``stage`` has failed on :data:`MAX_FAILED_BATCHES` batches in a row."""
    if failed_in_row < MAX_FAILED_BATCHES:
        return
    what = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    raise BuildStageError(
        f"{stage} failed on {failed_in_row} batches in a row (last: {what}"[:400] + "); stopping the build "
        "instead of settling every unit as failed; the units of the failing batch are not settled, so a "
        "re-run after the fix retries them") from (error if isinstance(error, BaseException) else None)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


# ----------------------------------------------------------------------------- reporting


@dataclass
class StageStats:
    name: str
    items: int = 0
    batches: int = 0
    busy_s: float = 0.0

    @property
    def rate(self) -> float:
        """Items per busy second."""
        return self.items / self.busy_s if self.busy_s > 0 else float("nan")


@dataclass
class BuildReport:
    """What one :meth:`BankBuilder.run` did."""

    added: Counter = field(default_factory=Counter)         # category -> records added
    rejected: Counter = field(default_factory=Counter)      # reason -> count
    units: int = 0                                          # units processed this run
    rejected_units: int = 0
    duplicates: int = 0
    stages: dict[str, StageStats] = field(default_factory=dict)
    deficits: dict[str, int] = field(default_factory=dict)  # category -> still missing at the end
    gave_up: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: bool = False

    @property
    def total_added(self) -> int:
        return int(sum(self.added.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.total_added, "added_per_class": dict(self.added), "rejected": dict(self.rejected),
            "units": self.units, "rejected_units": self.rejected_units, "duplicates": self.duplicates, "wall_s": round(self.wall_s, 3),
            "deficits": dict(self.deficits), "gave_up": list(self.gave_up), "stopped": self.stopped,
            "stages": {k: {"items": s.items, "batches": s.batches, "busy_s": round(s.busy_s, 3),
                           "items_per_s": None if math.isnan(s.rate) else round(s.rate, 3)}
                       for k, s in self.stages.items()},
        }

    def summary(self) -> str:
        lines = [f"units processed: {self.units}   added: {self.total_added}   "
                 f"rejected: {self.rejected_units}   wall: {self.wall_s:.1f}s"
                 + ("   (stopped early)" if self.stopped else "")]
        for s in self.stages.values():
            rate = "-" if math.isnan(s.rate) else f"{s.rate:.2f}/s"
            lines.append(f"  stage {s.name:<9} {s.items:>7} items  busy {s.busy_s:8.2f}s  {rate}")
        for reason, n in self.rejected.most_common():
            lines.append(f"  rejected {reason}: {n}")
        missing = {k: v for k, v in self.deficits.items() if v > 0}
        if missing:
            lines.append(f"  below target: {len(missing)} classes, {sum(missing.values())} instances missing")
        if self.gave_up:
            lines.append(f"  gave up (attempt limit or source exhausted): {', '.join(self.gave_up[:10])}"
                         + (" ..." if len(self.gave_up) > 10 else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the builder


@dataclass
class _ClassState:
    spec: ClassSpec
    target: int
    have: int = 0                    # instances held (own bank + base banks)
    done: set[int] = field(default_factory=set)  # unit indices settled or in flight
    inflight: int = 0
    cursor: int = 0                  # every index < cursor is in `done`
    capacity: int | None = None
    gave_up: bool = False
    names: list[str] | None = None   # unit i = names[i] (sources with named units)
    category_id: int | None = None   # bank category id its instances get (see BankBuilder._category_ids)

    @property
    def deficit(self) -> int:
        return max(0, self.target - self.have)


_STOP = object()


class BankBuilder:
    """Runs a :class:`BuildConfig` against a bank; reusable (the worker calls :meth:`run` repeatedly).

    Args:
        config: the validated build config.
        bank: output bank path (default ``config.output.bank``).
        classes: restrict to these class names (a rank's share in a distributed build).
        base_banks: read-only banks whose instances also count towards targets (the merged output
            bank when this process writes a shard).
        device: device for the source/validator models (``"cuda:1"``); None = their default.
        components: ready-made ``source`` / ``validator`` / ``prompts`` objects (skip the registry).
        status_name: key under which progress is stored in the bank (``InstanceBank.get_status``).
        progress: show tqdm bars (default ``config.pipeline.progress``).
    """

    def __init__(self, config: BuildConfig, *, bank: str | os.PathLike | None = None,
                 classes: Iterable[str] | None = None, base_banks: Iterable[str | os.PathLike] = (),
                 device: str | None = None, components: dict[str, Any] | None = None,
                 status_name: str | None = None, progress: bool | None = None,
                 on_commit: Callable[[BankBuilder, dict[str, Any]], None] | None = None):
        self.config = config
        self.bank_path = str(bank or config.output.bank)
        wanted = set(classes) if classes is not None else None
        self.classes = [c for c in config.classes if wanted is None or c.name in wanted]
        self.base_banks = [InstanceBank(b) for b in base_banks]
        self.device = device
        self._components = dict(components or {})
        self.status_name = status_name or f"build:{config.name}"
        self.progress = config.pipeline.progress if progress is None else progress
        self.on_commit = on_commit
        self._prompts: dict[str, list[str]] = {}
        self._short: set[str] = set()    # classes whose prompt set is short of prompts.n (completed next run)
        self._rules = None
        self.status: dict[str, Any] = {}

    # -- components -------------------------------------------------------------------------
    def _component(self, key: str):
        if key not in self._components:
            cfg = self.config
            if key == "source":
                self._components[key] = build_component("source", cfg.source, cfg, "source", self.device)
            elif key == "validator":
                self._components[key] = build_component("validator", cfg.validator, cfg, "validator", self.device)
            elif key == "prompts":
                from genval_aug.build.config import ComponentSpec

                spec = ComponentSpec(kind=cfg.prompts.kind, params=cfg.prompts.params)
                self._components[key] = build_component("prompts", spec, cfg, "prompts", self.device)
        return self._components[key]

    @property
    def rules(self):
        if self._rules is None and self.config.prefilter is not None:
            from genval_aug.quality import QualityRules

            try:
                self._rules = QualityRules(**self.config.prefilter)
            except TypeError as e:
                raise ConfigError(f"{self.config.path or '<config>'}: prefilter: {e}") from e
        return self._rules

    def close(self) -> None:
        for comp in self._components.values():
            close = getattr(comp, "close", None)
            if callable(close):
                close()
        self._components.clear()

    # -- prompts (cached in the bank so a restart uses the same ones) -----------------------
    def _prompt_key(self, spec: ClassSpec) -> tuple[str, str]:
        pc = self.config.prompts
        fp = _spec_fingerprint((pc.kind, pc.n, pc.templates, sorted(pc.params.items(), key=str),
                                spec.name, spec.definition, spec.synonyms))
        return f"prompts:{self.config.name}:{spec.name}", fp

    def _ensure_prompts(self, specs: list[ClassSpec], writer: BankWriter, bank: InstanceBank,
                        report: BuildReport) -> set[str]:
        """Load or make the prompts of ``specs``; returns the names that have none (prompt maker failed).

        Prompt makers with ``prompts_many(classes, n)`` (the LLM agent) get every missing class in one
        batched call, so a first round over hundreds of classes does not wait on one request per class.
        """
        t0 = time.monotonic()
        pc = self.config.prompts
        bank_exists = os.path.isfile(os.path.join(self.bank_path, "data.mdb"))
        missing = []
        short: dict[str, list[str]] = {}   # cached sets with fewer than prompts.n prompts: completed below
        for spec in specs:
            if spec.name in self._prompts:
                continue
            key, fp = self._prompt_key(spec)
            cached = bank.get_status(key) if bank_exists else None
            if cached and cached.get("fingerprint") == fp and cached.get("prompts"):
                have = [p for p in cached["prompts"] if isinstance(p, str) and p.strip()]
                if len(have) >= pc.n:
                    self._prompts[spec.name] = have
                    continue
                short[spec.name] = have
                log.info("build %s: class %r has %d of %d prompts cached; asking the prompt maker for the rest",
                         self.config.name, spec.name, len(have), pc.n)
            missing.append(spec)
        failed: set[str] = set()
        if missing:
            maker = self._component("prompts")
            made: dict[str, list[str]] = {}
            if hasattr(maker, "prompts_many"):
                takes_existing = _accepts(maker.prompts_many, "existing")
                for k in range(0, len(missing), 64):
                    chunk = missing[k:k + 64]
                    have = {c.name: short[c.name] for c in chunk if c.name in short}
                    try:
                        if have and takes_existing:   # the maker writes only the missing ones, unlike these
                            made.update(maker.prompts_many(chunk, pc.n, existing=have))
                        else:
                            made.update(maker.prompts_many(chunk, pc.n))
                    except (ConfigError, BackendError):  # misconfigured maker or server down (after the
                        raise                               # backend's retries): every class would fail too
                    except Exception as e:  # a broken chunk: fall back to one class at a time
                        log.warning("prompt maker %s failed on %d classes (%s); retrying one by one",
                                    pc.kind, len(chunk), e)
            for spec in missing:
                if made.get(spec.name):
                    continue
                try:
                    got = maker.prompts(spec, pc.n)
                    made[spec.name] = [got] if isinstance(got, str) else list(got)
                except (ConfigError, BackendError):
                    raise
                except Exception as e:
                    log.warning("prompt maker %s produced no prompt for %r: %s", pc.kind, spec.name, e)
            for spec in missing:
                got = made.get(spec.name) or []
                if isinstance(got, str):   # one prompt, not one prompt per character
                    got = [got]
                fresh = [p for p in got if isinstance(p, str) and p.strip()]
                have = short.get(spec.name, [])
                # cached prompts first (and kept when the maker fails), new distinct ones after, up to n
                cached = set(have)
                prompts = (have + [p for p in dict.fromkeys(fresh) if p not in cached])[:max(pc.n, len(have))]
                if not prompts:
                    failed.add(spec.name)
                    report.rejected["prompt_error"] += 1
                    continue
                if len(prompts) < pc.n:
                    self._short.add(spec.name)   # asked again at the next run (a worker's next cycle)
                    log.warning("build %s: class %r has %d of %d prompts (units cycle over those); the rest is "
                                "asked for again at the next run", self.config.name, spec.name, len(prompts), pc.n)
                if prompts != have:
                    key, fp = self._prompt_key(spec)
                    writer.set_status(key, {"fingerprint": fp, "prompts": prompts})
                self._prompts[spec.name] = prompts
                report.stages["prompts"].items += len(prompts) - len(have)
            report.stages["prompts"].batches += 1
        report.stages["prompts"].busy_s += time.monotonic() - t0
        return failed

    # -- state ------------------------------------------------------------------------------
    def _category_ids(self, bank: InstanceBank) -> dict[str, int]:
        """The bank category id of every configured class: its configured id, else the id it already has in
        a base bank (the merged output) or this bank, else the next free id in config order. The same in a
        one-process build and in every rank's shard, so merged shards keep the ids a single process gives."""
        known: dict[str, int] = {}
        for b in [*self.base_banks, bank]:
            for name, cid in b.category_ids().items():
                known.setdefault(name, int(cid))
        used = set(known.values()) | {c.category_id for c in self.config.classes if c.category_id is not None}
        ids: dict[str, int] = {}
        nxt = max(used, default=-1) + 1
        for c in self.config.classes:
            if c.category_id is not None:
                ids[c.name] = c.category_id
            elif c.name in known:
                ids[c.name] = known[c.name]
            else:
                ids[c.name] = nxt
                nxt += 1
        return ids

    def _counts(self, bank: InstanceBank) -> dict[str, int]:
        counts = Counter(bank.categories())
        for b in self.base_banks:
            b.refresh()
            counts.update(b.categories())
        return counts

    def _init_states(self, bank: InstanceBank, targets: dict[str, int] | None,
                     writer: BankWriter | None = None) -> dict[str, _ClassState]:
        bank.refresh()
        counts = self._counts(bank)
        settled = scan_units(bank, self.config.name)
        for b in self.base_banks:
            for k, v in scan_units(b, self.config.name).items():
                settled.setdefault(k, set()).update(v)
        source = self._component("source")
        ids = self._category_ids(bank)
        states = {}
        for c in self.classes:
            t = (targets or {}).get(c.name, c.target)
            st = _ClassState(spec=c, target=int(t), have=counts.get(c.name, 0),
                             done=set(settled.get(c.name, ())), category_id=ids[c.name])
            while st.cursor in st.done:
                st.cursor += 1
            states[c.name] = st
        todo = [st for st in states.values() if st.deficit > 0]
        prepare = getattr(source, "prepare", None)
        if callable(prepare) and todo:
            prepare([st.spec for st in todo])
        legacy: dict[str, dict[int, str]] | None = None
        for st in todo:
            if callable(getattr(source, "unit_names", None)):
                if legacy is None and not self._numbering(bank, st.spec.name) and st.done:
                    legacy = self._legacy_names(bank, source)
                st.names = self._number_units(st, source, bank, writer, (legacy or {}).get(st.spec.name, {}))
                st.capacity = len(st.names)
            else:
                st.capacity = source.capacity(st.spec)
        return states

    def _numbering(self, bank: InstanceBank, category: str) -> dict[str, Any] | None:
        key = units_key(self.config.name, category)
        own = bank.get_status(key) if os.path.isfile(os.path.join(self.bank_path, "data.mdb")) else None
        return longest_numbering([own] + [b.get_status(key) for b in self.base_banks], f"{key} of {self.bank_path}")

    def _legacy_names(self, bank: InstanceBank, source: Any) -> dict[str, dict[int, str]]:
        """Unit -> name of the records of a bank built before unit numberings were stored (old banks)."""
        name_of = getattr(source, "unit_name_of", None)
        tag = f'"build":{_json_str(self.config.name)}'.encode()
        out: dict[str, dict[int, str]] = {}
        for b in [bank, *self.base_banks]:
            for meta in b.scan_meta(("records", "rejected"), contains=tag):
                src = meta.get("source") or {}
                if src.get("build") != self.config.name or not isinstance(src.get("unit"), int):
                    continue
                name = src.get("unit_name")
                if name is None and callable(name_of):
                    name = name_of(meta["category"], src)
                if name is not None:
                    out.setdefault(meta["category"], {})[src["unit"]] = str(name)
        return out

    def _number_units(self, st: _ClassState, source: Any, bank: InstanceBank, writer: BankWriter | None,
                      legacy: dict[int, str]) -> list[str]:
        """The unit numbering of a class: the stored one, extended by names the source has now.

        A bank built before numberings were stored gets one rebuilt from its records' names; settled
        units whose name is unknown (they left no record) keep their index under an empty name, and the
        files they were, if still there, are tried once more under a new index."""
        cat = st.spec.name
        stored = self._numbering(bank, cat)
        names = list(stored["names"]) if stored else []
        if stored is None and st.done:
            top = max(max(st.done), max(legacy, default=-1)) + 1
            names = [legacy.get(i, "") for i in range(top)]
            log.info("build %s: class %r has no stored unit numbering (bank built before it existed); rebuilt "
                     "it from %d named records of %d settled units", self.config.name, cat, len(legacy),
                     len(st.done))
        known = set(names)
        new = [n for n in source.unit_names(st.spec) if n not in known]
        if new or stored is None or len(names) != len(stored["names"]):
            names += new
            if writer is not None and names:
                writer.set_status(units_key(self.config.name, cat), {"names": names})
        return names

    def _schedule(self, st: _ClassState) -> list[int]:
        """Indices for the next round of a class with nothing in flight (no overshoot at 1.0)."""
        pl = self.config.pipeline
        limit = math.ceil(st.target * pl.max_attempts_factor)
        if st.capacity is not None:
            limit = min(limit, st.capacity)
        n = min(pl.max_units_per_round, math.ceil(st.deficit * pl.overgenerate))
        out: list[int] = []
        i = st.cursor
        while len(out) < n and i < limit:
            if i not in st.done:
                out.append(i)
            i += 1
        if not out:
            st.gave_up = True
        return out

    def deficits(self, targets: dict[str, int] | None = None) -> dict[str, int]:
        """Instances still missing per class, without building anything."""
        counts: Counter = Counter()
        if os.path.isfile(os.path.join(self.bank_path, "data.mdb")):
            counts.update(InstanceBank(self.bank_path, refresh_interval=None).categories())
        for b in self.base_banks:
            b.refresh()
            counts.update(b.categories())
        return {c.name: max(0, (targets or {}).get(c.name, c.target) - counts.get(c.name, 0)) for c in self.classes}

    # -- run ----------------------------------------------------------------------------------
    def run(self, targets: dict[str, int] | None = None, stop: threading.Event | Any | None = None,
            extra_status: dict[str, Any] | Callable[[BuildReport], dict[str, Any]] | None = None) -> BuildReport:
        """Build until every class reaches its target (``targets`` overrides the config's), the
        attempt limit, or ``stop`` is set. Returns a report; the bank holds everything committed."""
        t_start = time.monotonic()
        for name in self._short:          # short prompt sets: ask for the missing prompts once per run
            self._prompts.pop(name, None)
        self._short.clear()
        report = BuildReport(stages={k: StageStats(k) for k in ("prompts", "generate", "prefilter", "validate", "write")})
        cfg = self.config
        # a finished build must not even load its models: check deficits first
        if not any(v > 0 for v in self.deficits(targets).values()):
            report.deficits = self.deficits(targets)
            report.wall_s = time.monotonic() - t_start
            log.info("build %s: every class is at target; nothing to do", cfg.name)
            return report
        with build_lock(self.bank_path):    # a second builder on this bank would build the same units
            return self._run(targets, stop, extra_status, report, t_start)

    def _run(self, targets, stop, extra_status, report: BuildReport, t_start: float) -> BuildReport:
        cfg = self.config
        source = self._component("source")         # models load before the bank is opened for writing
        validator = self._component("validator")
        writer = BankWriter(self.bank_path, batch_size=1 << 30)   # we commit explicitly, per batch
        bank = InstanceBank(self.bank_path, refresh_interval=None)
        try:
            states = self._init_states(bank, targets, writer)
        except BaseException:
            writer.close()
            raise
        src_bs = max(1, cfg.source.batch_size)
        val_bs = max(1, cfg.validator.batch_size)
        rules = self.rules
        abort = threading.Event()
        stop = stop if stop is not None else threading.Event()

        q_units: queue.Queue = queue.Queue(maxsize=cfg.pipeline.queue_size)
        q_gen: queue.Queue = queue.Queue(maxsize=cfg.pipeline.queue_size)
        q_out: queue.Queue = queue.Queue()
        bars = self._bars(states)
        errors: list[BaseException] = []

        def put(q: queue.Queue, item) -> bool:
            while not abort.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def gen_loop():
            failed_in_row = 0
            try:
                while not abort.is_set():
                    try:
                        units = q_units.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if units is _STOP:
                        put(q_gen, _STOP)
                        return
                    t0 = time.monotonic()
                    try:
                        cands = list(source.produce(units))
                        if len(cands) != len(units):
                            raise RuntimeError(f"source returned {len(cands)} candidates for {len(units)} units")
                    except (BackendError, ConfigError):  # a server is down or the source is misconfigured
                        raise                               # (it would fail every unit): stop, settle nothing
                    except Exception as e:  # a broken batch is reported per unit, the build goes on
                        failed_in_row += 1
                        _check_failures(failed_in_row, f"source {cfg.source.kind!r}", e)
                        log.warning("source %s failed on a batch of %d units: %s", cfg.source.kind, len(units), e)
                        cands = [Candidate(u, None, error=f"source_error:{type(e).__name__}") for u in units]
                    else:
                        if cands and all(_exception_error(c.error) for c in cands):   # caught inside the source
                            failed_in_row += 1
                            _check_failures(failed_in_row, f"source {cfg.source.kind!r}",
                                            f"every unit failed ({cands[-1].error})")
                        else:
                            failed_in_row = 0
                    st_g = report.stages["generate"]
                    st_g.busy_s += time.monotonic() - t0
                    st_g.items += len(units)
                    st_g.batches += 1
                    t0 = time.monotonic()
                    reasons = [self._prefilter(c, rules) for c in cands]
                    report.stages["prefilter"].busy_s += time.monotonic() - t0
                    report.stages["prefilter"].items += len(cands)
                    bars["generate"].update(len(units))
                    if not put(q_gen, (cands, reasons)):
                        return
            except BaseException as e:  # pragma: no cover - surfaced in the main thread
                errors.append(e)
                abort.set()

        def val_loop():
            failed_in_row = 0
            try:
                while not abort.is_set():
                    try:
                        item = q_gen.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is _STOP:
                        q_out.put(_STOP)
                        return
                    cands, reasons = item
                    verdicts: list[Any] = [None] * len(cands)
                    todo = [i for i, c in enumerate(cands) if c.rgba is not None and not reasons[i]]
                    t0 = time.monotonic()
                    for k in range(0, len(todo), val_bs):
                        idx = todo[k:k + val_bs]
                        try:
                            vs = list(validator.validate([cands[i].rgba for i in idx],
                                                         [cands[i].unit.category for i in idx]))
                            if len(vs) != len(idx):
                                raise RuntimeError(f"validator returned {len(vs)} verdicts for {len(idx)} instances")
                        except (BackendError, ConfigError):  # the VLM server is down or the validator is
                            raise                               # misconfigured: stop the run, settle nothing
                        except Exception as e:
                            failed_in_row += 1
                            _check_failures(failed_in_row, f"validator {cfg.validator.kind!r}", e)
                            log.warning("validator failed on %d instances: %s", len(idx), e)
                            vs = [{"error": f"validator_error:{type(e).__name__}"}] * len(idx)
                        else:
                            failed_in_row = 0
                        for i, v in zip(idx, vs, strict=True):
                            verdicts[i] = _check_verdict(v)
                    st_v = report.stages["validate"]
                    st_v.busy_s += time.monotonic() - t0
                    st_v.items += len(todo)
                    st_v.batches += 1 if todo else 0
                    bars["validate"].update(len(cands))
                    q_out.put((cands, reasons, verdicts))
            except BaseException as e:  # pragma: no cover
                errors.append(e)
                abort.set()

        threads = [threading.Thread(target=gen_loop, name="genval-build-generate", daemon=True),
                   threading.Thread(target=val_loop, name="genval-build-validate", daemon=True)]
        for t in threads:
            t.start()

        pending: list[WorkUnit] = []
        inflight_batches = 0
        sent_stop = False
        failure: str | None = None
        try:
            while True:
                if errors:
                    raise errors[0]
                if stop.is_set():
                    report.stopped = True
                    while True:   # keep work that is already judged (cheap to write), drop the rest
                        try:
                            item = q_out.get_nowait()
                        except queue.Empty:
                            break
                        if item is not _STOP:
                            self._write(item, writer, bank, states, report, bars, extra_status)
                    break
                # 1. schedule rounds for classes with nothing in flight
                if not pending:
                    rounds: list[list[WorkUnit]] = []
                    ready = [st for st in states.values() if st.inflight == 0 and st.deficit > 0 and not st.gave_up]
                    if ready and getattr(source, "needs_prompts", False):
                        for name in self._ensure_prompts([st.spec for st in ready], writer, bank, report):
                            states[name].gave_up = True
                    for st in ready:
                        if not st.gave_up:
                            idx = self._schedule(st)
                            if not idx:
                                continue
                            prompts = self._prompts.get(st.spec.name) if getattr(source, "needs_prompts", False) else None
                            units = []
                            for i in idx:
                                pi = i % len(prompts) if prompts else None
                                units.append(WorkUnit(st.spec.name, i, unit_seed(cfg.seed, st.spec.name, i),
                                                      prompts[pi] if prompts else None, pi,
                                                      st.names[i] if st.names is not None else None))
                                st.done.add(i)
                            rounds.append(units)
                            st.inflight += len(idx)
                            bars["generate"].total = (bars["generate"].total or 0) + len(idx)
                            bars["validate"].total = bars["generate"].total
                            bars["generate"].refresh()
                    # interleave classes so all of them progress together (a worker stopped early
                    # has helped every class, not just the first ones)
                    pending = [u for group in itertools.zip_longest(*rounds) for u in group if u is not None]
                # 2. feed the generator (bounded)
                while pending and not q_units.full():
                    batch, pending = pending[:src_bs], pending[src_bs:]
                    q_units.put(batch)
                    inflight_batches += 1
                if not pending and inflight_batches == 0:
                    break  # nothing schedulable and nothing in flight: done
                # 3. write finished batches
                try:
                    item = q_out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _STOP:  # pragma: no cover - only after we sent it
                    break
                inflight_batches -= 1
                self._write(item, writer, bank, states, report, bars, extra_status)
            if not stop.is_set() and not report.stopped:
                sent_stop = put(q_units, _STOP)
        except BaseException as e:   # a server down, a crash in a stage: the status must not say "done"
            failure = f"{type(e).__name__}: {e}"[:500]
            raise
        finally:
            if not sent_stop:
                abort.set()
            for t in threads:   # a stage finishes its current batch (a GPU call) before the models are freed
                t.join(timeout=120.0)
                if t.is_alive():
                    log.warning("build %s: stage thread %s still busy after 120 s", cfg.name, t.name)
            abort.set()
            bank.refresh()
            counts = self._counts(bank)
            report.deficits = {n: max(0, st.target - counts.get(n, 0)) for n, st in states.items()}
            report.gave_up = sorted(n for n, st in states.items() if st.gave_up and report.deficits[n] > 0)
            report.wall_s = time.monotonic() - t_start
            try:
                state = "failed" if failure else "stopped" if report.stopped else "done"
                final = self._status(states, report, extra_status, state=state)
                if failure:
                    final["error"] = failure
                writer.set_status(self.status_name, final)
            finally:
                writer.close()
                for b in bars.values():
                    b.close()
        for name in report.gave_up:
            log.warning("build %s: class %r stays below target (%d missing): attempt limit reached or source "
                        "exhausted", cfg.name, name, report.deficits[name])
        return report

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _prefilter(c: Candidate, rules) -> list[str]:
        if c.rgba is None:
            return []
        a = np.asarray(c.rgba)
        if a.ndim != 3 or a.shape[2] != 4 or a.dtype != np.uint8:
            return ["bad_shape"]
        if rules is None:
            return [] if a[..., 3].any() else ["empty_alpha"]
        from genval_aug.quality import check_instance

        return check_instance(a, rules)

    def _write(self, item, writer: BankWriter, bank: InstanceBank, states: dict[str, _ClassState],
               report: BuildReport, bars: dict[str, Any], extra_status: Any) -> None:
        cands, reasons, verdicts = item
        t0 = time.monotonic()
        batch_reasons: Counter = Counter()
        before = writer.duplicates
        touched = set()
        unstored: dict[str, dict[int, str]] = {}
        for c, rs, v in zip(cands, reasons, verdicts, strict=True):
            u = c.unit
            st = states[u.category]
            st.inflight -= 1
            touched.add(u.category)
            report.units += 1
            src = dict(c.source)
            src.update(build=self.config.name, unit=u.index)
            if u.name is not None:
                src["unit_name"] = u.name
            if u.prompt is not None:
                src.setdefault("prompt", u.prompt)
            if c.error is not None or rs or "error" in (v if isinstance(v, dict) else {}) or not _keep(v):
                report.rejected_units += 1
            if c.error is not None:       # nothing to store: settled in the unstored status
                batch_reasons[c.error.split(":")[0]] += 1
                unstored.setdefault(u.category, {})[u.index] = c.error
                continue
            if rs:
                batch_reasons.update(f"prefilter:{r}" for r in rs)
                if not self._reject(writer, c, src, {"keep": False, "score": 0.0,
                                                     "criteria": {r: False for r in rs},
                                                     "reasons": {r: "failed pre-filter" for r in rs},
                                                     "model": "prefilter"}):
                    unstored.setdefault(u.category, {})[u.index] = "prefilter:" + ",".join(rs)
                continue
            vd = v.to_dict() if hasattr(v, "to_dict") else dict(v)
            if "error" in vd:
                batch_reasons[vd["error"].split(":")[0]] += 1
                unstored.setdefault(u.category, {})[u.index] = str(vd["error"])
                continue
            if not vd.get("keep", False):
                failed = [k for k, ok in (vd.get("criteria") or {}).items() if not ok]
                # an unparseable judge reply (ValidationAgent status "invalid") is counted as such, not as an
                # anonymous rejection; its reason is in the audited verdict
                failed = failed or ["invalid" if vd.get("status") == "invalid" else "rejected"]
                batch_reasons.update(f"validator:{k}" for k in failed)
                if not self._reject(writer, c, src, vd):
                    unstored.setdefault(u.category, {})[u.index] = "validator:" + ",".join(failed)
                continue
            writer.add(c.rgba, category=u.category, category_id=st.category_id, source=src, verdict=vd)
        if batch_reasons:
            writer.record_rejections(dict(batch_reasons))
            report.rejected.update(batch_reasons)
        for cat, units in unstored.items():   # the first set_status commits the batch with it
            key = unstored_key(self.config.name, cat)
            new = {"units": sorted(units), "reasons": [units[i] for i in sorted(units)]}
            writer.set_status(key, merge_unstored(bank.get_status(key), new))
        writer.flush()
        report.duplicates += writer.duplicates - before
        bank.refresh()
        counts = self._counts(bank)
        for name in touched:
            st = states[name]
            new = counts.get(name, 0)
            if new > st.have:
                report.added[name] += new - st.have
                bars["write"].update(new - st.have)
            st.have = new
            while st.cursor in st.done:
                st.cursor += 1
        status = self._status(states, report, extra_status, state="running")
        writer.set_status(self.status_name, status)     # its own tiny commit
        st_w = report.stages["write"]
        st_w.busy_s += time.monotonic() - t0
        st_w.items += len(cands)
        st_w.batches += 1
        if self.on_commit is not None:
            self.on_commit(self, status)

    @staticmethod
    def _reject(writer: BankWriter, c: Candidate, src: dict[str, Any], verdict: dict[str, Any]) -> bool:
        """Put a rejected instance in the audit table; False when the bank refuses it (e.g. empty alpha)."""
        try:
            writer.add_rejected(c.rgba, category=c.unit.category, source=src, verdict=verdict)
        except BadInstanceError:
            return False  # nothing to audit; counted in the reasons, settled as unstored by the caller
        return True

    def _status(self, states: dict[str, _ClassState], report: BuildReport,
                extra: Any, state: str) -> dict[str, Any]:
        deficit = {n: st.deficit for n, st in states.items() if st.deficit > 0}
        out = {
            "build": self.config.name, "state": state, "pid": os.getpid(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "added": report.total_added, "rejected": report.rejected_units,
            "reasons": dict(report.rejected), "units": report.units,
            "deficit": dict(sorted(deficit.items(), key=lambda kv: -kv[1])[:50]),
            "classes_below_target": len(deficit), "missing": int(sum(deficit.values())),
        }
        if callable(extra):
            extra = extra(report)
        if extra:
            out.update(extra)
        self.status = out
        return out

    def _bars(self, states: dict[str, _ClassState]) -> dict[str, Any]:
        from tqdm import tqdm

        total = sum(st.deficit for st in states.values())
        off = not self.progress
        return {
            "generate": tqdm(total=0, desc="generate", unit="inst", position=0, disable=off, leave=False),
            "validate": tqdm(total=0, desc="validate", unit="inst", position=1, disable=off, leave=False),
            "write": tqdm(total=total, desc="banked  ", unit="inst", position=2, disable=off),
        }


def build_bank(config: BuildConfig, **kwargs) -> BuildReport:
    """Build (or finish building) the bank of a config. Keyword arguments go to :class:`BankBuilder`."""
    builder = BankBuilder(config, **kwargs)
    try:
        return builder.run()
    finally:
        builder.close()

