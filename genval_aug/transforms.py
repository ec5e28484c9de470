"""torchvision transforms v2 adapter: :class:`GenValPaste` pastes bank instances into detection samples.

A thin converter around :class:`genval_aug.paste.PasteEngine`: it unpacks the sample (tv_tensors / plain
tensor / PIL image, ``BoundingBoxes`` in any axis-aligned format, per-instance ``Mask``, labels), runs the
framework-free core on a uint8 RGB array, and packs the result back into the same structure, types, dtypes and
box format. It changes the number of objects, so it overrides ``forward`` (like ``SanitizeBoundingBoxes``)
instead of transforming leaf by leaf.

Example::

    from torchvision.transforms import v2
    from genval_aug.transforms import GenValPaste, class_map_from_names

    paste = GenValPaste("cache/bank.lmdb", class_map=class_map_from_names(coco_names, "cache/bank.lmdb"),
                        seed=0)
    tf = v2.Compose([paste, v2.RandomHorizontalFlip(), v2.SanitizeBoundingBoxes()])
    image, target = tf(image, target)   # target: {"boxes": BoundingBoxes, "masks": Mask, "labels": Tensor, ...}
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import cv2
import numpy as np
import PIL.Image
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from genval_aug.bank.cache import DEFAULT_CACHE_MB
from genval_aug.class_map import class_map_from_names
from genval_aug.errors import TargetsError
from genval_aug.lazy_engine import LazyPasteEngine, dataloader_worker_id

logger = logging.getLogger(__name__)

__all__ = ["GenValPaste", "class_map_from_names"]

_AXIS_ALIGNED = ("XYXY", "XYWH", "CXCYWH")
_XYXY = tv_tensors.BoundingBoxFormat.XYXY


def _is_pure_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)


def _find_owner(obj: Any, leaf: Any, depth: int = 0) -> Mapping | None:
    """The mapping that holds ``leaf`` as a direct value (searched through dicts, lists and tuples)."""
    if depth > 4:
        return None
    if isinstance(obj, Mapping):
        if any(v is leaf for v in obj.values()):
            return obj
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return None
    for child in children:
        found = _find_owner(child, leaf, depth + 1)
        if found is not None:
            return found
    return None


def _labels_key(target: Mapping) -> str | None:
    """torchvision's default heuristic: key ``labels`` (any case), else the first key containing ``label``."""
    keys = [k for k in target if isinstance(k, str)]
    for k in keys:
        if k.lower() == "labels":
            return k
    for k in keys:
        if "label" in k.lower():
            return k
    return None


# --------------------------------------------------------------------------------------------- image io
_PIL_MODES = {"RGB": 3, "L": 1, "RGBA": 4}


