"""Ultralytics YOLO adapter: paste bank instances inside Ultralytics' training pipeline.

One line before ``train()``::

    from genval_aug.ultralytics import attach
    attach(YOLO("yolo11n-seg.pt"), bank="cache/x.lmdb", n=3).train(data="coco128-seg.yaml")

or, for ``trainer=`` users and multi-GPU (DDP) runs::

    model.train(trainer=GenValSegmentationTrainer, genval={"bank": "cache/x.lmdb", "n": 3}, data=...)

The paste runs at the top level of the training ``Compose``, before ``MixUp``: the image is the final
imgsz canvas (BGR uint8), boxes are xyxy pixels and segments are (N, P, 2) pixel polygons or empty.
Ultralytics rebuilds that ``Compose`` at ``close_mosaic`` and builds a new dataset after an OOM retry, so the
adapter hooks the dataset's ``build_transforms`` and the trainer's ``build_dataset`` instead of editing one
list once. The bank is opened lazily in whichever process pastes (forked dataloader workers or, with
``workers=0``, the main process); ``genval_aug.bank`` closes read-only handles before every fork.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils.instance import Instances

from genval_aug.bank import InstanceBank
from genval_aug.bank.cache import DEFAULT_CACHE_MB, CachedInstanceBank, with_cache
from genval_aug.class_map import build_class_map, format_unmapped, load_synonyms, normalize_name
from genval_aug.errors import ConfigError
from genval_aug.lazy_engine import make_config
from genval_aug.paste import PasteConfig

logger = logging.getLogger(__name__)

__all__ = [
    "attach",
    "build_class_map",
    "load_synonyms",
    "normalize_name",
    "hook_dataset",
    "insert_transform",
    "PasteSpec",
    "YoloPaste",
    "CachedInstanceBank",
    "GenValDetectionTrainer",
    "GenValSegmentationTrainer",
    "trainer_for",
]

DEFAULT_POINTS = 1000  # Ultralytics resamples every polygon label to 1000 points (100 for OBB)


# --------------------------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------------------------
def _polygons_to_segments(polygons: list[np.ndarray], boxes: np.ndarray, n_points: int) -> np.ndarray:
    """Stack polygons into Ultralytics' (N, n_points, 2) float32 layout (resampled like its own labels)."""
    out = np.empty((len(polygons), n_points, 2), dtype=np.float32)
    todo: list[np.ndarray] = []
    where: list[int] = []
    for i, p in enumerate(polygons):
        p = np.asarray(p, dtype=np.float32).reshape(-1, 2)
        if len(p) == 0:  # no outline: the box's pixels, keeps len(segments) == len(boxes)
            x1, y1, x2, y2 = boxes[i]
            # boxes are pixel extents (x_max + 1, y_max + 1), outline vertices pixel coordinates
            x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)
            p = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)
        # a 1- or 2-vertex outline (a visible pixel or 1-px line, also diagonal) is resampled as it is:
        # cv2.fillPoly of the resampled points draws exactly those pixels
        if len(p) == n_points:  # kept originals: already resampled by Ultralytics
            out[i] = p
        else:
            todo.append(p)
            where.append(i)
    for i, p in zip(where, todo, strict=True):  # the pasted and the re-extracted (cut) outlines
        _resample_closed(p, n_points, out[i])
    return out


def _resample_closed(polygon: np.ndarray, n: int, out: np.ndarray) -> None:
    """Ultralytics' ``resample_segments`` for one closed (K, 2) polygon, written into ``out`` (n, 2): below n
    points every vertex is kept and the rest are spread evenly by vertex index; at n or more, n points evenly by
    index. Same values, ~1.5x faster (one sort instead of searchsorted + insert)."""
    s = np.concatenate((polygon, polygon[:1]))
    m = len(s)
    xp = np.arange(m, dtype=np.float64)
    if m < n:
        t = np.concatenate((np.linspace(0, m - 1, n - m), xp))
        t.sort()
    else:
        t = np.linspace(0, m - 1, n)
    out[:, 0] = np.interp(t, xp, s[:, 0])
    out[:, 1] = np.interp(t, xp, s[:, 1])


