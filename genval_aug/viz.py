"""Pictures for people: contact sheets of a bank, label drawing, grids, and small generic drawing helpers.

Arrays are RGB(A) uint8 throughout; :func:`save_png` converts for OpenCV. Reusable pieces:
:func:`checkerboard`, :func:`over_checkerboard`, :func:`thumbnail`, :func:`fit`, :func:`tile`, :func:`put_caption`.
Label drawing: :func:`draw_labels` (boxes, masks or polygons, class names, pasted objects marked) and
:func:`make_grid` (captioned grid of pictures).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genval_aug.errors import BadRecordError, ConfigError
from genval_aug.paste.labels import mask_extent, rasterize_polygon

logger = logging.getLogger(__name__)

BG = (255, 255, 255)
CHECKER = ((205, 205, 205), (245, 245, 245))


def checkerboard(h: int, w: int, square: int = 8, colors=CHECKER) -> np.ndarray:
    """(h, w, 3) uint8 checkerboard, the usual backdrop that makes transparency visible."""
    yy, xx = np.indices((h, w))
    odd = ((yy // square + xx // square) % 2).astype(bool)
    out = np.empty((h, w, 3), np.uint8)
    out[~odd], out[odd] = colors[0], colors[1]
    return out


def over_checkerboard(rgba: np.ndarray, square: int = 8) -> np.ndarray:
    """Composite an RGBA image over a checkerboard -> RGB."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an HxWx4 RGBA image, got shape {rgba.shape}")
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = checkerboard(rgba.shape[0], rgba.shape[1], square).astype(np.float32)
    return (rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a) + 0.5).astype(np.uint8)


