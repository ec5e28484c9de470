"""albumentations (2.0.x, MIT) adapter: :class:`GenValPaste` pastes bank instances and adds their objects.

A thin converter around :class:`genval_aug.paste.PasteEngine`, used inside ``A.Compose(..., bbox_params=...)``::

    import albumentations as A
    from genval_aug.albumentations import GenValPaste

    tf = A.Compose(
        [GenValPaste("cache/bank.lmdb", class_map={"person": 0, "car": 2}, p=1.0),
         A.HorizontalFlip(), A.RandomBrightnessContrast()],
        bbox_params=A.BboxParams(format="coco", label_fields=["class_labels"]),
        seed=0,
    )
    out = tf(image=image, bboxes=bboxes, class_labels=labels, masks=masks)   # masks: list or (N, H, W)

The transform changes the number of boxes the way albumentations' own ``Mosaic`` does: inside the pipeline
boxes are normalized ``[x_min, y_min, x_max, y_max, *encoded label fields]`` rows; ``apply_to_bboxes``
returns the new rows (kept originals first, then pasted), with pasted labels encoded by the pipeline's own
``LabelManager``, so ``bbox_params`` formats and ``min_visibility`` / ``min_area`` filtering downstream work
unchanged. ``masks`` (one per box) are cut where pasted objects cover them and pasted masks are appended;
objects hidden by pasted ones are removed from boxes, every label field and masks together.
Albumentations itself never links ``masks`` to ``bboxes``: its final box filtering (``min_visibility``,
``min_area``) drops boxes without dropping masks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from albumentations.core.transforms_interface import DualTransform

from genval_aug.bank.cache import DEFAULT_CACHE_MB
from genval_aug.class_map import class_map_from_names
from genval_aug.errors import ConfigError, TargetsError
from genval_aug.lazy_engine import LazyPasteEngine, dataloader_worker_id

logger = logging.getLogger(__name__)

__all__ = ["GenValPaste", "class_map_from_names"]


def _to_uint8(img: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 view for the core ((H, W), (H, W, 1), (H, W, 3) or (H, W, 4)) + what restores the dtype."""
    if not isinstance(img, np.ndarray):
        raise TargetsError(f"image: expected a numpy array, got {type(img).__name__}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))):
        raise TargetsError(f"image: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {img.shape}")
    info: dict[str, Any] = {"dtype": img.dtype}
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img), info
    if np.issubdtype(img.dtype, np.floating):
        lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 0.0)
        if not (np.isfinite([lo, hi]).all() and lo >= -1e-3 and hi <= 1 + 1e-3):
            raise TargetsError(f"image: float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                               "(put GenValPaste before A.Normalize)")
        info["float"] = img
        return (img * 255.0).round().clip(0, 255).astype(np.uint8), info
    raise TargetsError(f"image: dtype {img.dtype} is not supported (uint8, or float32 in [0, 1])")


def _from_uint8(arr_in: np.ndarray, arr_out: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Back to the input's dtype; unchanged pixels are bit-exact (float: the change is added as a delta)."""
    arr_out = np.asarray(arr_out).reshape(arr_in.shape)
    if "float" not in info:
        return arr_out
    delta = (arr_out.astype(np.float32) - arr_in.astype(np.float32)) / 255.0
    return np.clip(info["float"] + delta, 0.0, 1.0).astype(info["dtype"])


class GenValPaste(DualTransform):
    """Paste instances from a genval_aug bank; adds boxes, label-field values and masks.

    Args:
        bank: bank path (or an ``InstanceBank``; serialized as its path).
        config: ``PasteConfig`` fields as a dict (or a ``PasteConfig``): ``{"n": [1, 3], "blend": "alpha"}``.
        class_map: ``{bank category name: dataset class id}`` (see :func:`class_map_from_names`); None uses
            the bank's ``category_id``. For string label fields pasted objects get the bank category name.
        label_field: which ``bbox_params.label_fields`` entry holds the class (default: the first).
        label_defaults: values for pasted objects in the other label fields (``{"iscrowd": 0}``).
        class_names: on images without objects, whose empty label list cannot show whether the class field
            holds names or ids: True gives pasted objects names, False ids, None what this process last saw
            (ids before any labels were seen). With objects the labels decide.
        cache_mb: size of each process' LRU of decoded instances (``genval_aug.bank.CachedInstanceBank``);
            0 disables it.
        p: probability of applying the transform (like every albumentations transform; the engine's own
            ``PasteConfig.p`` is left at its default).

    Randomness comes from the transform's albumentations generator (``A.Compose(seed=...)``). In a torch
    DataLoader worker the generator is split by worker id on first use, since albumentations 2.0.8 copies
    the same state into every worker. Images: uint8 or float32 in [0, 1]; RGB, grayscale or RGBA
    (pasted label masks become opaque in alpha).
    Not supported (``TargetsError``): a semantic ``mask``, ``keypoints``, ``images`` batches.
    """

    _targets = ()  # replaced by the explicit ``targets`` mapping below

    def __init__(
        self,
        bank: Any,
        config: Mapping[str, Any] | Any | None = None,
        class_map: Mapping[str, int] | None = None,
        label_field: str | None = None,
        label_defaults: Mapping[str, Any] | None = None,
        p: float = 0.5,
        cache_mb: float = DEFAULT_CACHE_MB,
        class_names: bool | None = None,
    ) -> None:
        super().__init__(p=p)
        if config is not None and dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        self.paster = LazyPasteEngine(bank, config, class_map, cache_mb=cache_mb)
        self.cache_mb = float(cache_mb)
        self.bank = str(getattr(self.paster.source, "path", bank))
        self.config = dict(config) if config else None
        self.class_map = dict(class_map) if class_map else None
        self.label_field = label_field
        self.label_defaults = dict(label_defaults) if label_defaults else None
        self.class_names = class_names
        self._string_fields: set[str] = set()  # label fields seen holding strings in this process
        self._worker_gen: np.random.Generator | None = None
        self._worker_key: tuple | None = None

    @property
    def targets(self) -> dict[str, Any]:
        return {"image": self.apply, "masks": self.apply_to_masks, "bboxes": self.apply_to_bboxes}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("bank", "config", "class_map", "label_field", "label_defaults", "cache_mb", "class_names")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_worker_gen"] = None
        state["_worker_key"] = None
        return state

    # ------------------------------------------------------------------ randomness
    def _rng(self) -> np.random.Generator:
        wid = dataloader_worker_id()
        if wid is None:
            return self.random_generator
        key = (os.getpid(), wid, id(self.random_generator))
        if self._worker_gen is None or self._worker_key != key:
            base = int(self.random_generator.integers(0, 2**63 - 1))
            self._worker_gen = np.random.default_rng([base, wid])
            self._worker_key = key
        return self._worker_gen

    # ------------------------------------------------------------------ params
    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        for key in ("images", "volume", "volumes"):
            if data.get(key) is not None:
                raise TargetsError(f"{key}: GenValPaste works on one 'image' per call")
        if data.get("mask") is not None:
            raise TargetsError("mask: a semantic mask cannot be updated by GenValPaste; pass instance masks "
                              "as 'masks' (one per box)")
        kps = data.get("keypoints")
        if kps is not None and len(kps):
            raise TargetsError("keypoints: not supported by GenValPaste (pasted objects would hide them)")

        arr, img_info = _to_uint8(data["image"])
        h, w = arr.shape[:2]
        processor = self.get_processor("bboxes")
        if processor is None or "bboxes" not in data:
            raise TargetsError("bboxes: GenValPaste must run inside A.Compose(..., bbox_params=A.BboxParams(...)) "
                              "with a 'bboxes' target")
        label_fields = list(processor.params.label_fields or [])
        bboxes = np.asarray(data["bboxes"])
        # an empty box list has lost its columns: one per label field, or the class column without label fields
        n_extra = bboxes.shape[1] - 4 if bboxes.ndim == 2 and len(bboxes) else len(label_fields) or 1
        bboxes = bboxes.reshape(-1, 4 + n_extra) if bboxes.size else np.zeros((0, 4 + n_extra), np.float32)
        n = len(bboxes)
        class_col, encoders = self._label_columns(processor, label_fields, n_extra, n)

        masks_in = data.get("masks")
        masks_bool = None
        if masks_in is not None and (len(masks_in) or n == 0):
            if len(masks_in) != n:
                raise TargetsError(f"masks: {len(masks_in)} masks for {n} bboxes (GenValPaste needs one per box)")
            marr = np.asarray(masks_in) if len(masks_in) else np.zeros((0, h, w), np.uint8)
            if marr.ndim != 3 or marr.shape[1:] != (h, w):
                raise TargetsError(f"masks: expected (N, {h}, {w}) instance masks, got shape {marr.shape}")
            masks_bool = marr != 0

        scale = np.array([w, h, w, h], dtype=np.float64)
        # normalized float32 rows carry ~1e-5 px of noise; 1/1000 px keeps real fractions and drops the noise
        raw = np.round(bboxes[:, :4].astype(np.float64) * scale, 3).astype(np.float32)
        xyxy = np.clip(raw, 0, scale.astype(np.float32))  # what the core compares against (it clips too)
        # (string label fields hold the pipeline's own integer codes here; the core only carries them)
        classes = bboxes[:, 4 + class_col].astype(np.int64) if n else np.zeros(0, np.int64)

        from genval_aug.paste import Targets

        res = self.paster(arr, Targets(boxes=raw, classes=classes, masks=masks_bool, polygons=None),
                          self._rng(), channel_order="rgb")
        kept = np.asarray(res.kept, dtype=np.int64).reshape(-1)
        pasted = np.asarray(res.pasted, dtype=bool).reshape(-1)
        nk, m = len(kept), len(pasted)
        if pasted[:nk].any() or not pasted[nk:].all():
            raise RuntimeError("PasteEngine broke its contract: kept objects must come first, then pasted ones")
        if nk == n and m == n and np.array_equal(np.asarray(res.image).reshape(arr.shape), arr):
            return {"genval_paste": None}

        out_xyxy = np.asarray(res.targets.boxes, dtype=np.float64).reshape(-1, 4)
        rows = np.zeros((m, 4 + n_extra), dtype=np.result_type(bboxes.dtype, np.float32))
        rows[:nk] = bboxes[kept]
        changed = ~np.all(out_xyxy[:nk].astype(np.float32) == xyxy[kept], axis=1)
        rows[:nk][changed, :4] = out_xyxy[:nk][changed] / scale
        rows[nk:, :4] = out_xyxy[nk:] / scale
        if m > nk:
            rows[nk:, 4:] = self._encode_pasted(np.asarray(res.targets.classes)[nk:], processor, label_fields,
                                                class_col, encoders, n_extra, n)
        new_masks = None
        if masks_bool is not None:
            new_masks = np.asarray(res.targets.masks, dtype=bool).reshape(m, h, w)
        out_image = _from_uint8(arr, res.image, img_info)
        return {"genval_paste": {"image": out_image, "bboxes": rows, "masks": new_masks, "masks_in": masks_in}}

    def _label_columns(self, processor, label_fields: list[str], n_extra: int, n: int):
        """Column (after the 4 coordinates) holding the class, and per column the string encoder or None."""
        if label_fields:
            field = self.label_field or label_fields[0]
            if field not in label_fields:
                raise ConfigError(f"label_field={field!r} is not one of bbox_params.label_fields {label_fields}")
            first = n_extra - len(label_fields)
            class_col = first + label_fields.index(field)
            encoders: list[Any] = [None] * n_extra
            if n:
                meta = processor.label_manager.metadata.get("bboxes", {})
                for j, f in enumerate(label_fields):
                    md = meta.get(f)
                    enc = md.encoder if md is not None and not md.is_numerical else None
                    encoders[first + j] = enc if enc is not None and not enc.is_numerical else None
                if encoders[class_col] is not None:
                    self._string_fields.add(field)
                else:
                    self._string_fields.discard(field)
            return class_col, encoders
        if self.label_field is not None:
            raise ConfigError(f"label_field={self.label_field!r} given but bbox_params has no label_fields")
        if n_extra != 1:
            raise TargetsError(f"bboxes: without bbox_params.label_fields each box needs exactly one extra column "
                              f"(the class), got {n_extra}")
        return 0, [None]

    def _names_wanted(self, field: str) -> bool:
        """Whether pasted objects get names in the class field when the labels cannot tell (no objects)."""
        return self.class_names if self.class_names is not None else field in self._string_fields

    def _names_by_id(self) -> dict[int, str]:
        if self.class_map is not None:
            return {int(v): k for k, v in reversed(list(self.class_map.items()))}
        source = self.paster.source
        bank = getattr(source, "bank", source)
        return {int(v): k for k, v in bank.category_ids().items()}

    def _encode_pasted(self, classes: np.ndarray, processor, label_fields: list[str], class_col: int,
                       encoders: list[Any], n_extra: int, n: int) -> np.ndarray:
        """Label columns for pasted objects, encoded like the pipeline encodes its own labels."""
        k = len(classes)
        out = np.zeros((k, n_extra), dtype=np.float64)
        if not label_fields:
            out[:, 0] = classes
            return out
        first = n_extra - len(label_fields)
        defaults = self.label_defaults or {}
        names = None
        for j, f in enumerate(label_fields):
            col = first + j
            if col == class_col:
                values: list[Any] = [int(c) for c in classes]
                if encoders[col] is not None or (n == 0 and self._names_wanted(f)):
                    names = names or self._names_by_id()
                    values = [names.get(int(c), str(int(c))) for c in classes]
            elif f in defaults:
                values = [defaults[f]] * k
            else:
                raise ConfigError(f"label field {f!r}: no value for pasted objects; pass "
                                  f"label_defaults={{{f!r}: ...}}")
            enc = encoders[col]
            if n == 0:
                # Compose skipped encoding for an empty box list: register this field's metadata now so
                # that its postprocess can decode the pasted rows.
                out[:, col] = processor.label_manager.process_field("bboxes", f, values).reshape(-1)
            elif enc is not None:
                enc.update(values)
                out[:, col] = enc.transform(values)
            else:
                out[:, col] = np.asarray(values, dtype=np.float64)
        return out

    # ------------------------------------------------------------------ apply
    def apply(self, img: np.ndarray, genval_paste: dict | None = None, **params: Any) -> np.ndarray:
        return img if genval_paste is None else genval_paste["image"]

    def apply_to_bboxes(self, bboxes: np.ndarray, genval_paste: dict | None = None, **params: Any) -> np.ndarray:
        return bboxes if genval_paste is None else genval_paste["bboxes"]

    def apply_to_masks(self, masks: Any, genval_paste: dict | None = None, **params: Any) -> Any:
        if genval_paste is None or genval_paste["masks"] is None:
            return masks
        return self._pack_masks(masks, genval_paste["masks"])

    @staticmethod
    def _pack_masks(masks_in: Any, new: np.ndarray) -> Any:
        # an array keeps its dtype also when empty; an empty list has none (uint8 then)
        ref = np.asarray(masks_in) if len(masks_in) or isinstance(masks_in, np.ndarray) else None
        dtype = ref.dtype if ref is not None else np.uint8
        if dtype == np.bool_:
            out = new
        else:
            scale = ref.max() if ref is not None and ref.size and ref.max() > 0 else 1
            out = new.astype(dtype) * np.asarray(scale, dtype=dtype)
        return list(out) if isinstance(masks_in, (list, tuple)) else out

    def apply_with_params(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        res = super().apply_with_params(params, *args, **kwargs)
        gp = params.get("genval_paste")
        masks = kwargs.get("masks")
        # albumentations skips apply_to_masks for an empty mask list; pasted masks must still be added
        if gp is not None and gp["masks"] is not None and isinstance(masks, (list, tuple)) and not masks:
            res["masks"] = self._pack_masks(masks, gp["masks"])
        return res