class YoloPaste:
    """Ultralytics label-dict transform that pastes bank instances (a plain callable, no ``BaseTransform``).

    Input/output: the label dict at the top level of the training ``Compose`` before ``MixUp``. The engine is
    created lazily in the process that first calls the transform, so the bank opens per process.
    ``stats`` counts images seen, objects pasted and skipped failures in this process.
    """

    def __init__(
        self,
        bank: Any,
        options: Mapping[str, Any] | PasteConfig | None = None,
        class_map: Mapping[str, int] | None = None,
        *,
        polygons: bool = False,
        seed: int | None = None,
        cache_mb: float = 0,
    ) -> None:
        self.bank = bank
        self.cache_mb = cache_mb
        self.options = options if isinstance(options, PasteConfig) else dict(options or {})
        self.class_map = dict(class_map or {})
        self.polygons = bool(polygons)
        self.seed = seed
        self.stats = {"images": 0, "pasted": 0, "errors": 0, "skipped": 0}
        self._engine = None
        self._rng: np.random.Generator | None = None
        self._pid: int | None = None
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_engine"] = state["_rng"] = state["_pid"] = None  # never carry an open bank across processes
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bank={_bank_repr(self.bank)!r}, classes={sorted(self.class_map)}, "
                f"options={self.options})")

    def _warn_once(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args, exc_info=exc_info)

    def _setup(self) -> None:
        """Build the engine and RNG in this process (after fork: a fresh bank handle, a worker-specific seed)."""
        import torch

        from genval_aug.paste import PasteEngine

        info = torch.utils.data.get_worker_info()
        base = int(info.seed) if info is not None else int(torch.initial_seed())
        self._rng = np.random.default_rng([base & (2**63 - 1), self.seed or 0])
        self._engine = PasteEngine(with_cache(self.bank, self.cache_mb),
                                   config=_engine_config(self.options, self.class_map),
                                   class_map=_ClassLookup(self.class_map))
        self._pid = os.getpid()

    def __call__(self, labels: dict) -> dict:
        img, inst = labels.get("img"), labels.get("instances")
        if img is None or inst is None or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            self._warn_once("input", "genval_aug paste skipped: needs a 3-channel uint8 image and 'instances'")
            self.stats["skipped"] += 1
            return labels
        if inst.keypoints is not None:
            self._warn_once("kpt", "genval_aug paste skipped: keypoint (pose) datasets are not supported")
            self.stats["skipped"] += 1
            return labels
        if not self.class_map:
            return labels
        if self._engine is None or self._pid != os.getpid():
            self._setup()

        from genval_aug.paste import Targets

        h, w = img.shape[:2]
        inst.convert_bbox("xyxy")
        inst.denormalize(w, h)
        boxes = np.ascontiguousarray(inst.bboxes, dtype=np.float32).reshape(-1, 4)
        cls = np.asarray(labels["cls"]).reshape(-1).astype(np.int64)
        segs = inst.segments
        n_points = segs.shape[1] if segs.ndim == 3 and segs.shape[1] > 0 else DEFAULT_POINTS
        use_polygons = len(segs) > 0 or (len(boxes) == 0 and self.polygons)
        # views, not copies: the engine never modifies its input and copies what it returns
        polygons = (list(segs) if segs.dtype == np.float32 else [s.astype(np.float32) for s in segs]) \
            if use_polygons else None
        try:
            res = self._engine(img, Targets(boxes=boxes, classes=cls, polygons=polygons), self._rng,
                               channel_order="bgr")
        except Exception:  # one bad record must not kill the loader: count, log the first, keep the sample
            self.stats["errors"] += 1
            self._warn_once("engine", "genval_aug paste failed on %s; sample kept unpasted (logged once)",
                            labels.get("im_file", "?"), exc_info=True)
            return labels
        out = res.targets
        out_boxes = np.asarray(out.boxes, dtype=np.float32).reshape(-1, 4)
        if use_polygons:
            new_segs = _polygons_to_segments(list(out.polygons or []), out_boxes, n_points)
        else:
            new_segs = np.zeros((0, n_points, 2), dtype=np.float32)
        labels["img"] = np.ascontiguousarray(res.image)
        labels["instances"] = Instances(out_boxes, segments=new_segs, bbox_format="xyxy", normalized=False)
        labels["cls"] = np.asarray(out.classes, dtype=np.float32).reshape(-1, 1)
        self.stats["images"] += 1
        self.stats["pasted"] += int(np.count_nonzero(res.pasted))
        return labels


