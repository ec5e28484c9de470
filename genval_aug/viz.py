"""Pictures for people: contact sheets of a bank and small generic drawing helpers.

Arrays are RGB(A) uint8 throughout; :func:`save_png` converts for OpenCV. Reusable pieces:
:func:`checkerboard`, :func:`over_checkerboard`, :func:`thumbnail`, :func:`fit`, :func:`tile`, :func:`put_caption`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from genval_aug.errors import ConfigError

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
        names = names[:max_classes]
    if not names:
        raise ConfigError(f"{bank.path}: the bank is empty, nothing to show")
    h, w = sheet_size(len(names), per_class, cell, pad, label_width, header)
    sheet = np.empty((h, w, 3), np.uint8)
    sheet[:] = BG
    rng = np.random.default_rng(seed)
    head = title if title is not None else f"{Path(bank.path).name}: {bank.count()} instances, {len(counts)} classes"
    put_caption(sheet, head, (pad + 2, header - 9), 0.55, max_width=w - 2 * pad)
    for r, name in enumerate(names):
        y = header + pad + r * (cell + pad)
        ids = list(bank.ids(name))
        if sources is not None:
            ids = [i for i in ids if (bank.get_meta(i).get("source") or {}).get("kind") in set(sources)]
        pick = rng.choice(len(ids), size=min(per_class, len(ids)), replace=False) if ids else []
        put_caption(sheet, name, (pad + 2, y + cell // 2 - 2), 0.5, max_width=label_width - 2 * pad)
        put_caption(sheet, f"{len(ids)} instance{'s' if len(ids) != 1 else ''}", (pad + 2, y + cell // 2 + 16),
                    0.4, color=(110, 110, 110), max_width=label_width - 2 * pad)
        for k, j in enumerate(sorted(pick)):
            inst = bank.get(ids[j])
            x = label_width + k * (cell + pad)
            sheet[y:y + cell, x:x + cell] = thumbnail(inst.rgba, cell, square=max(4, cell // 12))
    if out is not None:
        save_png(sheet, out)
    return sheet


def save_png(rgb: np.ndarray, path: str | os.PathLike, compression: int = 9) -> Path:
    """Write an RGB(A) array as PNG (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    code = cv2.COLOR_RGBA2BGRA if rgb.ndim == 3 and rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    arr = cv2.cvtColor(rgb, code) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(str(p), arr, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
        raise OSError(f"could not write {p}")
    return p
