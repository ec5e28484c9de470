"""Label bookkeeping for pasting: occlusion of existing (and earlier pasted) objects, boxes, masks, polygons.

Conventions (shared by every adapter):

- boxes are xyxy float pixels; the box of a pixel mask is its pixel extent ``(x_min, y_min, x_max + 1, y_max + 1)``;
- a pasted object's label mask is ``alpha >= label_threshold`` (128 by default), clipped to the image;
- objects are cut by every object pasted after them (paste order = z-order);
- an occluded object is kept when ``visible_area > 0``, ``visible_area / area_before >= min_visible_fraction`` and
  (its box moved by at most ``max_box_shift`` px on every side or ``visible_area >= min_remaining_area``), the
  mmdetection / X-Paste rule (10 px / 300 px) plus a visibility ratio;
- box-only objects: the paste's label mask inside the box estimates occlusion; the box shrinks to the extent of
  the uncovered part and the object is dropped when the uncovered fraction of the box is below
  ``box_min_visible_fraction``;
- polygon objects are rasterized (``cv2.fillPoly``) only when a paste touches them; afterwards their polygon is
  re-extracted from the cut mask: all parts and holes joined into one polygon by zero-width bridges
  (``polygon_parts="all"``, one polygon per object as YOLO-seg needs) or only the largest part (``"largest"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class OcclusionRules:
    """Thresholds deciding which occluded objects survive (see module docstring)."""

    min_visible_fraction: float = 0.1
    min_remaining_area: int = 300
    max_box_shift: float = 10.0
    box_min_visible_fraction: float = 0.3
    polygon_parts: str = "all"  # "all" | "largest"


# ----------------------------------------------------------------------------------------------- kernels


def mask_extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) pixel extent (exclusive max) of a bool/uint8 mask, None when empty."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8) if mask.dtype == bool else mask)
    if w == 0 or h == 0:
        return None
    return x, y, x + w, y + h


def keep_occluded(
    area_before: int, area_after: int, box_before: np.ndarray, box_after: np.ndarray | None, rules: OcclusionRules
) -> bool:
    """The occlusion drop rule for an object with an exact mask."""
    if area_after <= 0 or box_after is None:
        return False
    if area_after / max(area_before, 1) < rules.min_visible_fraction:
        return False
    shift = float(np.abs(np.asarray(box_after, np.float64) - np.asarray(box_before, np.float64)).max())
    return shift <= rules.max_box_shift or area_after >= rules.min_remaining_area


def rasterize_polygon(
    polygon: np.ndarray, H: int, W: int, box: np.ndarray | None = None
) -> tuple[int, int, np.ndarray]:
    """Rasterize a (K, 2) pixel polygon into a local bool mask: (x0, y0, mask) covering its clipped extent.

    ``box``: its :func:`polygon_box` when already known (saves two reductions).
    """
    pts = np.rint(np.asarray(polygon, np.float32)).astype(np.int32).reshape(-1, 2)
    if len(pts) == 0:
        return 0, 0, np.zeros((0, 0), bool)
    if box is None:
        box = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1)
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(box[2]), W), min(int(box[3]), H)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), bool)
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(m, [pts - np.array([x0, y0], np.int32)], 1)
    return x0, y0, m.view(bool)


def _closest_pair(a: np.ndarray, b: np.ndarray, max_points: int = 64) -> tuple[int, int, int]:
    """(index in a, index in b, squared distance) of a near-closest pair of vertices (vertices subsampled
    to at most ``max_points`` per side, so the cost stays bounded for long contours)."""
    sa = max(len(a) // max_points, 1)
    sb = max(len(b) // max_points, 1)
    pa, pb = a[::sa].astype(np.int64), b[::sb].astype(np.int64)
    dx = pa[:, 0, None] - pb[None, :, 0]
    dy = pa[:, 1, None] - pb[None, :, 1]
    d = dx * dx + dy * dy
    j = int(d.argmin())
    i, k = divmod(j, d.shape[1])
    return i * sa, k * sb, int(d.flat[j])


def _bridge(main: np.ndarray, part: np.ndarray, pair: tuple[int, int, int] | None = None) -> np.ndarray:
    """Join ``part`` into ``main`` through a zero-width bridge at (nearly) their closest points
    (``pair``: their :func:`_closest_pair` when already computed)."""
    i, k, _ = pair if pair is not None else _closest_pair(main, part)
    return np.concatenate([main[: i + 1], part[k:], part[: k + 1], main[i:]], axis=0)


def mask_to_polygon(
    mask: np.ndarray, parts: str = "all", min_part: float = 0.01, min_part_px: float = 4.0
) -> np.ndarray:
    """One (K, 2) float32 polygon (pixel coordinates of boundary pixels) describing a bool mask.

    ``parts="all"``: every outer contour and hole joined by zero-width bridges, so ``cv2.fillPoly`` of the
    polygon reproduces the mask up to the bridge lines and parts/holes smaller than ``min_part`` of the largest
    part (or ``min_part_px`` pixels); ``"largest"``: the largest outer contour only.
    Returns shape (0, 2) for an empty mask.
    """
    m = mask.view(np.uint8) if mask.dtype == bool else mask
    mode = cv2.RETR_CCOMP if parts == "all" else cv2.RETR_EXTERNAL
    contours, _ = cv2.findContours(m, mode, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c.reshape(-1, 2) for c in contours if len(c)]
    if len(contours) < 2:  # empty, or one part without holes (most pasted objects): nothing to order or join
        return contours[0].astype(np.float32) if contours else np.zeros((0, 2), np.float32)
    # ~ pixel count incl. boundary (Pick: area + boundary / 2 + 1); the boundary is the contour's length, not its
    # vertex count (CHAIN_APPROX_SIMPLE keeps 2 vertices of a 1-px-thin part of any length)
    sizes = np.array([cv2.contourArea(c) + 0.5 * cv2.arcLength(c, True) + 1.0 for c in contours])
    order = np.argsort(sizes)[::-1]
    if parts != "all":
        return contours[order[0]].astype(np.float32)
    poly = contours[order[0]]
    # slivers left by cutting along a soft edge are noise: drop parts/holes below min_part of the largest
    rest = [contours[j] for j in order[1:] if sizes[j] >= max(min_part_px, min_part * sizes[order[0]])]
    while rest:  # greedily attach the part closest to the polygon built so far (short bridges)
        pairs = [_closest_pair(poly, c) for c in rest]
        j = min(range(len(pairs)), key=lambda q: pairs[q][2])  # first minimum, as np.argmin
        poly = _bridge(poly, rest.pop(j), pairs[j])
    return poly.astype(np.float32)


def polygon_box(polygon: np.ndarray) -> np.ndarray:
    """Pixel extent box of a rasterized polygon (vertices rounded as in :func:`rasterize_polygon`)."""
    pts = np.round(polygon).astype(np.int64)
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1], np.float32)


def polygon_boxes(polygons: list[np.ndarray]) -> np.ndarray:
    """(N, 4) :func:`polygon_box` of many polygons at once (zeros for empty ones)."""
    n = len(polygons)
    out = np.zeros((n, 4), np.float32)
    lens = np.array([len(p) for p in polygons], np.int64)
    nz = np.flatnonzero(lens)
    if len(nz) == 0:
        return out
    pts = np.concatenate([polygons[i] for i in nz])
    starts = np.concatenate([[0], np.cumsum(lens[nz])[:-1]])
    # rounding is monotonic: round(min) == min(round), so only the 4 extremes per polygon get rounded
    out[nz, :2] = np.round(np.minimum.reduceat(pts, starts, axis=0))
    out[nz, 2:] = np.round(np.maximum.reduceat(pts, starts, axis=0)) + 1
    return out


# ----------------------------------------------------------------------------------------------- tracker


@dataclass
class _Object:
    cls: int
    box: np.ndarray  # current output box (input box until touched)
    source_index: int = -1  # index in the input targets, -1 for pasted
    instance_id: object = None
    mask: np.ndarray | None = None  # local bool mask (owned) once touched, or the pasted mask
    x0: int = 0
    y0: int = 0
    area_before: int = 0
    box_before: np.ndarray | None = None
    touched: bool = False
    cut: bool = False  # lost pixels to a later paste


class OcclusionTracker:
    """Tracks every object's visible part while instances are pasted one after another.

    ``mode`` is "masks", "polygons" or "boxes" (what the input targets carry); pasted objects always have
    exact masks and are returned in the same form as the input.
    """

    def __init__(
        self,
        boxes: np.ndarray,
        classes: np.ndarray,
        image_hw: tuple[int, int],
        masks: np.ndarray | None = None,
        polygons: list[np.ndarray] | None = None,
        rules: OcclusionRules | None = None,
    ) -> None:
        self.H, self.W = image_hw
        self.rules = rules or OcclusionRules()
        self.masks = masks
        self.polygons = polygons
        self.mode = "masks" if masks is not None else "polygons" if polygons is not None else "boxes"
        self.objects = [
            _Object(cls=int(c), box=np.asarray(b, np.float32), source_index=i) for i, (b, c) in enumerate(zip(boxes, classes, strict=True))
        ]
        self.n_original = len(self.objects)
        self._coverage: np.ndarray | None = None  # box-only: union of pasted label masks
        if self.mode == "polygons":
            self._poly_boxes = polygon_boxes(polygons)

    # -- state -------------------------------------------------------------------------------------------
    def occupied_boxes(self) -> np.ndarray:
        """Boxes of all objects so far (inputs as given, pasted ones at paste time), for placement."""
        if not self.objects:
            return np.zeros((0, 4), np.float32)
        return np.stack([o.box for o in self.objects])

    def _own_original(self, o: _Object) -> None:
        """Give an original object an owned local mask on first touch (copy / rasterize)."""
        i = o.source_index
        if self.mode == "masks":  # own only the mask's extent: later steps touch a crop, not H x W
            full = self.masks[i]
            ext = mask_extent(full)
            x0, y0, x1, y1 = ext if ext is not None else (0, 0, 0, 0)
            o.x0, o.y0, m = x0, y0, full[y0:y1, x0:x1].copy()
        else:
            o.x0, o.y0, m = rasterize_polygon(self.polygons[i], self.H, self.W, self._poly_boxes[i])
        o.mask = m
        o.area_before = int(np.count_nonzero(m))
        ext = mask_extent(m)
        o.box_before = (
            np.array([ext[0] + o.x0, ext[1] + o.y0, ext[2] + o.x0, ext[3] + o.y0], np.float32) if ext else o.box.copy()
        )
        o.touched = True

    @staticmethod
    def _cut(o: _Object, pm: np.ndarray, px: int, py: int) -> bool:
        """Remove the paste mask ``pm`` at (px, py) from an object's local mask; True if pixels were removed."""
        h, w = o.mask.shape
        ph, pw = pm.shape
        x0, y0 = max(px, o.x0), max(py, o.y0)
        x1, y1 = min(px + pw, o.x0 + w), min(py + ph, o.y0 + h)
        if x1 <= x0 or y1 <= y0:
            return False
        sub = o.mask[y0 - o.y0 : y1 - o.y0, x0 - o.x0 : x1 - o.x0]
        cover = pm[y0 - py : y1 - py, x0 - px : x1 - px]
        hit = bool(np.any(sub & cover))
        if hit:
            sub &= ~cover
        return hit

    def add(self, mask: np.ndarray, x: int, y: int, cls: int, instance_id: object = None) -> bool:
        """Register a pasted label mask (local bool (h, w) at top-left (x, y), may extend past the image).

        Cuts every earlier object, then appends the pasted one. Returns False (nothing registered) when the
        mask has no pixel inside the image.
        """
        h, w = mask.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.W), min(y + h, self.H)
        if x1 <= x0 or y1 <= y0:
            return False
        pm = mask[y0 - y : y1 - y, x0 - x : x1 - x]
        ext = mask_extent(pm)
        if ext is None:
            return False
        # crop the paste mask to its own extent so every later step works on the smallest region
        pm = np.ascontiguousarray(pm[ext[1] : ext[3], ext[0] : ext[2]])
        px, py = x0 + ext[0], y0 + ext[1]
        ph, pw = pm.shape
        box = np.array([px, py, px + pw, py + ph], np.float32)

        # originals
        if self.n_original:
            if self.mode == "masks":
                region = self.masks[:, py : py + ph, px : px + pw]
                hit = np.flatnonzero((region & pm).reshape(len(region), -1).any(axis=1))
            elif self.mode == "polygons":
                hit = np.flatnonzero(_intersects(self._poly_boxes, box))
            else:
                hit = np.array([], np.int64)
                if self._coverage is None:
                    self._coverage = np.zeros((self.H, self.W), bool)
                self._coverage[py : py + ph, px : px + pw] |= pm
            for i in hit:
                o = self.objects[int(i)]
                if not o.touched:
                    self._own_original(o)
                o.cut |= self._cut(o, pm, px, py)
        # earlier pasted objects
        for o in self.objects[self.n_original :]:
            if _intersects(o.box[None], box)[0]:
                o.cut |= self._cut(o, pm, px, py)
        area = int(np.count_nonzero(pm))
        self.objects.append(
            _Object(
                cls=int(cls), box=box, instance_id=instance_id, mask=pm.copy(), x0=px, y0=py,
                area_before=area, box_before=box.copy(), touched=True,
            )
        )
        return True

    # -- result ------------------------------------------------------------------------------------------
    def _finish_exact(self, o: _Object) -> tuple[bool, np.ndarray | None]:
        """(keep, new box) of an object with an owned mask."""
        ext = mask_extent(o.mask)
        if ext is None:
            return False, None
        box = np.array([ext[0] + o.x0, ext[1] + o.y0, ext[2] + o.x0, ext[3] + o.y0], np.float32)
        area = int(np.count_nonzero(o.mask))
        return keep_occluded(o.area_before, area, o.box_before, box, self.rules), box

    def _finish_box_only(self, o: _Object) -> tuple[bool, np.ndarray]:
        """(keep, new box) of a box-only original, estimated from the pasted coverage inside its box."""
        if self._coverage is None:
            return True, o.box
        b = o.box
        x0, y0 = int(np.floor(max(b[0], 0))), int(np.floor(max(b[1], 0)))
        x1, y1 = int(np.ceil(min(b[2], self.W))), int(np.ceil(min(b[3], self.H)))
        if x1 <= x0 or y1 <= y0:
            return True, o.box
        sub = self._coverage[y0:y1, x0:x1]
        covered = int(np.count_nonzero(sub))
        if covered == 0:
            return True, o.box
        visible = 1.0 - covered / sub.size
        free = ~sub
        ext = mask_extent(free)
        if ext is None or visible < self.rules.box_min_visible_fraction:
            return False, None
        # shrink only the sides that are fully covered, keep sub-pixel input coordinates otherwise
        nb = b.copy()
        if ext[0] > 0:
            nb[0] = x0 + ext[0]
        if ext[1] > 0:
            nb[1] = y0 + ext[1]
        if ext[2] < sub.shape[1]:
            nb[2] = x0 + ext[2]
        if ext[3] < sub.shape[0]:
            nb[3] = y0 + ext[3]
        return True, nb

    def result(self) -> dict:
        """Final labels: dict(boxes, classes, masks|polygons|None, kept, pasted, instance_ids, pasted_index)."""
        boxes, classes, masks_out, polys, kept, pasted, ids = [], [], [], [], [], [], []
        pasted_index: list[int | None] = []
        for o in self.objects:
            is_pasted = o.source_index < 0
            if is_pasted:
                pasted_index.append(None)
            mask_full: np.ndarray | None = None
            poly: np.ndarray | None = None
            if not o.touched and self.mode == "boxes" and not is_pasted:
                keep, box = self._finish_box_only(o)
            elif not o.touched or (not is_pasted and not o.cut):
                keep, box = True, o.box
                if self.mode == "masks":
                    mask_full = self.masks[o.source_index]
                elif self.mode == "polygons":
                    poly = np.array(self.polygons[o.source_index], np.float32)  # a copy, never the input
            else:
                # a pasted object nothing was pasted over keeps its paste-time box
                keep, box = self._finish_exact(o) if o.cut else (True, o.box_before)
                if keep and self.mode == "polygons":
                    local = mask_to_polygon(o.mask, self.rules.polygon_parts)
                    poly = local + np.array([o.x0, o.y0], np.float32)
                    bx, by, bw, bh = cv2.boundingRect(local)  # integer vertices: == polygon_box(poly)
                    box = np.array([bx + o.x0, by + o.y0, bx + bw + o.x0, by + bh + o.y0], np.float32)
                elif keep and self.mode == "masks":
                    if o.mask.shape == (self.H, self.W):
                        mask_full = o.mask
                    else:
                        mask_full = np.zeros((self.H, self.W), bool)
                        h, w = o.mask.shape
                        mask_full[o.y0 : o.y0 + h, o.x0 : o.x0 + w] = o.mask
            if not keep:
                continue
            if is_pasted:
                pasted_index[-1] = len(boxes)
            boxes.append(box)
            classes.append(o.cls)
            pasted.append(is_pasted)
            ids.append(o.instance_id)
            if not is_pasted:
                kept.append(o.source_index)
            if self.mode == "masks":
                masks_out.append(mask_full)
            elif self.mode == "polygons":
                polys.append(poly)
        n = len(boxes)
        out = {
            "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
            "classes": np.asarray(classes, np.int64).reshape(n),
            "masks": None,
            "polygons": None,
            "kept": np.asarray(kept, np.int64),
            "pasted": np.asarray(pasted, bool).reshape(n),
            "instance_ids": ids,
            "pasted_index": pasted_index,
        }
        if self.mode == "masks":
            out["masks"] = np.stack(masks_out).astype(bool, copy=False) if n else np.zeros((0, self.H, self.W), bool)
        elif self.mode == "polygons":
            out["polygons"] = polys
        return out


def _intersects(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Bool (M,) whether each xyxy box overlaps ``box`` with positive area."""
    if len(boxes) == 0:
        return np.zeros(0, bool)
    return (
        (np.minimum(boxes[:, 2], box[2]) > np.maximum(boxes[:, 0], box[0]))
        & (np.minimum(boxes[:, 3], box[3]) > np.maximum(boxes[:, 1], box[1]))
    )
