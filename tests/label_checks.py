"""Independent label checks for paste results, plus loaders for real test data (no genval_aug imports).

Reused by the adapters' tests: parse coco128-seg YOLO-seg labels with ``cv2.fillPoly`` into masks/boxes, an
in-memory instance source over ``shared/data/rgba_objects``, and ``check_paste_result`` which re-derives
what the labels must be from the inputs and the pasted label masks.

Box convention checked: the box of a pixel mask is (x_min, y_min, x_max + 1, y_max + 1).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------- data


def rasterize(polygon: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bool (H, W) mask of a pixel polygon (vertices rounded), as every check here rasterizes."""
    m = np.zeros((H, W), np.uint8)
    pts = np.round(np.asarray(polygon, np.float64)).astype(np.int32).reshape(-1, 2)
    if len(pts):
        cv2.fillPoly(m, [pts], 1)
    return m.astype(bool)


def extent_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@dataclass
class Sample:
    name: str
    image: np.ndarray  # RGB uint8
    classes: np.ndarray
    polygons: list[np.ndarray]
    masks: np.ndarray
    boxes: np.ndarray


def load_yolo_seg(image_path: Path, label_path: Path, size: int | None = None) -> Sample:
    """Read a coco128-seg image (as RGB) and its YOLO-seg polygons; optionally resize to size x size.

    Objects whose rasterized polygon is empty are dropped; boxes are the masks' pixel extents.
    """
    bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(image_path)
    if size is not None:
        bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR)
    H, W = bgr.shape[:2]
    classes, polys, masks, boxes = [], [], [], []
    text = label_path.read_text() if label_path.exists() else ""
    for line in text.splitlines():
        vals = line.split()
        if len(vals) < 7:
            continue
        xy = np.array(vals[1:], np.float64).reshape(-1, 2) * np.array([W, H])
        poly = xy.astype(np.float32)
        m = rasterize(poly, H, W)
        b = extent_box(m)
        if b is None:
            continue
        classes.append(int(float(vals[0])))
        polys.append(poly)
        masks.append(m)
        boxes.append(b)
    n = len(classes)
    return Sample(
        image_path.stem,
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
        np.array(classes, np.int64).reshape(n),
        polys,
        np.array(masks, bool).reshape(n, H, W),
        np.array(boxes, np.float32).reshape(n, 4),
    )


def coco128_samples(root: Path, limit: int | None = None, size: int | None = None, min_objects: int = 1) -> list[Sample]:
    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    out = []
    for p in images:
        s = load_yolo_seg(p, root / "labels" / "train2017" / (p.stem + ".txt"), size)
        if len(s.classes) >= min_objects:
            out.append(s)
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass
class MemoryInstance:
    id: str
    category: str
    category_id: int | None
    rgba: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def alpha(self) -> np.ndarray:
        return self.rgba[..., 3]

    @property
    def mask(self) -> np.ndarray:
        return self.rgba[..., 3] >= 128


class MemorySource:
    """In-memory instance source with the BankSampler interface: ``sample(rng, n)`` and ``size_prior``."""

    def __init__(self, instances: list[MemoryInstance], priors: dict[str, dict] | None = None) -> None:
        if not instances:
            raise ValueError("MemorySource needs at least one instance")
        self.instances = instances
        self.priors = priors or {}

    def sample(self, rng: np.random.Generator, n: int) -> list[MemoryInstance]:
        return [self.instances[int(i)] for i in rng.integers(0, len(self.instances), size=n)]

    def size_prior(self, category: str) -> dict | None:
        return self.priors.get(category)


def load_rgba_objects(root: Path, coco_categories: Path, max_side: int | None = 400) -> list[MemoryInstance]:
    """The rembg cut-outs that have a COCO class, as RGBA instances (cropped to alpha, optionally downscaled)."""
    names = {c["name"]: c for c in json.loads(coco_categories.read_text())["categories"]}
    out = []
    with open(root / "objects.csv", newline="") as f:
        for row in csv.DictReader(f):
            coco = row.get("coco_class") or ""
            if not coco or coco not in names:
                continue
            bgra = cv2.imread(str(root / row["file"]), cv2.IMREAD_UNCHANGED)
            rgba = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)
            x, y, w, h = cv2.boundingRect(rgba[..., 3])
            rgba = rgba[y : y + h, x : x + w]
            if max_side and max(h, w) > max_side:
                f_ = max_side / max(h, w)
                rgba = cv2.resize(rgba, (max(int(w * f_), 1), max(int(h * f_), 1)), interpolation=cv2.INTER_AREA)
            cat = names[coco]
            out.append(MemoryInstance(row["file"], coco, int(cat["yolo_index"]), np.ascontiguousarray(rgba)))
    return out


