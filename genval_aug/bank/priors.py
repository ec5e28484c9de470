"""Per-category size priors: pooling the summaries of several sources (shards, datasets) exactly.

A prior is ``{"n": count, "<key>_mean": m, "<key>_std": s, ...}`` (e.g. ``rel_sqrt_area``, ``aspect``).
Pooling is n-weighted: the means of the union and its population standard deviations, as if the
observations had been summarized together.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["pool_priors"]


def _keys(priors: Iterable[Mapping[str, float]]) -> list[str]:
    return sorted({k[: -len("_mean")] for p in priors for k in p if k.endswith("_mean")})


def pool_priors(priors: Iterable[Mapping[str, float]],
                remove: Iterable[Mapping[str, float]] = ()) -> dict[str, float] | None:
    """Pool size priors; ``remove`` takes earlier contributions back out (a re-harvested dataset).

    Each statistic is pooled over the priors that have it (a missing ``n`` counts 1, a missing ``_std`` 0).
    Returns None when nothing is left (total ``n`` below 0.5).
    """
    add, sub = [dict(p) for p in priors], [dict(p) for p in remove if p]
    n = sum(float(p.get("n", 1)) for p in add) - sum(float(p.get("n", 1)) for p in sub)
    if n < 0.5:
        return None
    out: dict[str, float] = {"n": int(round(n))}
    for key in _keys(add):
        w = s1 = s2 = 0.0
        for sign, group in ((1.0, add), (-1.0, sub)):
            for p in group:
                if f"{key}_mean" in p:
                    pn, m, sd = float(p.get("n", 1)), float(p[f"{key}_mean"]), float(p.get(f"{key}_std", 0.0))
                    w, s1, s2 = w + sign * pn, s1 + sign * pn * m, s2 + sign * pn * (sd * sd + m * m)
        if w < 0.5:
            continue
        mean = s1 / w
        out[f"{key}_mean"], out[f"{key}_std"] = mean, math.sqrt(max(s2 / w - mean * mean, 0.0))
    return out
