"""Per-instance augmentation before pasting: scale, aspect jitter, flip, rotation, colour jitter.

Kernels are pure functions on small arrays (the instance, never the target image). Colour jitter is one
3x4 affine colour matrix (brightness, contrast, saturation and a hue rotation about the grey axis compose into
a single matrix); :func:`to_channel_order` rewrites it for BGR images, and the engine composes it with the
harmonizer's affine so both are applied in one ``cv2.transform``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from genval_aug.lru import ProcessLRU

_LUMA_RGB = np.array([0.299, 0.587, 0.114], np.float64)
_EYE3 = np.eye(3)
_GREY_PROJ = np.ones((3, 1)) @ _LUMA_RGB[None, :]
_U = np.full(3, 1 / math.sqrt(3))
_GREY_CROSS = np.array([[0, -_U[2], _U[1]], [_U[2], 0, -_U[0]], [-_U[1], _U[0], 0]])
_GREY_OUTER = np.outer(_U, _U)


@dataclass
class ObjectPatch:
    """An augmented instance ready to paste: colour in the target channel order plus its alpha.

    ``rgb`` (h, w, 3) uint8 and ``alpha`` (h, w) uint8 are cropped to the visible (alpha > 0) extent.
    """

    rgb: np.ndarray
    alpha: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape[:2]


def crop_to_alpha(rgba: np.ndarray, label_threshold: int = 128) -> tuple[np.ndarray, int]:
    """Crop an RGBA instance to its visible extent; returns (crop, label area = #pixels alpha >= threshold)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"instance rgba must be (H, W, 4) uint8, got {rgba.shape} {rgba.dtype}")
    alpha = cv2.extractChannel(rgba, 3)
    x, y, w, h = cv2.boundingRect(alpha)
    if w == 0 or h == 0:
        return rgba[:0, :0], 0
    sub = alpha[y : y + h, x : x + w]
    _, m = cv2.threshold(sub, label_threshold - 1, 1, cv2.THRESH_BINARY)
    return rgba[y : y + h, x : x + w], int(cv2.countNonZero(m))


def crop_from_meta(rgba: np.ndarray, meta: dict | None, pad: int | None = None) -> tuple[np.ndarray, int] | None:
    """Fast path of :func:`crop_to_alpha` from bank metadata (``meta["mask"]`` = area and x, y, w, h bbox of
    alpha >= 128), padded for the soft edge below 128 by ``pad`` px (default: 8 px or 2% of the larger side);
    None when the metadata is missing or stale."""
    m = (meta or {}).get("mask")
    if not isinstance(m, dict) or "bbox" not in m or "area" not in m:
        return None
    H, W = rgba.shape[:2]
    if meta.get("width", W) != W or meta.get("height", H) != H:
        return None
    x, y, w, h = (int(v) for v in m["bbox"])
    if w <= 0 or h <= 0 or int(m["area"]) <= 0:
        return None
    if pad is None:
        pad = max(8, int(round(0.02 * max(H, W))))
    x0, y0, x1, y1 = max(x - pad, 0), max(y - pad, 0), min(x + w + pad, W), min(y + h + pad, H)
    return rgba[y0:y1, x0:x1], int(m["area"])


def sample_relative_size(
    rng: np.random.Generator,
    prior: dict[str, Any] | None,
    scale_range: tuple[float, float],
    prior_clip_std: float = 2.0,
) -> float:
    """Relative size r = sqrt(object area / image area) of a pasted instance.

    With a size prior (``rel_sqrt_area_mean``/``rel_sqrt_area_std`` from the bank) r ~ N(mean, std) clipped to
    mean +- ``prior_clip_std`` std and to ``scale_range``; otherwise log-uniform in ``scale_range``.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if prior:
        mean = prior.get("rel_sqrt_area_mean")
        std = prior.get("rel_sqrt_area_std") or 0.0
        if mean is not None and math.isfinite(float(mean)) and float(mean) > 0:
            mean, std = float(mean), max(float(std), 0.0)
            r = mean + std * float(rng.standard_normal())
            r = min(max(r, mean - prior_clip_std * std), mean + prior_clip_std * std)
            return float(min(max(r, lo), hi))
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def colour_matrix(
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    mean_luma: float,
) -> np.ndarray:
    """3x4 affine RGB colour matrix for a random colour jitter (torchvision ColorJitter-like ranges).

    brightness/contrast/saturation: factor uniform in [1 - v, 1 + v]; hue: rotation about the grey axis by
    uniform [-hue, hue] turns (hue=0.5 is a full turn).
    """
    b = rng.uniform(1 - brightness, 1 + brightness) if brightness > 0 else 1.0
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    s = rng.uniform(1 - saturation, 1 + saturation) if saturation > 0 else 1.0
    h = rng.uniform(-hue, hue) if hue > 0 else 0.0
    m = np.empty((3, 4))
    lin = s * _EYE3 + (1 - s) * _GREY_PROJ  # saturation: blend with luma
    if h:
        theta = 2 * math.pi * h  # rotation about the grey axis (Rodrigues)
        lin = (math.cos(theta) * _EYE3 + math.sin(theta) * _GREY_CROSS + (1 - math.cos(theta)) * _GREY_OUTER) @ lin
    m[:, :3] = (b * c) * lin
    m[:, 3] = b * (1 - c) * mean_luma
    return m


def target_size(
    crop_hw: tuple[int, int],
    label_area: int,
    image_hw: tuple[int, int],
    rel_size: float,
    aspect: float,
    min_side: int = 4,
) -> tuple[int, int]:
    """(h, w) of the resized instance crop so that its label area is ``rel_size**2`` of the image area.

    ``aspect`` multiplies w/h. The result fits inside the image and has a shorter side >= ``min_side``.
    """
    ch, cw = crop_hw
    H, W = image_hw
    area = max(label_area, 1)
    s = rel_size * math.sqrt(H * W) / math.sqrt(area)
    sx, sy = s * math.sqrt(aspect), s / math.sqrt(aspect)
    w, h = cw * sx, ch * sy
    fit = min(1.0, W / w, H / h)  # never larger than the image
    w, h = w * fit, h * fit
    grow = max(1.0, min_side / max(min(w, h), 1e-6))
    w, h = min(w * grow, W), min(h * grow, H)
    return max(int(round(h)), 1), max(int(round(w)), 1)


def shrink_factor(src_hw: tuple[int, int], size_hw: tuple[int, int]) -> int:
    """Integer box-filter factor :func:`resize_rgba` uses before its bilinear step (1 = none)."""
    (ch, cw), (h, w) = src_hw, size_hw
    if (h, w) == (ch, cw):
        return 1
    k = int(min(cw / w, ch / h))
    return k if k >= 2 else 1


def area_level(img: np.ndarray, k: int) -> np.ndarray:
    """``img`` box-filtered by the integer factor ``k`` (padded with zeros to a multiple of k first)."""
    if k < 2:
        return img
    ch, cw = img.shape[:2]
    pw, ph = -(-cw // k) * k, -(-ch // k) * k
    src = img
    if (pw, ph) != (cw, ch):
        src = cv2.copyMakeBorder(img, 0, ph - ch, 0, pw - cw, cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(src, (pw // k, ph // k), interpolation=cv2.INTER_AREA)


def finish_resize(level: np.ndarray, src_hw: tuple[int, int], size_hw: tuple[int, int], k: int) -> np.ndarray:
    """Bilinear step of :func:`resize_rgba` from ``area_level(src, k)`` (``src`` of shape ``src_hw``)."""
    h, w = size_hw
    ch, cw = src_hw
    if (h, w) == (ch, cw):
        return level
    if k >= 2:
        # keep the object's scale: the padded part maps to proportionally more output pixels
        pw, ph = -(-cw // k) * k, -(-ch // k) * k
        w, h = max(int(round(pw * w / cw)), 1), max(int(round(ph * h / ch)), 1)
    return cv2.resize(level, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_rgba(rgba: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an RGBA crop (or any 1-4 channel image) to (h, w) without aliasing, fast.

    Shrinking by more than 2x first box-filters by an integer factor k (OpenCV's fast INTER_AREA path needs
    the source to be a multiple of k: it is padded with transparent pixels, the object's scale is unchanged),
    then finishes bilinearly (a general INTER_AREA resize costs ~10x more). The result may therefore carry up
    to one transparent pixel of margin.
    """
    k = shrink_factor(rgba.shape[:2], size_hw)
    return finish_resize(area_level(rgba, k), rgba.shape[:2], size_hw, k)


def unbleed_source(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RGBA with no colour where alpha == 0, support = 255 where alpha > 0): the inputs of the unbleed."""
    _, support = cv2.threshold(cv2.extractChannel(rgba, 3), 0, 255, cv2.THRESH_BINARY)
    return cv2.bitwise_and(rgba, rgba, mask=support), support


def colour_samples(rgba: np.ndarray, area: int, n: int = 1024, threshold: int = 128) -> np.ndarray:
    """About ``n`` RGB colours of the pixels with alpha >= ``threshold``, on a regular grid (every such pixel
    when the grid catches fewer than 16 of a thin object), as an (N, 3) uint8 array; ``area``: the number of
    such pixels (sets the grid step)."""
    step = max(int(math.sqrt(max(area, 1) / n)), 1)
    sub = rgba[::step, ::step]
    out = sub[sub[..., 3] >= threshold][:, :3]
    if step > 1 and len(out) < min(16, area):  # a thin object the grid missed: take every label pixel
        out = rgba[rgba[..., 3] >= threshold][:, :3]
    return np.ascontiguousarray(out)


def _arrays_bytes(arrays: tuple[np.ndarray, ...]) -> int:
    return sum(a.nbytes for a in arrays)


def _freeze_arrays(arrays: tuple[np.ndarray, ...]) -> None:
    for a in arrays:
        a.setflags(write=False)


class SourceCache:
    """Per-process LRU of prepared sources (:func:`unbleed_source` box-filtered by each factor k, and
    :func:`colour_samples`) by key.

    Memoizes the work done at the instance's own resolution, so drawing the same instance again costs only
    the output-sized steps; results are identical with and without it. Keys must
    identify content (bank record ids are content hashes). ``max_bytes`` bounds the memory; 0 disables.
    Thread-safe; pickles empty, and a forked child starts empty (DataLoader workers hold their own).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._lru: ProcessLRU[tuple[np.ndarray, ...]] = ProcessLRU(self.max_bytes, _arrays_bytes)

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    @property
    def nbytes(self) -> int:
        return self._lru.bytes

    def __len__(self) -> int:
        return len(self._lru)

    def levels(self, key: Any, rgba: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(``area_level`` of the unbleed colour, of its support) at factor ``k`` for source ``rgba``."""

        def make() -> tuple[np.ndarray, np.ndarray]:
            colour, support = unbleed_source(rgba)
            return area_level(colour, k), area_level(support, k)

        return self._lru.get_or_create((key, rgba.shape, k), make, _freeze_arrays)

    def samples(self, key: Any, rgba: np.ndarray, area: int, threshold: int) -> np.ndarray:
        """:func:`colour_samples` of source ``rgba`` (read-only)."""
        if key is None or self.max_bytes <= 0:
            return colour_samples(rgba, area, threshold=threshold)
        return self._lru.get_or_create(
            (key, rgba.shape, "samples", threshold), lambda: (colour_samples(rgba, area, threshold=threshold),),
            _freeze_arrays,
        )[0]


def resize_rotate_flip(
    rgba: np.ndarray,
    size_hw: tuple[int, int],
    angle: float,
    flip: bool,
    unbleed: bool = True,
    cache: SourceCache | None = None,
    key: Any = None,
) -> np.ndarray:
    """Resize an RGBA crop to (h, w), rotate by ``angle`` degrees (canvas grows, new area transparent), flip.

    ``unbleed``: filter colours by normalized convolution over the pixels that have colour (alpha > 0), so
    the colourless (black, or arbitrary) RGB under fully transparent pixels does not bleed into the edge and
    draw a dark outline around the pasted object. Costs one extra single-channel resize (and warp).
    ``cache``/``key``: reuse the source-resolution work for a source seen before under the same ``key``
    (a content id; ``None`` = no caching); the result is the same.
    """
    support = None
    src_hw = rgba.shape[:2]
    k = shrink_factor(src_hw, size_hw)
    if unbleed:
        if cache is not None and key is not None and cache.max_bytes > 0:
            colour, support = cache.levels(key, rgba, k)
        else:
            colour, support = unbleed_source(rgba)
            colour, support = area_level(colour, k), area_level(support, k)
        support = finish_resize(support, src_hw, size_hw, k)
        out = finish_resize(colour, src_hw, size_hw, k)
    else:
        out = resize_rgba(rgba, size_hw)
    h, w = out.shape[:2]
    if angle:
        rad = math.radians(angle)
        cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
        nw, nh = int(math.ceil(w * cos + h * sin)), int(math.ceil(w * sin + h * cos))
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
        m[0, 2] += nw / 2.0 - w / 2.0
        m[1, 2] += nh / 2.0 - h / 2.0
        out = cv2.warpAffine(out, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if support is not None:
            support = cv2.warpAffine(support, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    if support is not None:
        # colour = filtered colour / filtered support (pixels with full support are unchanged);
        # divisor (s, s, s, 255) in one call: alpha / 255 * 255 leaves alpha unchanged
        out = cv2.divide(out, cv2.cvtColor(support, cv2.COLOR_GRAY2BGRA), scale=255)
    if flip:
        out = cv2.flip(out, 1)
    return out


def split_patch(rgba: np.ndarray, bgr: bool) -> ObjectPatch:
    """Split an RGBA patch into (colour in the image's channel order, alpha), re-cropped to alpha > 0
    (rotation adds transparent corners); (0, 0) arrays when no alpha > 0 is left."""
    alpha = cv2.extractChannel(rgba, 3)
    x, y, w, h = cv2.boundingRect(alpha)
    if w == 0 or h == 0:  # nothing left visible (a sparse or thin instance shrunk a lot): an empty patch
        return ObjectPatch(rgb=np.zeros((0, 0, 3), np.uint8), alpha=np.zeros((0, 0), np.uint8))
    rgba, alpha = rgba[y : y + h, x : x + w], alpha[y : y + h, x : x + w]
    colour = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGR if bgr else cv2.COLOR_RGBA2RGB)
    return ObjectPatch(rgb=colour, alpha=np.ascontiguousarray(alpha))


def shrink_patch(patch: ObjectPatch, max_hw: tuple[int, int]) -> ObjectPatch:
    """``patch`` shrunk (``INTER_AREA``, aspect kept) to fit inside ``max_hw``, re-cropped to alpha > 0
    ((0, 0) arrays when nothing stays visible)."""
    h, w = patch.shape
    f = min(max_hw[0] / h, max_hw[1] / w)
    size = (max(int(w * f), 1), max(int(h * f), 1))
    alpha = cv2.resize(patch.alpha, size, interpolation=cv2.INTER_AREA)
    x, y, bw, bh = cv2.boundingRect(alpha)
    if bw == 0 or bh == 0:
        return ObjectPatch(rgb=np.zeros((0, 0, 3), np.uint8), alpha=np.zeros((0, 0), np.uint8))
    rgb = cv2.resize(patch.rgb, size, interpolation=cv2.INTER_AREA)
    return ObjectPatch(rgb=np.ascontiguousarray(rgb[y : y + bh, x : x + bw]),
                       alpha=np.ascontiguousarray(alpha[y : y + bh, x : x + bw]))


def to_channel_order(matrix: np.ndarray, bgr: bool) -> np.ndarray:
    """A 3x4 RGB colour matrix rewritten to act on (and produce) BGR colours when ``bgr``."""
    if not bgr:
        return matrix
    return np.ascontiguousarray(matrix[::-1][:, [2, 1, 0, 3]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 3x4 colour affine ``x -> outer(inner(x))``."""
    out = outer[:, :3] @ inner
    out[:, 3] += outer[:, 3]
    return out


def apply_affine_uint8(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 colours through a 3x4 affine, rounded and saturated (``cv2.transform`` on few pixels;
    it can differ by one level where OpenCV's float32 arithmetic rounds the other way)."""
    out = pixels.astype(np.float64) @ matrix[:, :3].T
    out += matrix[:, 3]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def samples_luma(samples: np.ndarray) -> float:
    """Mean luma of (N, 3) RGB colours (e.g. :func:`colour_samples`); 0 when there are none."""
    return float((samples @ _LUMA_RGB).mean()) if len(samples) else 0.0


def mean_luma(rgba: np.ndarray, max_pixels: int = 1024) -> float:
    """Alpha-weighted mean luma (RGB order) of an RGBA patch, from a grid of at most ~``max_pixels`` pixels."""
    h, w = rgba.shape[:2]
    step = max(int(np.sqrt(h * w / max_pixels)), 1)
    sub = rgba[::step, ::step].reshape(-1, 4).astype(np.float32)
    wsum = float(sub[:, 3].sum())
    if wsum <= 0:
        return 0.0
    return float((sub[:, :3] @ _LUMA_RGB.astype(np.float32)) @ sub[:, 3] / wsum)