# ----------------------------------------------------------------------------------------------- checks


def _paste_full_masks(res, H: int, W: int) -> list[np.ndarray]:
    """Each placement's label mask as a full (H, W) bool image, in paste order."""
    out = []
    for pl in res.placements:
        m = np.zeros((H, W), bool)
        lab = pl["label_mask"]
        x, y = pl["xy"]
        h, w = lab.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        m[y0:y1, x0:x1] = lab[y0 - y : y1 - y, x0 - x : x1 - x]
        out.append(m)
    return out


def _keep_rule(area_before, area_after, box_before, box_after, cfg) -> bool:
    if area_after == 0:
        return False
    if area_after / max(area_before, 1) < cfg.min_visible_fraction:
        return False
    shift = np.abs(np.asarray(box_after, float) - np.asarray(box_before, float)).max()
    return shift <= cfg.max_box_shift or area_after >= cfg.min_remaining_area


def _check_polygon_mask(got: np.ndarray, expected: np.ndarray, min_iou: float, what: str) -> None:
    """A re-extracted polygon covers its visible pixels (recall >= 0.95) and little else (IoU >= min_iou; the
    zero-width bridges joining several parts rasterize to extra 1-px lines)."""
    inter = int((got & expected).sum())
    recall = inter / max(int(expected.sum()), 1)
    iou = inter / max(int((got | expected).sum()), 1)
    assert recall >= 0.95, f"{what}: polygon misses {1 - recall:.1%} of the visible mask"
    assert iou >= min_iou, f"{what}: polygon IoU {iou:.3f} < {min_iou}"


