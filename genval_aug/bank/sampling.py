"""Drawing instances from a bank: category weights, filters and per-process random streams."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from genval_aug.bank.record import Instance
from genval_aug.bank.store import InstanceBank
from genval_aug.errors import BadRecordError, ConfigError

log = logging.getLogger(__name__)

MODES = ("uniform", "balanced", "rare_boost", "weights")


def repeat_factors(frequencies: Mapping[str, float], threshold: float = 0.001) -> dict[str, float]:
    """LVIS repeat factors ``r_c = max(1, sqrt(t / f_c))``.

    ``frequencies`` maps a category to the fraction of training images that contain it (0 < f_c <= 1).
    """
    out = {}
    for name, f in frequencies.items():
        f = float(f)
        if not 0 < f <= 1:
            raise ConfigError(f"dataset frequency of {name!r} must be in (0, 1], got {f}")
        out[name] = max(1.0, math.sqrt(threshold / f))
    return out


def category_weights(
    counts: Mapping[str, int],
    mode: str = "balanced",
    *,
    weights: Mapping[str, float] | None = None,
    dataset_frequencies: Mapping[str, float] | None = None,
    repeat_threshold: float = 0.001,
) -> dict[str, float]:
    """Normalized probability of drawing each category (only categories with instances)."""
    counts = {k: int(v) for k, v in counts.items() if v > 0}
    if mode not in MODES:
        raise ConfigError(f"sampling mode must be one of {MODES}, got {mode!r}")
    if mode == "uniform":
        raw = {k: float(v) for k, v in counts.items()}
    elif mode == "balanced":
        raw = {k: 1.0 for k in counts}
    elif mode == "rare_boost":
        if not dataset_frequencies:
            raise ConfigError("mode 'rare_boost' needs dataset_frequencies (category -> fraction of images)")
        rf = repeat_factors({k: v for k, v in dataset_frequencies.items() if k in counts}, repeat_threshold)
        top = max(rf.values(), default=1.0)
        missing = sorted(set(counts) - set(rf))
        if missing:
            log.info("rare_boost: %d bank categories absent from the dataset get the top factor %.2f: %s",
                     len(missing), top, missing[:10])
        raw = {k: rf.get(k, top) for k in counts}
    else:
        if not weights:
            raise ConfigError("mode 'weights' needs a weights mapping (category -> weight)")
        bad = {k: w for k, w in weights.items() if not _is_weight(w)}
        if bad:
            raise ConfigError(f"category weights must be finite and >= 0: {bad}")
        raw = {k: float(weights[k]) for k in counts if k in weights}
    total = sum(raw.values())
    if total <= 0:
        if counts:  # an empty bank may still be filling; weights that match nothing are a mistake
            log.warning("sampling weights give none of the bank's %d categories a positive weight (bank: %s; "
                        "weights: %s): nothing will be drawn", len(counts), sorted(counts)[:10],
                        dict(list((weights or {}).items())[:10]))
        return {}
    return {k: v / total for k, v in raw.items() if v > 0}


def _is_weight(w: Any) -> bool:
    try:
        return float(w) >= 0 and math.isfinite(float(w))
    except (TypeError, ValueError):
        return False


class BankSampler:
    """Draws instances: a category by weight, then an instance of it uniformly.

    Without filters a draw is O(1) (a direct index lookup). Filters (``min_score``, ``sources``,
    ``min_side``, ``predicate``) build a per-category list of eligible ids the first time a category
    is drawn in a process, rebuilt after :meth:`refresh` (and when its count changes in re-read stats).
    Corrupt records are skipped, counted (``self.skipped``) and logged once.
    """

    def __init__(
        self,
        bank: InstanceBank | str,
        mode: str = "balanced",
        *,
        weights: Mapping[str, float] | None = None,
        classes: Sequence[str] | None = None,
        dataset_frequencies: Mapping[str, float] | None = None,
        repeat_threshold: float = 0.001,
        min_score: float | None = None,
        sources: Sequence[str] | None = None,
        min_side: int | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ):
        self.bank = bank if isinstance(bank, InstanceBank) else InstanceBank(bank)
        self.mode = mode
        self.weights = dict(weights) if weights else None
        self.classes = list(classes) if classes is not None else None
        self.dataset_frequencies = dict(dataset_frequencies) if dataset_frequencies else None
        self.repeat_threshold = repeat_threshold
        self.min_score = min_score
        self.sources = set(sources) if sources is not None else None
        self.min_side = min_side
        self.predicate = predicate
        self.skipped = 0
        self._warned = False
        self._probs: tuple[list[str], np.ndarray] | None = None
        self._eligible: dict[str, list[str]] = {}
        self._stats_seen: Any = None
        self._counts_seen: dict[str, int] = {}
        # configuration errors surface here, not at the first draw in a DataLoader worker
        category_weights({"_": 1}, mode, weights=self.weights or None,
                         dataset_frequencies={"_": 1.0} if mode == "rare_boost" and self.dataset_frequencies else None,
                         repeat_threshold=repeat_threshold)

    @property
    def filtered(self) -> bool:
        return any(x is not None for x in (self.min_score, self.sources, self.min_side, self.predicate))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_probs"], state["_eligible"], state["_stats_seen"], state["_counts_seen"] = None, {}, None, {}
        return state

    def refresh(self) -> None:
        """See instances committed since the last draw (re-read counts, rebuild filtered lists)."""
        self.bank.refresh()
        self._probs = None
        self._eligible.clear()

    def size_prior(self, category: str) -> dict[str, float] | None:
        return self.bank.size_prior(category)

    def _accept_fields(self, meta: dict[str, Any]) -> bool:
        """The built-in filters (``TypeError`` & co. on a corrupt record whose fields have the wrong types)."""
        if self.min_score is not None and (meta.get("score") is None or meta["score"] < self.min_score):
            return False
        if self.sources is not None and (meta.get("source") or {}).get("kind") not in self.sources:
            return False
        if self.min_side is not None and min(meta.get("width", 0), meta.get("height", 0)) < self.min_side:
            return False
        return True

    def _skip(self, error: Exception) -> None:
        self.skipped += 1
        if not self._warned:
            log.warning("skipping corrupt bank record (%s); further ones are counted in sampler.skipped", error)
            self._warned = True

    def _eligible_ids(self, category: str) -> list[str]:
        ids = self._eligible.get(category)
        if ids is None:
            ids = []
            for rid in self.bank.ids(category):
                try:
                    meta = self.bank.get_meta(rid)
                    if not isinstance(meta, dict):
                        raise BadRecordError(f"record {rid}: metadata is a JSON {type(meta).__name__}, not an object")
                    fields_ok = self._accept_fields(meta)
                except (BadRecordError, KeyError) as e:
                    self._skip(e)
                    continue
                except (TypeError, AttributeError) as e:
                    self._skip(BadRecordError(f"record {rid}: metadata field of the wrong type ({e})"))
                    continue
                if fields_ok and (self.predicate is None or self.predicate(meta)):
                    ids.append(rid)
            self._eligible[category] = ids
        return ids

    def probabilities(self) -> dict[str, float]:
        """Current probability of each category being drawn."""
        names, p = self._category_table()
        return dict(zip(names, p.tolist(), strict=True))

    def _category_table(self) -> tuple[list[str], np.ndarray]:
        stats = self.bank.stats()
        if self._probs is None or stats is not self._stats_seen:
            counts = self.bank.categories()
            if self._stats_seen is not None:
                # re-read stats: records are append-only, so only a category whose count changed is rescanned
                for k in [k for k in self._eligible if counts.get(k, 0) != self._counts_seen.get(k, 0)]:
                    del self._eligible[k]
            self._counts_seen = counts
            if self.classes is not None:
                counts = {k: v for k, v in counts.items() if k in set(self.classes)}
            if self.filtered:
                counts = {k: len(self._eligible_ids(k)) for k in counts}
            probs = category_weights(counts, self.mode, weights=self.weights,
                                     dataset_frequencies=self.dataset_frequencies,
                                     repeat_threshold=self.repeat_threshold)
            names = sorted(probs)
            self._probs = (names, np.array([probs[k] for k in names], dtype=np.float64))
            self._stats_seen = stats
        return self._probs

    def sample_categories(self, rng: np.random.Generator, n: int) -> list[str]:
        names, p = self._category_table()
        if not names:
            return []
        return [names[i] for i in rng.choice(len(names), size=n, p=p)]

    def sample(self, rng: np.random.Generator, n: int) -> list[Instance]:
        """Draw ``n`` instances (fewer only if the bank has no eligible instance at all)."""
        out: list[Instance] = []
        for category in self.sample_categories(rng, n):
            for _ in range(10):  # a corrupt record is skipped; draw again
                try:
                    if self.filtered:
                        ids = self._eligible_ids(category)
                        if not ids:
                            break
                        inst = self.bank.get(ids[int(rng.integers(len(ids)))])
                    else:
                        inst = self.bank.random_instance(category, rng)
                except (BadRecordError, KeyError) as e:
                    self._skip(e)
                    continue
                out.append(inst)
                break
        return out
