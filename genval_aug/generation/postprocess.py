"""Decoder output -> RGBA numpy instances: conversion and crop to the alpha box (vectorized numpy)."""
from __future__ import annotations

import numpy as np


def to_rgba_uint8(decoded: np.ndarray) -> np.ndarray:
    """(B,4,H,W) float in [0,1] with channel 0 = alpha, 1-3 = RGB -> (B,H,W,4) uint8 RGBA."""
    d = np.asarray(decoded, dtype=np.float32)
    if d.ndim != 4 or d.shape[1] != 4:
        raise ValueError(f"expected decoder output of shape (B,4,H,W), got {d.shape}")
    rgba = np.concatenate([d[:, 1:4], d[:, :1]], axis=1).transpose(0, 2, 3, 1)
    return np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint8)


def alpha_box(alpha: np.ndarray, threshold: int = 1, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the pixels with ``alpha >= threshold``, grown by ``pad`` and clipped; None if none."""
    on = alpha >= threshold
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return None
    h, w = alpha.shape
    y0, y1 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    x0, x1 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    return x0, y0, x1 - x0, y1 - y0


def crop_to_alpha(
    rgba: np.ndarray, threshold: int = 1, pad: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Crop an RGBA image to its alpha box; returns (crop, box). An empty alpha returns the image unchanged."""
    box = alpha_box(rgba[..., 3], threshold, pad)
    if box is None:
        return rgba, None
    x, y, w, h = box
    return np.ascontiguousarray(rgba[y : y + h, x : x + w]), box
