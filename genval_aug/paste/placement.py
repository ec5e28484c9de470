"""Where a pasted instance goes: uniform position, bounded overlap with existing objects, optional truncation."""
from __future__ import annotations

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
        kx, ky = int(np.ceil(min_inside * w)), int(np.ceil(min_inside * h))
        x_lo, x_hi = kx - w, W - kx
        y_lo, y_hi = ky - h, H - ky
    else:
        x_lo, x_hi, y_lo, y_hi = 0, W - w, 0, H - h
    x_hi, y_hi = max(x_hi, x_lo), max(y_hi, y_lo)
    return rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1), size=(n, 2))


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
    cx, cy = cands[:, :1], cands[:, 1:]
    x1, y1 = np.maximum(cx, 0), np.maximum(cy, 0)
    x2, y2 = np.minimum(cx + w, W), np.minimum(cy + h, H)
    iw = np.minimum(x2, occ[:, 2]) - np.maximum(x1, occ[:, 0])
    ih = np.minimum(y2, occ[:, 3]) - np.maximum(y1, occ[:, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area = np.maximum((occ[:, 2] - occ[:, 0]) * (occ[:, 3] - occ[:, 1]), 1e-9)
    ok = (inter <= max_ioa * area).all(axis=1)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return None
    x, y = cands[idx[0]]
    return int(x), int(y)