def check_paste_result(
    inp,
    res,
    image_hw: tuple[int, int],
    num_classes: int,
    cfg,
    mode: str,
    polygon_iou: float = 0.75,
) -> dict:
    """Assert every label invariant of a paste result; returns counters (pasted, dropped, occluded).

    ``inp`` has boxes/classes and masks (mode "masks"), polygons (mode "polygons") or neither ("boxes").
    ``cfg`` is the PasteConfig used (thresholds). Expected masks are recomputed here from the inputs and the
    placements' label masks, independently of the engine's bookkeeping.
    """
    H, W = image_hw
    t = res.targets
    n = len(t.boxes)
    assert t.boxes.shape == (n, 4) and t.boxes.dtype == np.float32
    assert t.classes.shape == (n,) and t.classes.dtype == np.int64
    assert res.pasted.shape == (n,) and len(res.instance_ids) == n
    n_kept = len(res.kept)
    assert not res.pasted[:n_kept].any() and res.pasted[n_kept:].all(), "originals first, then pasted"
    assert np.all(np.diff(res.kept) > 0), "kept originals stay in order"
    assert np.all(t.boxes[:, 0] >= 0) and np.all(t.boxes[:, 1] >= 0)
    assert np.all(t.boxes[:, 2] <= W) and np.all(t.boxes[:, 3] <= H)
    assert np.all(t.boxes[:, 2] > t.boxes[:, 0]) and np.all(t.boxes[:, 3] > t.boxes[:, 1]), "no empty boxes"
    assert np.all((t.classes >= 0) & (t.classes < num_classes)), "classes valid"
    assert np.array_equal(t.classes[:n_kept], np.asarray(inp.classes)[res.kept])
    assert all(i is None for i in res.instance_ids[:n_kept]) and all(i is not None for i in res.instance_ids[n_kept:])

    pms = _paste_full_masks(res, H, W)
    union = np.zeros((H, W), bool)
    for m in pms:
        union |= m
    later = [np.zeros((H, W), bool) for _ in pms]  # union of masks pasted after each paste
    acc = np.zeros((H, W), bool)
    for j in range(len(pms) - 1, -1, -1):
        later[j] = acc.copy()
        acc |= pms[j]
    out_of_pasted = {pl["output_index"]: j for j, pl in enumerate(res.placements) if pl["output_index"] is not None}
    assert sorted(out_of_pasted) == list(range(n_kept, n)), "every pasted output object has a placement"
    for pl in res.placements:
        if pl["output_index"] is not None:
            assert t.classes[pl["output_index"]] == pl["class"]

    stats = {"pasted": n - n_kept, "dropped": len(inp.classes) - n_kept, "occluded": 0}
    n_in = len(inp.classes)
    if mode in ("masks", "polygons"):
        if mode == "masks":
            assert t.masks is not None and t.polygons is None
            assert t.masks.shape == (n, H, W) and t.masks.dtype == bool
            in_masks = [np.asarray(m, bool) for m in inp.masks]
            out_masks = list(t.masks)
        else:
            assert t.polygons is not None and t.masks is None and len(t.polygons) == n
            in_masks = [rasterize(p, H, W) for p in inp.polygons]
            out_masks = [rasterize(p, H, W) for p in t.polygons]
        for k, m in enumerate(out_masks):
            assert m.any(), f"object {k} has an empty mask"
            eb = extent_box(m)
            assert np.array_equal(t.boxes[k], eb), f"object {k}: box {t.boxes[k]} != mask extent {eb}"
        kept_set = set(res.kept.tolist())
        for i in range(n_in):
            expected = in_masks[i] & ~union
            before, after = int(in_masks[i].sum()), int(expected.sum())
            touched = after != before
            if i in kept_set:
                k = int(np.searchsorted(res.kept, i))
                if mode == "masks":
                    assert np.array_equal(out_masks[k], expected), f"original {i}: mask != mask_in & ~pasted"
                else:
                    _check_polygon_mask(out_masks[k], expected, polygon_iou, f"original {i}")
                    if not touched:
                        np.testing.assert_array_equal(t.polygons[k], inp.polygons[i])
                if touched:
                    stats["occluded"] += 1
                    assert _keep_rule(before, after, extent_box(in_masks[i]), extent_box(expected), cfg)
            else:
                assert touched, f"original {i} dropped without being occluded"
                assert not _keep_rule(before, after, extent_box(in_masks[i]), extent_box(expected), cfg), (
                    f"original {i} dropped but {after}/{before} px visible"
                )
        for j, pl in enumerate(res.placements):
            expected = pms[j] & ~later[j]
            before, after = int(pms[j].sum()), int(expected.sum())
            oi = pl["output_index"]
            if oi is None:
                assert not _keep_rule(before, after, extent_box(pms[j]), extent_box(expected), cfg)
                continue
            if mode == "masks":
                assert np.array_equal(out_masks[oi], expected), f"pasted {j}: mask != label & ~later pastes"
            else:
                _check_polygon_mask(out_masks[oi], expected, polygon_iou, f"pasted {j}")
    else:
        assert t.masks is None and t.polygons is None
        for k, i in enumerate(res.kept):
            b_in, b_out = np.asarray(inp.boxes[i], np.float32), t.boxes[k]
            assert np.all(b_out[:2] >= np.maximum(b_in[:2], 0) - 1e-4) and np.all(b_out[2:] <= np.minimum(b_in[2:], [W, H]) + 1e-4)
        kept_set = set(res.kept.tolist())
        for i in range(n_in):
            b = np.asarray(inp.boxes[i])
            x0, y0 = int(np.floor(max(b[0], 0))), int(np.floor(max(b[1], 0)))
            x1, y1 = int(np.ceil(min(b[2], W))), int(np.ceil(min(b[3], H)))
            covered = union[y0:y1, x0:x1].mean() if (x1 > x0 and y1 > y0) else 0.0
            if i not in kept_set:
                assert 1 - covered < cfg.box_min_visible_fraction, f"box {i} dropped at {covered:.2f} covered"
            else:
                assert 1 - covered >= cfg.box_min_visible_fraction or covered == 0
        for j, pl in enumerate(res.placements):
            oi = pl["output_index"]
            if oi is not None:
                assert np.array_equal(t.boxes[oi], extent_box(pms[j] & ~later[j]))
    return stats


def check_pixels(image_in: np.ndarray, res, margin: int = 0) -> None:
    """Pixels outside every pasted rectangle (grown by ``margin``) are unchanged; inside, something changed."""
    H, W = image_in.shape[:2]
    outside = np.ones((H, W), bool)
    for pl in res.placements:
        x0, y0, x1, y1 = pl["rect"]
        outside[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = False
    assert res.image.shape == image_in.shape and res.image.dtype == image_in.dtype
    assert np.array_equal(res.image[outside], image_in[outside]), "pixels outside the paste rectangles changed"
    if res.placements:
        assert not np.array_equal(res.image, image_in), "nothing changed although instances were pasted"