def _bank_repr(bank: Any) -> str:
    path = getattr(bank, "path", None) or getattr(getattr(bank, "bank", None), "path", None)
    return str(path or bank)


def _engine_config(options: Mapping[str, Any] | PasteConfig, class_map: Mapping[str, int]):
    """The user's ``PasteConfig`` restricted to the mapped categories (unmapped ones are never drawn)."""
    from dataclasses import replace

    cfg = make_config(options)  # a PasteConfig, or a mapping of its fields
    allowed = sorted(class_map)
    if cfg.sampler_classes is not None:
        allowed = [c for c in allowed if c in set(cfg.sampler_classes)]
    return replace(cfg, sampler_classes=allowed)


def _instance_bank(source: Any) -> Any:
    """The ``InstanceBank`` behind a path, a bank or a sampler (``.bank``)."""
    if isinstance(source, InstanceBank):
        return source
    inner = getattr(source, "bank", None)
    if isinstance(inner, InstanceBank):
        return inner
    return InstanceBank(source)


class _ClassLookup:
    """``name -> dataset id | None``: the engine skips instances of unmapped categories (user samplers)."""

    def __init__(self, mapping: Mapping[str, int]) -> None:
        self.mapping = dict(mapping)

    def __call__(self, name: str) -> int | None:
        return self.mapping.get(name)


# --------------------------------------------------------------------------------------------------------------
# hooking Ultralytics
# --------------------------------------------------------------------------------------------------------------
def insert_transform(compose: Any, transform: Callable[[dict], dict]) -> int:
    """Insert ``transform`` into a top-level training ``Compose`` before ``MixUp`` (else before ``Format``).

    Idempotent: a ``YoloPaste`` already present is replaced. Returns the index used.
    """
    items = compose.transforms
    for i, t in enumerate(items):
        if isinstance(t, YoloPaste):
            items[i] = transform
            return i
    idx = next((i for i, t in enumerate(items) if type(t).__name__ == "MixUp"), None)
    if idx is None:
        idx = next((i for i, t in enumerate(items) if "Format" in type(t).__name__), len(items))
    items.insert(idx, transform)
    return idx


class _BuildTransforms:
    """Replacement for ``dataset.build_transforms`` that inserts the paste into every rebuilt ``Compose``.

    A class (not a closure) so the dataset stays picklable for spawn-started workers.
    """

    def __init__(self, dataset: Any, transform: YoloPaste, inner: Callable | None) -> None:
        self.dataset, self.transform, self.inner = dataset, transform, inner

    def __call__(self, hyp: Any) -> Any:
        ds = self.dataset
        compose = self.inner(hyp) if self.inner is not None else type(ds).build_transforms(ds, hyp)
        if getattr(ds, "augment", False):
            insert_transform(compose, self.transform)
        return compose


def hook_dataset(dataset: Any, transform: YoloPaste) -> Any:
    """Make ``dataset`` paste with ``transform`` now and after every ``build_transforms`` (close_mosaic)."""
    for sub in getattr(dataset, "datasets", None) or ():  # concatenated datasets
        hook_dataset(sub, transform)
    if not hasattr(dataset, "build_transforms"):
        return dataset
    current = dataset.__dict__.get("build_transforms")
    if isinstance(current, _BuildTransforms):
        current.transform = transform
    else:
        dataset.build_transforms = _BuildTransforms(dataset, transform, current)
    if getattr(dataset, "augment", False) and getattr(dataset, "transforms", None) is not None:
        insert_transform(dataset.transforms, transform)
    return dataset