def thumbnail(rgba: np.ndarray, size: int | tuple[int, int], square: int = 8) -> np.ndarray:
    """RGBA scaled to fit ``size`` (w, h) and composited over a checkerboard filling the whole cell.

    Colour and alpha are resized premultiplied, so edges get no dark halo.
    """
    tw, th = (size, size) if isinstance(size, int) else size
    h, w = rgba.shape[:2]
    s = min(tw / w, th / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    prem = np.concatenate([rgba[..., :3].astype(np.float32) * a, a], axis=2)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    prem = cv2.resize(prem, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else prem
    out = checkerboard(th, tw, square).astype(np.float32)
    x0, y0 = (tw - nw) // 2, (th - nh) // 2
    region = out[y0:y0 + nh, x0:x0 + nw]
    region[:] = prem[..., :3] + region * (1.0 - prem[..., 3:4])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def fit(image: np.ndarray, size: int | tuple[int, int], fill=BG, upscale: bool = True) -> np.ndarray:
    """Scale ``image`` to fit in ``size`` (w, h) keeping its aspect ratio, centred on ``fill``."""
    tw, th = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    s = min(tw / w, th / h)
    if not upscale:
        s = min(s, 1.0)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else image
    channels = image.shape[2] if image.ndim == 3 else 1
    out = np.empty((th, tw, channels), np.uint8)
    out[:] = (tuple(fill) + (0,) * channels)[:channels]
    x0, y0 = (tw - nw) // 2, (th - nh) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small.reshape(nh, nw, channels)
    return out if image.ndim == 3 else out[..., 0]


def tile(images: Sequence[np.ndarray], cols: int, pad: int = 4, fill=BG) -> np.ndarray:
    """Grid of ``images`` (same channels), ``cols`` per row, each centred in a cell as large as the largest.

    Size: ``(rows * (ch + pad) + pad, cols * (cw + pad) + pad)`` with ``rows = ceil(n / cols)``.
    """
    if not images:
        raise ValueError("tile() needs at least one image")
    cols = max(1, int(cols))
    ch = max(i.shape[0] for i in images)
    cw = max(i.shape[1] for i in images)
    c = images[0].shape[2] if images[0].ndim == 3 else 1
    rows = -(-len(images) // cols)
    out = np.empty((rows * (ch + pad) + pad, cols * (cw + pad) + pad, c), np.uint8)
    out[:] = (tuple(fill) + (0,) * c)[:c]
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        h, w = im.shape[:2]
        y = pad + r * (ch + pad) + (ch - h) // 2
        x = pad + q * (cw + pad) + (cw - w) // 2
        out[y:y + h, x:x + w] = im.reshape(h, w, c)
    return out if images[0].ndim == 3 else out[..., 0]


def put_caption(image: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
                color=(20, 20, 20), thickness: int = 1, max_width: int | None = None) -> np.ndarray:
    """Draw ``text`` at ``org`` (x, baseline y) in place, shortened with '…' to ``max_width`` px."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    text = text.encode("ascii", "replace").decode()
    if max_width is not None:
        while len(text) > 1 and cv2.getTextSize(text, font, scale, thickness)[0][0] > max_width:
            text = text[:-2] + "~"
    cv2.putText(image, text, org, font, scale, color, thickness, cv2.LINE_AA)
    return image


def sheet_size(rows: int, per_class: int, cell: int = 96, pad: int = 4, label_width: int = 150,
               header: int = 28) -> tuple[int, int]:
    """(height, width) of a contact sheet with ``rows`` classes."""
    return header + rows * (cell + pad) + pad, label_width + per_class * (cell + pad) + pad


def contact_sheet(bank, out: str | os.PathLike | None = None, *, per_class: int = 8,
                  classes: Sequence[str] | None = None, max_classes: int | None = None, cell: int = 96,
                  pad: int = 4, label_width: int = 150, header: int = 28, seed: int = 0,
                  sources: Sequence[str] | None = None, title: str | None = None) -> np.ndarray:
    """One row per class: caption (name, count), then up to ``per_class`` instances over a checkerboard.

    ``bank``: an :class:`~genval_aug.bank.InstanceBank` or a path. Classes default to all, most frequent
    first (``max_classes`` keeps the first N). Instances are drawn without replacement with ``seed``;
    ``sources`` keeps only instances whose source kind is listed. Returns the RGB sheet
    (size :func:`sheet_size`) and writes it as PNG to ``out`` when given.
    """
    from genval_aug.bank import InstanceBank

    bank = bank if isinstance(bank, InstanceBank) else InstanceBank(bank)
    counts = bank.categories()
    if classes is None:
        names = sorted(counts, key=lambda k: (-counts[k], k))
    else:
        missing = [c for c in classes if c not in counts]
        if missing:
            raise ConfigError(f"{bank.path}: no instances of {', '.join(map(repr, missing))}")
        names = list(classes)
    if max_classes is not None:
        if max_classes < 1:
            raise ConfigError(f"max_classes must be >= 1, got {max_classes}")
        names = names[:max_classes]
    if not names:
        raise ConfigError(f"{bank.path}: the bank is empty, nothing to show")
    h, w = sheet_size(len(names), per_class, cell, pad, label_width, header)
    sheet = np.empty((h, w, 3), np.uint8)
    sheet[:] = BG
    rng = np.random.default_rng(seed)
    head = title if title is not None else f"{Path(bank.path).name}: {bank.count()} instances, {len(counts)} classes"
    put_caption(sheet, head, (pad + 2, header - 9), 0.55, max_width=w - 2 * pad)
    bad: list[str] = []  # unreadable records: their cells stay empty (`bank verify` names them)
    for r, name in enumerate(names):
        y = header + pad + r * (cell + pad)
        ids = list(bank.ids(name))
        if sources is not None:
            ids = [i for i in ids if _source_kind(bank, i, bad) in set(sources)]
        pick = rng.choice(len(ids), size=min(per_class, len(ids)), replace=False) if ids else []
        put_caption(sheet, name, (pad + 2, y + cell // 2 - 2), 0.5, max_width=label_width - 2 * pad)
        put_caption(sheet, f"{len(ids)} instance{'s' if len(ids) != 1 else ''}", (pad + 2, y + cell // 2 + 16),
                    0.4, color=(110, 110, 110), max_width=label_width - 2 * pad)
        for k, j in enumerate(sorted(pick)):
            try:
                inst = bank.get(ids[j])
            except BadRecordError as e:
                bad.append(str(e))
                continue
            x = label_width + k * (cell + pad)
            sheet[y:y + cell, x:x + cell] = thumbnail(inst.rgba, cell, square=max(4, cell // 12))
    if bad:
        logger.warning("contact sheet of %s: %d unreadable record(s) left out (first: %s); `genval-aug bank "
                       "verify` names them all", bank.path, len(bad), bad[0])
    if out is not None:
        save_png(sheet, out)
    return sheet


def _source_kind(bank: Any, record_id: str, bad: list[str]) -> str | None:
    """``source.kind`` of a record, None (and the error noted in ``bad``) when its metadata is unreadable."""
    try:
        return (bank.get_meta(record_id).get("source") or {}).get("kind")
    except BadRecordError as e:
        bad.append(str(e))
        return None


def save_png(rgb: np.ndarray, path: str | os.PathLike, compression: int = 9) -> Path:
    """Write an RGB(A) array as PNG (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    code = cv2.COLOR_RGBA2BGRA if rgb.ndim == 3 and rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    arr = cv2.cvtColor(rgb, code) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(str(p), arr, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
        raise OSError(f"could not write {p}")
    return p


# --------------------------------------------------------------------------------------------- labels
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


def _crop_to_pixels(x0: int, y0: int, mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """(x0, y0, bool mask) of ``mask`` (placed at x0, y0) cropped to its pixel extent, or None when empty."""
    ext = mask_extent(mask)
    if ext is None:
        return None
    ex0, ey0, ex1, ey1 = ext
    return x0 + ex0, y0 + ey0, mask[ey0:ey1, ex0:ex1].astype(bool, copy=False)


def draw_labels(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    polygons: Sequence[np.ndarray] | None = None,
    names: Mapping[int, str] | Sequence[str] | None = None,
    pasted: np.ndarray | None = None,
    mask_alpha: float = 0.35,
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
        local = None  # (x0, y0, bool mask of the object's extent)
        if masks is not None:
            local = _crop_to_pixels(0, 0, np.asarray(masks[i]) != 0)
        elif polygons is not None and polygons[i] is not None and len(polygons[i]) >= 3:
            local = _crop_to_pixels(*rasterize_polygon(polygons[i], h, w))
        if local is not None:
            x0, y0, sub = local
            crop = out[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]]
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
    tile_size: int = 320,
    pad: int = 4,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """RGB pictures fitted into ``tile_size`` square cells (aspect kept) and tiled ``cols`` per row.

    ``cols`` defaults to about sqrt(len(images)); ``captions`` (optional) are written under each cell.
    """
    if not len(images):
        raise ValueError("make_grid() needs at least one image")
    cols = int(cols or max(1, int(np.ceil(np.sqrt(len(images))))))
    cap_h = 18 if captions is not None else 0
    cells = []
    for k, img in enumerate(images):
        img = np.asarray(img, np.uint8)
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img[..., :3]
        cell = np.empty((tile_size + cap_h, tile_size, 3), np.uint8)
        cell[:] = BG
        cell[:tile_size] = fit(img, tile_size)
        if captions is not None and k < len(captions):
            put_caption(cell, str(captions[k]), (2, tile_size + cap_h - 5), 0.42, max_width=tile_size - 4)
        cells.append(cell)
    return tile(cells, cols, pad)
