"""Cheap, model-free quality checks on an instance's alpha channel.

Shared by the dataset harvester and the validation agent's pre-filters. Pure numpy + OpenCV.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ALPHA_THRESHOLD = 128


@dataclass(frozen=True)
class AlphaStats:
    """Statistics of the binarized alpha (``alpha >= threshold``)."""

    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h of the foreground; (0, 0, 0, 0) when empty
    components: int
    largest_fraction: float  # area of the largest component / total area (0 when empty)
    coverage: float  # area / (H * W)
    height: int
    width: int

    def to_dict(self) -> dict:
        return {
            "area": self.area,
            "bbox": list(self.bbox),
            "components": self.components,
            "largest_fraction": round(self.largest_fraction, 6),
            "coverage": round(self.coverage, 6),
        }


def _as_alpha(rgba_or_alpha: np.ndarray) -> np.ndarray:
    a = np.asarray(rgba_or_alpha)
    if a.ndim == 3 and a.shape[2] == 4:
        return a[..., 3]
    if a.ndim == 2:
        return a
    raise ValueError(f"expected an HxWx4 RGBA image or an HxW alpha, got shape {a.shape}")


def alpha_stats(rgba_or_alpha: np.ndarray, threshold: int = ALPHA_THRESHOLD) -> AlphaStats:
    """Area, bounding box and connectivity of an instance's foreground."""
    alpha = _as_alpha(rgba_or_alpha)
    h, w = alpha.shape
    mask = (alpha >= threshold).astype(np.uint8)
    area = int(cv2.countNonZero(mask))
    if area == 0:
        return AlphaStats(0, (0, 0, 0, 0), 0, 0.0, 0.0, h, w)
    n, _, cc, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = cc[1:, cv2.CC_STAT_AREA]
    x, y, bw, bh = cv2.boundingRect(mask)
    return AlphaStats(
        area=area,
        bbox=(int(x), int(y), int(bw), int(bh)),
        components=int(n - 1),
        largest_fraction=float(areas.max() / area),
        coverage=float(area / (h * w)),
        height=h,
        width=w,
    )


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the cheap pre-filters. ``None`` disables a rule.

    ``coverage`` is X-Paste's rule: the foreground must fill between 5% and 95% of its crop.
    """

    min_area: int | None = 64
    min_side: int | None = 8
    coverage: tuple[float, float] | None = (0.05, 0.95)
    min_largest_fraction: float | None = 0.8
    max_components: int | None = None
    max_aspect: float | None = 8.0
    reject_border: bool = False  # foreground touching the crop border (an object cut by the canvas)
    alpha_threshold: int = ALPHA_THRESHOLD


def check_instance(
    rgba_or_alpha: np.ndarray,
    rules: QualityRules = QualityRules(),
    *,
    truncated: bool | None = None,
    stats: AlphaStats | None = None,
) -> list[str]:
    """Reasons to reject an instance; an empty list means it passes.

    ``truncated`` (known to the caller, e.g. the object touched its source image border) rejects with
    ``"truncated"``. Reason names are stable: they are counted in bank statistics.
    """
    s = stats or alpha_stats(rgba_or_alpha, rules.alpha_threshold)
    if s.area == 0:
        return ["empty_alpha"]
    reasons: list[str] = []
    _, _, bw, bh = s.bbox
    if rules.min_area is not None and s.area < rules.min_area:
        reasons.append("too_small")
    elif rules.min_side is not None and min(bw, bh) < rules.min_side:
        reasons.append("too_small")
    if rules.coverage is not None:
        lo, hi = rules.coverage
        if not lo <= s.coverage <= hi:
            reasons.append("coverage")
    if rules.min_largest_fraction is not None and s.largest_fraction < rules.min_largest_fraction:
        reasons.append("fragmented")
    elif rules.max_components is not None and s.components > rules.max_components:
        reasons.append("fragmented")
    if rules.max_aspect is not None and max(bw, bh) / max(1, min(bw, bh)) > rules.max_aspect:
        reasons.append("aspect")
    if rules.reject_border:
        x, y, bw_, bh_ = s.bbox
        if x == 0 or y == 0 or x + bw_ >= s.width or y + bh_ >= s.height:
            reasons.append("touches_border")
    if truncated:
        reasons.append("truncated")
    return reasons


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 8-connected component of a boolean/uint8 mask."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    n, labels, cc, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:
        return m.astype(bool)
    keep = 1 + int(np.argmax(cc[1:, cv2.CC_STAT_AREA]))
    return labels == keep