def _image_to_array(img: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """(H, W, C) uint8 array for the core (C = 1, 3 or 4) + what is needed to restore type and dtype."""
    if isinstance(img, PIL.Image.Image):
        if img.mode not in _PIL_MODES:
            raise TargetsError(f"image: PIL mode {img.mode!r} is not supported (RGB, L or RGBA); convert it "
                               "first (e.g. torchvision.transforms.v2.RGB() before GenValPaste)")
        arr = np.asarray(img).reshape(img.height, img.width, _PIL_MODES[img.mode])
        return np.ascontiguousarray(arr), {"kind": "pil", "mode": img.mode}
    if not isinstance(img, torch.Tensor):
        raise TargetsError(f"image: expected a tv_tensors.Image, tensor or PIL image, got {type(img).__name__}")
    if img.ndim != 3:
        raise TargetsError(f"image: expected one (C, H, W) image, got shape {tuple(img.shape)} "
                           "(batches are not supported; apply GenValPaste per sample)")
    if img.shape[0] not in (1, 3, 4):
        raise TargetsError(f"image: {img.shape[0]} channels are not supported (1, 3 or 4)")
    t = img.as_subclass(torch.Tensor).detach().cpu()
    info: dict[str, Any] = {"kind": "tensor", "device": img.device}
    if t.dtype == torch.uint8:
        chw = t.contiguous().numpy()
        # cv2.merge interleaves the planes ~20x faster than numpy's strided transpose copy
        hwc = cv2.merge(list(chw)) if chw.shape[0] > 1 else chw.reshape(t.shape[1], t.shape[2], 1)
    elif t.dtype.is_floating_point:
        lo, hi = (float(v) for v in torch.aminmax(t.float() if t.dtype == torch.bfloat16 else t)) \
            if t.numel() else (0.0, 0.0)
        if not (np.isfinite([lo, hi]).all() and lo >= -1e-3 and hi <= 1 + 1e-3):
            raise TargetsError(f"image: float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                               "(put GenValPaste before v2.Normalize)")
        chw = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16; per-plane cv2 rounding + saturation is ~4x faster than numpy/torch here
        hwc = cv2.merge([cv2.convertScaleAbs(np.ascontiguousarray(plane), alpha=255.0) for plane in chw])
        hwc = hwc.reshape(t.shape[1], t.shape[2], t.shape[0])
        info["float"] = t
    else:
        raise TargetsError(f"image: dtype {img.dtype} is not supported (uint8, or float in [0, 1])")
    return np.ascontiguousarray(hwc), info


def _restore_image(orig: Any, arr_in: np.ndarray, arr_out: np.ndarray, info: dict[str, Any]) -> Any:
    """Put the core's output back into the input's type, dtype and device.

    Pixels the core did not change come back bit-exact, also for float images (the change is added to the
    original values as a delta).
    """
    arr_out = np.ascontiguousarray(arr_out).reshape(arr_in.shape)
    if info["kind"] == "pil":
        return PIL.Image.fromarray(arr_out[:, :, 0] if info["mode"] == "L" else arr_out, mode=info["mode"])
    if "float" in info:
        base = info["float"]
        h, w, c = arr_in.shape
        # bounding window of the changed pixels (boundingRect of the non-zero diff, channels side by side)
        x, y, bw, bh = cv2.boundingRect(cv2.absdiff(arr_out, arr_in).reshape(h, w * c))
        out = base.clone()
        if bw and bh:  # add the change as a delta, on the changed window only
            y0, y1, x0, x1 = y, y + bh, x // c, -(-(x + bw) // c)
            delta = cv2.subtract(arr_out[y0:y1, x0:x1], arr_in[y0:y1, x0:x1], dtype=cv2.CV_32F)
            delta = delta.reshape(y1 - y0, x1 - x0, c)  # OpenCV drops the channel axis of 1-channel images
            delta *= np.float32(1 / 255.0)
            win = out[:, y0:y1, x0:x1]
            win += torch.from_numpy(delta).permute(2, 0, 1).to(base.dtype)
            win.clamp_(0.0, 1.0)
    else:
        out = _to_chw(arr_out)
    out = out.to(info["device"])
    return tv_tensors.wrap(out, like=orig) if isinstance(orig, tv_tensors.TVTensor) else out


def _to_chw(hwc: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> a new contiguous (C, H, W) tensor (cv2.split into its planes, ~3x faster than
    torch's permute + contiguous)."""
    h, w, c = hwc.shape
    if c == 1:
        return torch.from_numpy(hwc.reshape(1, h, w).copy())
    out = torch.empty((c, h, w), dtype=torch.uint8)
    planes = list(out.numpy())
    written = cv2.split(hwc, planes)
    if any(a.ctypes.data != b.ctypes.data for a, b in zip(written, planes, strict=True)):  # OpenCV reallocated
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    return out


def _pixel_counts(masks: np.ndarray) -> np.ndarray:
    """Foreground pixels of each (H, W) mask of an (N, H, W) bool array (cv2.countNonZero: ~10x numpy's sum)."""
    return np.array([cv2.countNonZero(np.ascontiguousarray(m).view(np.uint8)) for m in masks], np.int64)


# --------------------------------------------------------------------------------------------- transform
class GenValPaste(v2.Transform):
    """Paste instances from a genval_aug bank into a detection / instance-segmentation sample.

    Args:
        bank: bank path, ``InstanceBank`` or ``BankSampler`` (picklable; each process opens the bank lazily).
        config: a ``PasteConfig`` (or a dict of its fields); ``**options`` override single fields
            (``n=(1, 3)``, ``blend="alpha"``, ``p=0.5``, ...).
        class_map: ``{bank category name: dataset label id}`` (see :func:`class_map_from_names`), a callable
            name -> id or None; None uses the bank's ``category_id``.
        seed: None (default) draws each sample's randomness from torch's global RNG, so ``torch.manual_seed``
            and the DataLoader's per-worker seeding make it reproducible like other v2 transforms. An int gives
            a private numpy stream per process seeded with ``(seed, epoch, DataLoader worker id)``, reproducible
            whatever torch does; call :meth:`set_epoch` each epoch (non-persistent workers restart the stream).
        extra_fields: fill values for pasted objects of other per-object target fields
            (``{"scores": 1.0}``); kept objects keep their rows. Unknown per-object fields raise ``TargetsError``.
        cache_mb: size of each process' LRU of decoded instances (``genval_aug.bank.CachedInstanceBank``, used
            when ``bank`` is a path or an ``InstanceBank``); 0 disables it.

    Input: ``(image, target)`` like the torchvision detection references, or a dict holding the image and the
    targets; ``target`` holds ``boxes`` (``BoundingBoxes``), ``labels`` (key found like
    ``SanitizeBoundingBoxes`` does), optionally ``masks`` (``Mask`` (N, H, W)), ``area``, ``iscrowd``.
    Output: the same structure; original objects that stay visible come first in order, pasted ones after;
    occluded masks are cut and their boxes recomputed; ``area`` is recomputed for changed objects (mask pixels,
    or box area without masks); ``iscrowd`` is 0 for pasted objects.

    Images: uint8 or float in [0, 1]; 3 channels (RGB), 1 (stays grayscale, pasted objects become gray) or
    4 (RGBA: objects go into the colour channels, their label masks become opaque in alpha). A box partly
    outside the canvas is returned unchanged while its object is untouched (clipped once it is occluded);
    zero-area boxes (left by a crop) pass through unchanged; boxes with their area entirely outside the
    canvas, mismatched lengths, rotated box formats, semantic (H, W) masks, key points, batches and images
    with other channel counts raise :class:`~genval_aug.errors.TargetsError` naming the field.
    """

    def __init__(
        self,
        bank: Any,
        *,
        config: Any = None,
        class_map: Mapping[str, int] | Callable[[str], int | None] | None = None,
        seed: int | None = None,
        extra_fields: Mapping[str, float | int | bool] | None = None,
        cache_mb: float = DEFAULT_CACHE_MB,
        **options: Any,
    ) -> None:
        super().__init__()
        self.paster = LazyPasteEngine(bank, config, class_map, cache_mb=cache_mb, **options)
        self.seed = None if seed is None else int(seed)
        self.extra_fields = dict(extra_fields or {})
        self.epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple | None = None

    # ------------------------------------------------------------------ randomness
    def set_epoch(self, epoch: int) -> None:
        """Start the stream of ``epoch`` (only matters with an int ``seed``)."""
        self.epoch = int(epoch)

    def _generator(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        wid = dataloader_worker_id()
        key = (os.getpid(), wid, self.epoch)
        if self._rng is None or self._rng_key != key:
            self._rng = np.random.default_rng([self.seed, self.epoch, 0 if wid is None else wid + 1])
            self._rng_key = key
        return self._rng

    # ------------------------------------------------------------------ forward
    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        flat, spec = tree_flatten(sample)
        p = _parse_sample(sample, flat, self.extra_fields)

        arr, img_info = _image_to_array(flat[p["image"]])
        h, w = arr.shape[:2]
        boxes: tv_tensors.BoundingBoxes = flat[p["boxes"]]
        if tuple(boxes.canvas_size) != (h, w):
            raise TargetsError(f"boxes: canvas_size {tuple(boxes.canvas_size)} differs from the image size {(h, w)}")
        n = boxes.shape[0]
        xyxy = F.convert_bounding_box_format(boxes, new_format=_XYXY).as_subclass(torch.Tensor)
        xyxy = xyxy.detach().cpu().to(torch.float64).numpy().reshape(-1, 4)
        bad = ~np.isfinite(xyxy).all(1) | (xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TargetsError(f"boxes[{i}]: invalid box {xyxy[i].tolist()} (xyxy; non-finite or x2 < x1 / y2 < y1)")
        # the core clips boxes partly outside the canvas (and rejects boxes entirely outside it)
        xyxy_in = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)

        labels: torch.Tensor = flat[p["labels"]]
        masks_in = None
        if p["masks"] is not None:
            mt = flat[p["masks"]]
            if tuple(mt.shape[-2:]) != (h, w):
                raise TargetsError(f"masks: mask size {tuple(mt.shape[-2:])} differs from the image size {(h, w)}")
            masks_in = mt.as_subclass(torch.Tensor).detach().cpu().numpy() != 0

        from genval_aug.paste import Targets

        targets = Targets(boxes=xyxy.astype(np.float32), classes=labels.detach().cpu().numpy().astype(np.int64),
                          masks=masks_in, polygons=None)
        res = self.paster(arr, targets, self._generator(), channel_order="rgb")

        kept = np.asarray(res.kept, dtype=np.int64).reshape(-1)
        pasted = np.asarray(res.pasted, dtype=bool).reshape(-1)
        nk, m = len(kept), len(pasted)
        if pasted[:nk].any() or not pasted[nk:].all() or len(res.targets.boxes) != m:
            raise RuntimeError("PasteEngine broke its contract: kept objects must come first, then pasted ones")
        if nk == n and m == n and np.array_equal(np.asarray(res.image).reshape(arr.shape), arr):
            return sample  # nothing pasted (p, or no room): the sample is returned untouched

        out_boxes = np.asarray(res.targets.boxes, dtype=np.float32).reshape(-1, 4)
        box_same = np.all(out_boxes[:nk] == xyxy_in[kept], axis=1)
        masks_out = None if masks_in is None else np.asarray(res.targets.masks, dtype=bool)
        changed = new_area = None
        if p["area"] is not None:  # pixel counts only when there is an area to update
            if masks_out is not None:
                px_out = _pixel_counts(masks_out)
                px_in = _pixel_counts(masks_in)[kept]
                changed = np.concatenate([~box_same | (px_out[:nk] != px_in), np.ones(m - nk, bool)])
                new_area = px_out.astype(np.float64)
            else:
                changed = np.concatenate([~box_same, np.ones(m - nk, bool)])
                new_area = ((out_boxes[:, 2] - out_boxes[:, 0]) * (out_boxes[:, 3] - out_boxes[:, 1])).astype(np.float64)

        repl: dict[int, Any] = {}
        repl[p["image"]] = _restore_image(flat[p["image"]], arr, np.asarray(res.image), img_info)
        repl[p["boxes"]] = _pack_boxes(boxes, out_boxes, kept, box_same)
        if p["masks"] is not None:
            repl[p["masks"]] = _pack_masks(flat[p["masks"]], masks_out)
        kept_t = torch.as_tensor(kept, device=labels.device)
        classes = np.asarray(res.targets.classes).reshape(-1)
        repl[p["labels"]] = torch.cat([labels[kept_t], torch.as_tensor(classes[nk:], dtype=labels.dtype,
                                                                         device=labels.device)])
        if p["area"] is not None:
            area = flat[p["area"]]
            new = torch.as_tensor(new_area, dtype=area.dtype, device=area.device)
            same = torch.as_tensor(~changed[:nk], device=area.device)
            new[:nk] = torch.where(same, area[kept_t], new[:nk])
            repl[p["area"]] = new
        if p["iscrowd"] is not None:
            crowd = flat[p["iscrowd"]]
            repl[p["iscrowd"]] = torch.cat([crowd[kept_t], crowd.new_zeros((m - nk, *crowd.shape[1:]))])
        for idx, fill in p["extra"]:
            field = flat[idx]
            repl[idx] = torch.cat([field[kept_t], field.new_full((m - nk, *field.shape[1:]), fill)])
        out_flat = [repl.get(i, leaf) for i, leaf in enumerate(flat)]
        return tree_unflatten(out_flat, spec)

    def extra_repr(self) -> str:
        return f"paster={self.paster!r}, seed={self.seed}"


# --------------------------------------------------------------------------------------------- parsing
def _parse_sample(sample: Any, flat: list[Any], extra_fields: Mapping[str, Any]) -> dict[str, Any]:
    """Leaf indices of image, boxes, masks, labels, area, iscrowd and extra per-object fields."""
    kp_type = getattr(tv_tensors, "KeyPoints", None)
    if any(isinstance(x, tv_tensors.Video) for x in flat):
        raise TargetsError("sample: videos are not supported by GenValPaste")
    if kp_type is not None and any(isinstance(x, kp_type) for x in flat):
        raise TargetsError("sample: KeyPoints are not supported by GenValPaste (pasted objects would hide them)")
    images = [i for i, x in enumerate(flat) if isinstance(x, (tv_tensors.Image, PIL.Image.Image))]
    if not images:
        images = [i for i, x in enumerate(flat) if _is_pure_tensor(x)][:1]
    if len(images) != 1:
        raise TargetsError(f"sample: expected exactly one image, found {len(images)}")
    boxes = [i for i, x in enumerate(flat) if isinstance(x, tv_tensors.BoundingBoxes)]
    if len(boxes) != 1:
        hint = ""
        if not boxes:  # e.g. the v1 detection references' targets: boxes as a plain tensor
            hint = (" (wrap plain box tensors: tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(H, W)), "
                    "and masks as tv_tensors.Mask; torchvision datasets: wrap_dataset_for_transforms_v2)")
        raise TargetsError(f"sample: expected exactly one tv_tensors.BoundingBoxes, found {len(boxes)}{hint}")
    bb = flat[boxes[0]]
    if bb.format.name not in _AXIS_ALIGNED:
        raise TargetsError(f"boxes: format {bb.format.name} is not supported (one of {_AXIS_ALIGNED})")
    if bb.ndim != 2 or bb.shape[-1] != 4:
        raise TargetsError(f"boxes: expected shape (N, 4), got {tuple(bb.shape)}")
    n = bb.shape[0]
    masks = [i for i, x in enumerate(flat) if isinstance(x, tv_tensors.Mask)]
    if len(masks) > 1:
        raise TargetsError(f"sample: expected at most one Mask, found {len(masks)}")
    if masks:
        mk = flat[masks[0]]
        if mk.ndim != 3:
            raise TargetsError(f"masks: expected per-instance masks (N, H, W), got shape {tuple(mk.shape)} "
                              "(semantic masks are not supported)")
        if mk.shape[0] != n:
            raise TargetsError(f"masks: {mk.shape[0]} masks for {n} boxes")

    target = _find_owner(sample, bb)
    if target is None:
        raise TargetsError("sample: the BoundingBoxes must sit in a dict target (e.g. (image, {'boxes': ..., "
                          "'labels': ...}) or {'image': ..., 'boxes': ..., 'labels': ...})")
    leaf_index = {id(x): i for i, x in enumerate(flat)}

    def index_of(key: str) -> int | None:
        if key not in target:
            return None
        val = target[key]
        if not isinstance(val, torch.Tensor) or id(val) not in leaf_index:
            hint = ""
            if isinstance(val, (list, tuple)):  # e.g. COCO's raw per-object lists, which no v2 transform updates
                hint = (" (torchvision's wrap_dataset_for_transforms_v2(..., target_keys='all') keeps COCO's raw "
                        "per-object lists; pass target_keys=('boxes', 'labels', 'masks', 'image_id') instead)")
            raise TargetsError(f"{key}: expected a tensor, got {type(val).__name__}{hint}")
        if val.ndim < 1 or val.shape[0] != n:
            raise TargetsError(f"{key}: {tuple(val.shape)[:1] or 'scalar'} entries for {n} boxes")
        return leaf_index[id(val)]

    lkey = _labels_key(target)
    if lkey is None:
        raise TargetsError(f"sample: no labels in the target (keys {sorted(map(str, target))}); "
                          "GenValPaste needs a 'labels' tensor to label pasted objects")
    labels_idx = index_of(lkey)
    lab = flat[labels_idx]
    if lab.ndim != 1 or lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise TargetsError(f"{lkey}: expected a 1-D integer tensor, got {lab.dtype} shape {tuple(lab.shape)}")
    area_key = next((k for k in target if isinstance(k, str) and k.lower() == "area"), None)
    crowd_key = next((k for k in target if isinstance(k, str) and k.lower() == "iscrowd"), None)
    handled = {id(flat[i]) for i in (*images, *boxes, *masks)}
    handled |= {id(target[k]) for k in (lkey, area_key, crowd_key) if k is not None}
    extra = []
    for k, v in target.items():
        if id(v) in handled or not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] != n:
            continue
        if k in extra_fields:  # also for an empty target: its pasted objects need their rows
            extra.append((index_of(k), extra_fields[k]))
            continue
        if n == 0:  # any empty tensor looks per-object here: only the named ones are filled
            continue
        raise TargetsError(f"{k}: a per-object field GenValPaste cannot fill for pasted objects; pass "
                          f"extra_fields={{{k!r}: <value for pasted objects>}} or drop it from the target")
    return {"image": images[0], "boxes": boxes[0], "masks": masks[0] if masks else None, "labels": labels_idx,
            "area": index_of(area_key) if area_key else None,
            "iscrowd": index_of(crowd_key) if crowd_key else None, "extra": extra}


def _pack_boxes(boxes: tv_tensors.BoundingBoxes, out_xyxy: np.ndarray, kept: np.ndarray,
                same: np.ndarray) -> tv_tensors.BoundingBoxes:
    """Core xyxy boxes -> the input's format and dtype; untouched kept boxes are returned exactly as given."""
    t = torch.from_numpy(out_xyxy.astype(np.float32))
    if boxes.format != _XYXY:
        t = F.convert_bounding_box_format(t, old_format=_XYXY, new_format=boxes.format)
    if not boxes.dtype.is_floating_point:
        t = t.round()
    t = t.to(dtype=boxes.dtype, device=boxes.device)
    orig = boxes.as_subclass(torch.Tensor)
    if same.any():
        rows = torch.as_tensor(np.flatnonzero(same), device=boxes.device)
        t[rows] = orig[torch.as_tensor(kept[same], device=boxes.device)]
    return tv_tensors.wrap(t, like=boxes)


def _pack_masks(masks: tv_tensors.Mask, out: np.ndarray) -> tv_tensors.Mask:
    """Bool core masks -> the input's dtype and foreground value (1, or e.g. 255 when the input used 255)."""
    out = np.ascontiguousarray(out)
    if masks.dtype == torch.uint8:
        t = torch.from_numpy(out.view(np.uint8))  # bool bytes are 0/1: a free reinterpretation
    else:
        t = torch.from_numpy(out)
    if masks.dtype not in (torch.bool, torch.uint8):
        t = t.to(masks.dtype)
    if masks.dtype != torch.bool and len(masks) and not masks.dtype.is_floating_point:
        scale = int(masks.amax())  # every mask: the first may be empty (e.g. emptied by an earlier crop)
        if scale > 1:
            t = t * scale  # a new tensor: never scale the core's bool array in place
    return tv_tensors.Mask(t.to(masks.device))
