"""Where a pasted instance goes: uniform position, bounded overlap with existing objects, optional truncation."""
from __future__ import annotations

import math

import numpy as np


def box_ioa(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection of ``box`` (4,) with each of ``others`` (M, 4) over the area of each of ``others`` (xyxy)."""
    if len(others) == 0:
        return np.zeros(0, np.float64)
    o = np.asarray(others, np.float64)
    iw = np.clip(np.minimum(box[2], o[:, 2]) - np.maximum(box[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], o[:, 3]) - np.maximum(box[1], o[:, 1]), 0, None)
    area = np.clip((o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1]), 1e-9, None)
    return iw * ih / area


def candidate_positions(
    rng: np.random.Generator,
    obj_hw: tuple[int, int],
    image_hw: tuple[int, int],
    n: int,
    allow_truncation: bool,
    min_inside: float,
) -> np.ndarray:
    """(n, 2) integer top-left (x, y) positions, uniform over the allowed range.

    Without truncation the object lies fully inside the image; with it, at least ``min_inside`` of its width
    and of its height stay inside.
    """
    h, w = obj_hw
    H, W = image_hw
    if allow_truncation:
        kx, ky = math.ceil(min_inside * w), math.ceil(min_inside * h)
        x_lo, x_hi = kx - w, W - kx
        y_lo, y_hi = ky - h, H - ky
    else:
        x_lo, x_hi, y_lo, y_hi = 0, W - w, 0, H - h
    x_hi, y_hi = max(x_hi, x_lo), max(y_hi, y_lo)
    # floor(u * count) of u in [0, 1) is uniform over 0..count-1 (one draw; rng.integers costs ~10x more)
    u = rng.random((n, 2))
    u *= (x_hi - x_lo + 1, y_hi - y_lo + 1)
    out = u.astype(np.int64)
    out += (x_lo, y_lo)
    return out


def place(
    rng: np.random.Generator,
    obj_hw: tuple[int, int],
    image_hw: tuple[int, int],
    occupied: np.ndarray,
    max_ioa: float = 0.3,
    allow_truncation: bool = True,
    min_inside: float = 0.5,
    retries: int = 20,
) -> tuple[int, int] | None:
    """Top-left (x, y) for an object of size ``obj_hw``, or None when every try overlaps too much.

    A position is accepted when the pasted box (clipped to the image) covers at most ``max_ioa`` of every
    occupied box (xyxy, (M, 4)). All ``retries`` candidates are drawn at once, so the RNG stream consumed per
    call is fixed and results are deterministic for a seed.
    """
    H, W = image_hw
    h, w = obj_hw
    cands = candidate_positions(rng, obj_hw, image_hw, max(retries, 1), allow_truncation, min_inside)
    if len(occupied) == 0 or max_ioa >= 1.0:
        x, y = cands[0]
        return int(x), int(y)
    occ = np.asarray(occupied, np.float64)
    limit = max_ioa * np.maximum((occ[:, 2] - occ[:, 0]) * (occ[:, 3] - occ[:, 1]), 1e-9)
    # the first candidate usually fits: test it alone before testing all of them at once
    x, y = int(cands[0, 0]), int(cands[0, 1])
    if _fits(occ, limit, max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)):
        return x, y
    cx, cy = cands[:, :1], cands[:, 1:]
    x1, y1 = np.maximum(cx, 0), np.maximum(cy, 0)
    x2, y2 = np.minimum(cx + w, W), np.minimum(cy + h, H)
    iw = np.minimum(x2, occ[:, 2]) - np.maximum(x1, occ[:, 0])
    ih = np.minimum(y2, occ[:, 3]) - np.maximum(y1, occ[:, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    idx = np.flatnonzero((inter <= limit).all(axis=1))
    if len(idx) == 0:
        return None
    x, y = cands[idx[0]]
    return int(x), int(y)


def _fits(occ: np.ndarray, limit: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> bool:
    """Whether the box (x1, y1, x2, y2) covers at most ``limit`` of each occupied box's area."""
    iw = np.minimum(occ[:, 2], x2) - np.maximum(occ[:, 0], x1)
    ih = np.minimum(occ[:, 3], y2) - np.maximum(occ[:, 1], y1)
    return bool((np.maximum(iw, 0) * np.maximum(ih, 0) <= limit).all())
