"""Mask kernels for the harvest: exact polygon rasterization, RGBA crops, GrabCut.

Polygons use continuous pixel coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), so a
normalized YOLO vertex maps to ``x * W``. A pixel is inside when its centre is (even-odd rule), which
is what the annotation means; ``cv2.fillPoly`` also paints every pixel an edge touches and grows a
mask by about a pixel all round, too much for small objects.
"""
from __future__ import annotations

import cv2
import numpy as np


def polygons_bbox(polygons: list[np.ndarray]) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of a list of (K, 2) polygons."""
    allp = np.concatenate(polygons, axis=0)
    return float(allp[:, 0].min()), float(allp[:, 1].min()), float(allp[:, 0].max()), float(allp[:, 1].max())


def rasterize_polygon(polygon: np.ndarray, shape: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0),
                      supersample: int = 1) -> np.ndarray:
    """Rasterize one polygon (even-odd) into an ``(h, w)`` window whose top-left pixel is ``offset``.

    Returns uint8 0/255 when ``supersample == 1``, else a soft uint8 alpha: the fraction of each pixel
    covered, estimated on a ``supersample x supersample`` grid of sample points. Vectorized scanline:
    one crossing per (edge, row) pair, spans filled with a cumulative sum.
    """
    h, w = int(shape[0]), int(shape[1])
    s = int(supersample)
    H, W = h * s, w * s
    out = np.zeros((H, W + 1), np.int32)
    p = (np.asarray(polygon, np.float64) - np.asarray(offset, np.float64)) * s
    if len(p) < 3 or H == 0 or W == 0:
        return np.zeros((h, w), np.uint8)
    a, b = p, np.roll(p, -1, axis=0)
    ya, yb = a[:, 1], b[:, 1]
    keep = ya != yb
    a, b, ya, yb = a[keep], b[keep], ya[keep], yb[keep]
    ymin, ymax = np.minimum(ya, yb), np.maximum(ya, yb)
    # rows whose centre y = r + 0.5 satisfies ymin <= y < ymax (half-open: vertices counted once)
    r0 = np.clip(np.ceil(ymin - 0.5), 0, H).astype(np.int64)
    r1 = np.clip(np.ceil(ymax - 0.5), 0, H).astype(np.int64)
    counts = r1 - r0
    total = int(counts.sum())
    if total == 0:
        return np.zeros((h, w), np.uint8)
    edge = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    rows = r0[edge] + (np.arange(total) - starts)
    yc = rows + 0.5
    xa, xb = a[edge, 0], b[edge, 0]
    t = (yc - ya[edge]) / (yb[edge] - ya[edge])
    xs = xa + t * (xb - xa)
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # every row has an even number of crossings (closed polygon), so consecutive pairs are spans
    r_span = rows[0::2]
    c0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, W).astype(np.int64)
    c1 = np.clip(np.ceil(xs[1::2] - 0.5), 0, W).astype(np.int64)
    flat = out.reshape(-1)
    flat += np.bincount(r_span * (W + 1) + c0, minlength=flat.size).astype(np.int32)
    flat -= np.bincount(r_span * (W + 1) + c1, minlength=flat.size).astype(np.int32)
    inside = np.cumsum(out[:, :W], axis=1) > 0
    if s == 1:
        return inside.view(np.uint8) * np.uint8(255)
    cover = inside.reshape(h, s, w, s).mean(axis=(1, 3))
    return np.round(cover * 255).astype(np.uint8)


def rasterize_polygons(polygons: list[np.ndarray], shape: tuple[int, int],
                       offset: tuple[float, float] = (0.0, 0.0), supersample: int = 1) -> np.ndarray:
    """Union of several polygons (each filled even-odd), like COCO's multi-part segmentations."""
    out = None
    for poly in polygons:
        m = rasterize_polygon(poly, shape, offset, supersample)
        out = m if out is None else np.maximum(out, m)
    return out if out is not None else np.zeros(shape, np.uint8)