class PasteSpec:
    """Everything needed to build a ``YoloPaste`` for a dataset; small and picklable (DDP, checkpoints).

    ``bank``: path or ``InstanceBank``; ``options``: ``PasteConfig`` fields; ``classes``/``class_map``/
    ``synonyms``: see ``build_class_map``; ``seed``: mixed into each process' RNG; ``cache_mb``: size of the
    per-process LRU of decoded instances (0 disables it).
    """

    def __init__(self, bank: Any, *, classes: Iterable[str | int] | None = None,
                 class_map: Mapping[str, str | int | None] | None = None,
                 synonyms: str | os.PathLike | Mapping[str, Iterable[str]] | None = None,
                 seed: int | None = None, cache_mb: float = DEFAULT_CACHE_MB, **options: Any) -> None:
        if bank is None:
            raise ConfigError("genval_aug: 'bank' is required (path to an LMDB bank or an InstanceBank)")
        self.bank = str(bank) if isinstance(bank, (str, os.PathLike)) else bank
        self.classes = list(classes) if classes is not None else None
        self.class_map = dict(class_map) if class_map is not None else None
        self.synonyms = str(synonyms) if isinstance(synonyms, os.PathLike) else synonyms
        self.seed = seed
        self.cache_mb = float(cache_mb)
        self.options = options
        make_config(None, options)  # validate early, in the user's process
        self._reported = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | PasteSpec) -> PasteSpec:
        if isinstance(d, PasteSpec):
            return d
        if isinstance(d, str):  # JSON string (CLI or YAML-stored args)
            d = json.loads(d)
        if not isinstance(d, Mapping):
            raise ConfigError(f"genval: expected a dict with at least 'bank', got {type(d).__name__}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bank": _bank_repr(self.bank) if not isinstance(self.bank, str) else self.bank}
        for k in ("classes", "class_map", "synonyms", "seed"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.cache_mb != DEFAULT_CACHE_MB:
            d["cache_mb"] = self.cache_mb
        d.update(self.options)
        return d

    def check_bank(self) -> dict[str, int]:
        """Open the bank once (raises ``BankError`` naming the path if it is missing); its category counts."""
        cats = _instance_bank(self.bank).categories()
        if not cats:
            logger.warning("genval_aug: bank %s has no instances; nothing will be pasted", _bank_repr(self.bank))
        return cats

    def make_transform(self, dataset: Any, include_class: Iterable[int] | None = None) -> YoloPaste:
        """Map bank categories onto ``dataset.data['names']`` and build the transform.

        ``include_class``: Ultralytics' ``classes=`` training argument (the dataset keeps only these class ids;
        the hooks pass ``trainer.args.classes``): bank categories mapped to other ids are not pasted. A dataset
        with ``single_cls`` labels every object 0 (Ultralytics 8.4 also renames its classes to ``item``), so
        every bank category (narrowed by ``classes``/``class_map`` as names) is pasted as class 0.
        """
        names = (getattr(dataset, "data", None) or {}).get("names")
        if names is None:
            raise ConfigError(f"dataset {type(dataset).__name__} has no data['names'] to map bank categories to")
        # reading opens the bank in this process; genval_aug.bank closes read-only handles before every fork,
        # so Ultralytics' forked workers open their own (py-lmdb refuses inherited environments)
        cats = list(_instance_bank(self.bank).categories())
        filtered: list[str] = []
        single = bool(getattr(dataset, "single_cls", False))
        if single:
            mapping, unmapped = self._single_class_map(cats), []
        else:
            mapping, unmapped = build_class_map(cats, names, synonyms=self.synonyms, class_map=self.class_map,
                                                classes=self.classes)
            if include_class is not None:
                keep = {int(c) for c in np.asarray(include_class).reshape(-1)}
                filtered = sorted(c for c, v in mapping.items() if v not in keep)
                mapping = {c: v for c, v in mapping.items() if v in keep}
        unsupported = getattr(dataset, "use_keypoints", False) or getattr(dataset, "use_obb", False)
        if unsupported:
            mapping = {}
        if not self._reported:
            self._reported = True
            if unsupported:
                logger.warning("genval_aug: pose and OBB datasets are not supported; training runs without pasting")
            elif unmapped:
                logger.warning("genval_aug: %s", format_unmapped(unmapped))
            if filtered and not unsupported:
                logger.info("genval_aug: not pasting %s: their classes are outside the training classes=%s",
                            ", ".join(filtered), sorted(keep))
            if not mapping and not unsupported:
                logger.warning("genval_aug: no bank category maps to a dataset class; nothing will be pasted")
            elif mapping:
                shown = "0 (single_cls)" if single else None
                logger.info("genval_aug: pasting %s", ", ".join(f"{k}->{shown or names[v]}" for k, v in sorted(mapping.items())))
        polygons = bool(getattr(dataset, "use_segments", False))
        return YoloPaste(self.bank, self.options, mapping, polygons=polygons, seed=self.seed, cache_mb=self.cache_mb)

    def _single_class_map(self, cats: list[str]) -> dict[str, int]:
        """Every bank category -> 0, but those ``class_map`` excludes (None) and, when ``classes`` names some,
        those it does not name."""
        excluded = {normalize_name(k) for k, v in (self.class_map or {}).items() if v is None}
        named = {normalize_name(c) for c in self.classes or () if isinstance(c, str)}
        return {c: 0 for c in cats if normalize_name(c) not in excluded and (not named or normalize_name(c) in named)}


def _train_classes(trainer: Any) -> Any:
    """The trainer's ``classes=`` argument (class ids the dataset keeps), None when absent."""
    return getattr(getattr(trainer, "args", None), "classes", None)


class _AttachCallback:
    """``on_pretrain_routine_end`` callback installed by :func:`attach` (picklable for 8.4's DDP launcher)."""

    def __init__(self, spec: PasteSpec) -> None:
        self.spec = spec

    def __call__(self, trainer: Any) -> None:
        loader = getattr(trainer, "train_loader", None)
        if loader is None:
            return
        hook_dataset(loader.dataset, self.spec.make_transform(loader.dataset, _train_classes(trainer)))
        if hasattr(loader, "reset"):
            loader.reset()  # 8.3 forks workers eagerly: make them see the new transforms
        current = trainer.__dict__.get("build_dataset")
        if not isinstance(current, _BuildDataset):  # OOM retries build a new dataset: hook that one too
            trainer.build_dataset = _BuildDataset(trainer, self.spec, current)


class _BuildDataset:
    def __init__(self, trainer: Any, spec: PasteSpec, inner: Callable | None) -> None:
        self.trainer, self.spec, self.inner = trainer, spec, inner

    def __call__(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        t = self.trainer
        ds = self.inner(img_path, mode, batch) if self.inner else type(t).build_dataset(t, img_path, mode, batch)
        if mode == "train":
            hook_dataset(ds, self.spec.make_transform(ds, _train_classes(t)))
        return ds


def attach(model: Any, bank: Any, *, classes: Iterable[str | int] | None = None,
           class_map: Mapping[str, str | int | None] | None = None,
           synonyms: str | os.PathLike | Mapping[str, Iterable[str]] | None = None,
           seed: int | None = None, cache_mb: float = DEFAULT_CACHE_MB, **paste_options: Any) -> Any:
    """Paste instances from ``bank`` into every training batch of ``model.train(...)``; returns ``model``.

    ``paste_options`` are ``PasteConfig`` fields (e.g. ``n=3``, ``harmonize="reinhard"``); ``classes`` limits
    pasting to these dataset classes (names or ids) or bank categories; ``class_map`` overrides the by-name
    mapping (``{"tiger": "cat", "logo": None}``); ``synonyms`` is an LVIS categories JSON (or a
    ``{name: [synonyms]}`` dict) for synonym matching; ``cache_mb`` bounds each process' cache of decoded
    instances. Unmapped bank categories are logged once and never drawn. Works for detect
    (boxes) and segment (polygons) tasks. For DDP on Ultralytics < 8.4 use ``GenValSegmentationTrainer``.
    """
    spec = PasteSpec(bank, classes=classes, class_map=class_map, synonyms=synonyms, seed=seed, cache_mb=cache_mb,
                     **paste_options)
    spec.check_bank()  # fail before training starts, not inside Ultralytics' setup
    model.add_callback("on_pretrain_routine_end", _AttachCallback(spec))
    return model


# --------------------------------------------------------------------------------------------------------------
# trainer subclasses
# --------------------------------------------------------------------------------------------------------------
SPEC_ENV = "GENVAL_AUG_YOLO_SPEC"  # JSON spec handed to DDP worker processes (they inherit the environment)


class _SpecCarrier:
    """No-op callback that carries the spec: 8.4 pickles ``trainer.callbacks`` into its DDP workers."""

    def __init__(self, spec: PasteSpec) -> None:
        self.spec = spec

    def __call__(self, trainer: Any) -> None:
        pass


def _carried_spec(callbacks: Any) -> PasteSpec | None:
    for fns in (callbacks or {}).values():
        for fn in fns:
            if isinstance(fn, _SpecCarrier):
                return fn.spec
    return None


class _GenValTrainerMixin:
    """Reads ``genval={...}`` (``PasteSpec`` fields) from the train arguments and hooks every train dataset.

    ``genval`` is not an Ultralytics argument, so it is taken out of the overrides (Ultralytics validates
    ``args`` again in its validators). DDP workers get the spec back from the pickled callbacks (8.4) or
    from the ``GENVAL_AUG_YOLO_SPEC`` environment variable set by the launching process.
    """

    def __init__(self, cfg: Any = None, overrides: dict | None = None, _callbacks: Any = None) -> None:
        from ultralytics.utils import DEFAULT_CFG

        overrides = dict(overrides or {})
        options = overrides.pop("genval", None)
        if options is None:
            options = _carried_spec(_callbacks) or os.environ.get(SPEC_ENV)
        if options is None:
            raise ConfigError(f"{type(self).__name__} needs genval={{'bank': 'path/to/bank.lmdb', ...}} in train()")
        self.genval = PasteSpec.from_dict(options)
        self.genval.check_bank()
        super().__init__(DEFAULT_CFG if cfg is None else cfg, overrides, _callbacks)
        if _carried_spec(self.callbacks) is None:
            self.add_callback("on_pretrain_routine_start", _SpecCarrier(self.genval))
        if getattr(self, "ddp", False):
            os.environ[SPEC_ENV] = json.dumps(self.genval.to_dict())

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        ds = super().build_dataset(img_path, mode, batch)
        if mode == "train":
            hook_dataset(ds, self.genval.make_transform(ds, _train_classes(self)))
        return ds


class GenValDetectionTrainer(_GenValTrainerMixin, DetectionTrainer):
    """``DetectionTrainer`` whose train dataset pastes bank instances (boxes)."""


class GenValSegmentationTrainer(_GenValTrainerMixin, SegmentationTrainer):
    """``SegmentationTrainer`` whose train dataset pastes bank instances (polygons -> masks)."""


def trainer_for(task: str) -> type:
    """The genval trainer class for an Ultralytics task name (``detect`` or ``segment``)."""
    try:
        return {"detect": GenValDetectionTrainer, "segment": GenValSegmentationTrainer}[task]
    except KeyError:
        raise ConfigError(f"genval_aug supports YOLO tasks 'detect' and 'segment', not {task!r}") from None
