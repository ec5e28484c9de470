"""Pictures for people: label drawing and image grids (numpy + OpenCV, RGB uint8 in and out)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

__all__ = ["class_color", "draw_labels", "make_grid"]

_PASTED_MARK = (255, 255, 255)


def class_color(cls: int) -> tuple[int, int, int]:
    """A stable, saturated RGB colour per class id (golden-ratio hue walk)."""
    hue = int((int(cls) * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 200, 255]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def _name(cls: int, names: Mapping[int, str] | Sequence[str] | None) -> str:
    if names is None:
        return str(cls)
    if isinstance(names, Mapping):
        return str(names.get(cls, cls))
    return str(names[cls]) if 0 <= cls < len(names) else str(cls)


def _dashed_rect(img: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], color, thickness: int,
                 dash: int) -> None:
    (x1, y1), (x2, y2) = p1, p2
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        for s in range(a, b, 2 * dash):
            e = min(s + dash, b)
            if horizontal:
                cv2.line(img, (s, fixed), (e, fixed), color, thickness, cv2.LINE_AA)
            else:
                cv2.line(img, (fixed, s), (fixed, e), color, thickness, cv2.LINE_AA)


def draw_labels(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    polygons: Sequence[np.ndarray] | None = None,
    names: Mapping[int, str] | Sequence[str] | None = None,
    pasted: np.ndarray | None = None,
    mask_alpha: float = 0.45,
) -> np.ndarray:
    """Draw boxes (xyxy pixels), masks or polygons and class names on a copy of an RGB uint8 image.

    Objects flagged in ``pasted`` are marked distinctly: a white dashed frame around their coloured box and
    a ``+`` before their name. Masks are tinted in the class colour with their outline drawn; the work is
    done on each object's box crop, so cost grows with object area, not image size times objects.
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    h, w = out.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    pasted = np.zeros(len(boxes), bool) if pasted is None else np.asarray(pasted, bool).reshape(-1)
    thick = max(1, round(max(h, w) / 320))
    font_scale = max(0.35, max(h, w) / 1200)

    for i in range(len(boxes)):
        color = class_color(int(classes[i]))
        region = None
        if masks is not None:
            region = np.asarray(masks[i]) != 0
        elif polygons is not None and polygons[i] is not None and len(polygons[i]) >= 3:
            region = np.zeros((h, w), np.uint8)
            cv2.fillPoly(region, [np.round(np.asarray(polygons[i])).astype(np.int32).reshape(-1, 1, 2)], 1)
            region = region.astype(bool)
        if region is not None and region.any():
            ys, xs = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
            y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
            crop, sub = out[y0:y1, x0:x1], region[y0:y1, x0:x1]
            tint = (crop[sub].astype(np.float32) * (1 - mask_alpha) + np.float32(color) * mask_alpha)
            crop[sub] = tint.astype(np.uint8)
            contours, _ = cv2.findContours(sub.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(crop, contours, -1, color, 1, cv2.LINE_AA)
        x1b, y1b, x2b, y2b = np.round(boxes[i]).astype(int)
        cv2.rectangle(out, (x1b, y1b), (x2b, y2b), color, thick, cv2.LINE_AA)
        label = ("+" if pasted[i] else "") + _name(int(classes[i]), names)
        if pasted[i]:
            _dashed_rect(out, (x1b - thick - 1, y1b - thick - 1), (x2b + thick + 1, y2b + thick + 1),
                         _PASTED_MARK, thick, dash=max(4, 4 * thick))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1b - 2 if y1b - th - base - 2 >= 0 else y1b + th + base + 2
        tx = int(np.clip(x1b, 0, max(0, w - tw - 2)))
        bg, fg = (color, (0, 0, 0)) if not pasted[i] else (_PASTED_MARK, (0, 0, 0))
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty + 1), bg, -1)
        if pasted[i]:
            cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty + 1), color, 1)
        cv2.putText(out, label, (tx + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, fg, 1, cv2.LINE_AA)
    return out


def make_grid(
    images: Sequence[np.ndarray],
    *,
    cols: int | None = None,
    tile: int = 320,
    pad: int = 4,
    background: int = 255,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Tile RGB uint8 images into one grid; each is scaled to fit a ``tile`` x ``tile`` cell (aspect kept).

    ``cols`` defaults to about sqrt(len(images)); ``captions`` (optional) are written under each cell.
    """
    if not len(images):
        raise ValueError("make_grid: no images")
    n = len(images)
    cols = int(cols or max(1, round(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / cols))
    cap_h = 0
    if captions is not None:
        cap_h = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][1] + 8
    cell_h = tile + cap_h
    grid = np.full((rows * cell_h + (rows + 1) * pad, cols * tile + (cols + 1) * pad, 3), background, np.uint8)
    for k, img in enumerate(images):
        img = np.asarray(img, dtype=np.uint8)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        ih, iw = img.shape[:2]
        s = tile / max(ih, iw)
        nh, nw = max(1, round(ih * s)), max(1, round(iw * s))
        small = cv2.resize(img[:, :, :3], (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        r, c = divmod(k, cols)
        y0 = pad + r * (cell_h + pad) + (tile - nh) // 2
        x0 = pad + c * (tile + pad) + (tile - nw) // 2
        grid[y0:y0 + nh, x0:x0 + nw] = small
        if captions is not None and k < len(captions):
            ty = pad + r * (cell_h + pad) + tile + cap_h - 4
            cv2.putText(grid, str(captions[k])[:60], (pad + c * (tile + pad) + 2, ty), cv2.FONT_HERSHEY_SIMPLEX,
                        0.45, (40, 40, 40), 1, cv2.LINE_AA)
    return grid