def tight_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the non-zero pixels, or None when the mask is empty."""
    x, y, w, h = cv2.boundingRect((mask > 0).view(np.uint8) if mask.dtype == bool else mask)
    return None if w == 0 or h == 0 else (x, y, w, h)


def crop_rgba(image: np.ndarray, mask: np.ndarray, x: int, y: int, margin: int) -> tuple[np.ndarray, tuple]:
    """RGBA crop of ``image`` (H, W, 3 RGB) around ``mask`` placed at (x, y), grown by ``margin`` px.

    The crop is clipped to the image; alpha is ``mask`` (uint8) and 0 in the margin; colour under
    alpha 0 is 0 (the bank's canonical form, so content ids match ``BankWriter.add``). Returns the
    crop and its (x, y, w, h) in image coordinates.
    """
    H, W = image.shape[:2]
    mh, mw = mask.shape
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(W, x + mw + margin), min(H, y + mh + margin)
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # the mask window may itself extend past the image: paste only the overlapping part
    mx0, my0 = max(0, -x), max(0, -y)
    dx0, dy0 = max(x, 0) - x0, max(y, 0) - y0
    mw_eff = min(mw - mx0, x1 - max(x, 0))
    mh_eff = min(mh - my0, y1 - max(y, 0))
    if mw_eff > 0 and mh_eff > 0:
        alpha[dy0:dy0 + mh_eff, dx0:dx0 + mw_eff] = mask[my0:my0 + mh_eff, mx0:mx0 + mw_eff]
    region = image[y0:y1, x0:x1]
    rgb = cv2.bitwise_and(region, region, mask=alpha)  # zero where alpha == 0
    return cv2.merge([*cv2.split(rgb), alpha]), (x0, y0, x1 - x0, y1 - y0)


def grabcut_box(image: np.ndarray, box: np.ndarray, *, iterations: int = 4, context: float = 0.3,
                max_side: int = 160, seed_fraction: float = 0.5) -> tuple[np.ndarray, int, int]:
    """Foreground mask of the object in ``box`` (x1, y1, x2, y2 pixels) by OpenCV GrabCut.

    GrabCut runs on the box grown by ``context`` (fraction of its size, at least 8 px) and
    downscaled so its longer side is at most ``max_side``; outside the box is background, and an
    ellipse of ``seed_fraction`` of the box size at its centre is foreground for sure. Returns
    (mask uint8 0/255 of the box window, x, y) with the window at (x, y) in the image.

    On 80 unclipped coco128 objects the defaults gave a mean IoU of 0.62 with the true polygons
    (the box itself: 0.53; plain rectangle-initialised GrabCut: 0.30, with 33 empty masks).
    """
    H, W = image.shape[:2]
    x1, y1, x2, y2 = box
    bx0, by0 = int(np.floor(max(0, x1))), int(np.floor(max(0, y1)))
    bx1, by1 = int(np.ceil(min(W, x2))), int(np.ceil(min(H, y2)))
    if bx1 - bx0 < 2 or by1 - by0 < 2:
        return np.zeros((max(0, by1 - by0), max(0, bx1 - bx0)), np.uint8), bx0, by0
    pad = int(max(8, context * max(bx1 - bx0, by1 - by0)))
    cx0, cy0 = max(0, bx0 - pad), max(0, by0 - pad)
    cx1, cy1 = min(W, bx1 + pad), min(H, by1 + pad)
    region = image[cy0:cy1, cx0:cx1]
    scale = min(1.0, max_side / max(region.shape[:2]))
    small = region if scale == 1.0 else cv2.resize(region, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    rx0, ry0 = int((bx0 - cx0) * scale), int((by0 - cy0) * scale)
    rx1, ry1 = int(np.ceil((bx1 - cx0) * scale)), int(np.ceil((by1 - cy0) * scale))
    # GrabCut needs some background samples: keep the rect one pixel inside the region
    rx0, ry0 = max(rx0, 1), max(ry0, 1)
    rx1, ry1 = min(rx1, sw - 1), min(ry1, sh - 1)
    if rx1 - rx0 < 2 or ry1 - ry0 < 2:
        return np.zeros((by1 - by0, bx1 - bx0), np.uint8), bx0, by0
    # seeds: outside the box is background, inside probably foreground, and a small ellipse at the
    # box centre surely foreground (keeps GrabCut from giving the whole box to the background when
    # object and surroundings look alike)
    gc = np.full((sh, sw), cv2.GC_BGD, np.uint8)
    gc[ry0:ry1, rx0:rx1] = cv2.GC_PR_FGD
    if seed_fraction > 0:
        cx, cy = (rx0 + rx1) // 2, (ry0 + ry1) // 2
        axes = (max(1, int((rx1 - rx0) * seed_fraction / 2)), max(1, int((ry1 - ry0) * seed_fraction / 2)))
        cv2.ellipse(gc, (cx, cy), axes, 0, 0, 360, int(cv2.GC_FGD), -1)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.uint8) * 255
    if scale != 1.0:
        fg = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_LINEAR)
        fg = np.where(fg >= 128, 255, 0).astype(np.uint8)
    window = fg[by0 - cy0:by1 - cy0, bx0 - cx0:bx1 - cx0]
    return np.ascontiguousarray(window), bx0, by0
