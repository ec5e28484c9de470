"""The paste engine: sample instances, augment, place, harmonize, blend, update labels.

>>> engine = PasteEngine(sampler, PasteConfig(n=(1, 3)))
>>> res = engine(image, Targets(boxes, classes, masks=masks), np.random.default_rng(0))

Pure numpy + OpenCV. All randomness comes from the ``rng`` argument (no global RNG), so a call is
deterministic for a given generator state; give each DataLoader worker its own generator.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from genval_aug.errors import ConfigError, TargetsError
from genval_aug.paste import augment as A
from genval_aug.paste.blend import BLEND_MODES, blend_patch
from genval_aug.paste.harmonize import (
    EXACT_MAX_PIXELS,
    HARMONIZE_MODES,
    context_window,
    harmonize,
    harmonize_matrix,
)
from genval_aug.paste.labels import OcclusionRules, OcclusionTracker
from genval_aug.paste.placement import place

logger = logging.getLogger(__name__)


@dataclass
class PasteConfig:
    """Everything that controls pasting (defaults: feathered alpha + local Reinhard).

    n: instances per image: an int, an inclusive range ``(lo, hi)``, or ``{count: probability}``.
    p: probability of pasting at all on a given image.
    sampler_*, min_score: options of the default ``BankSampler`` built when the engine gets an ``InstanceBank``
        (``sampler_options`` is passed on as keyword arguments, e.g. ``dataset_frequencies``, ``min_side``).
    scale_range: relative size ``sqrt(object area / image area)``: fallback range (log-uniform) when the source
        has no size prior for the category, and hard bounds otherwise. use_size_prior: use the bank's prior.
    aspect_jitter: log-uniform factor on width/height in ``[1/(1+j), 1+j]``.
    hflip: probability of a horizontal flip. rotation: max absolute angle (degrees), uniform.
    brightness/contrast/saturation/hue: colour jitter (torchvision ``ColorJitter`` semantics), applied with
        probability ``colour_jitter_p``.
    max_ioa: a pasted box may cover at most this fraction of any existing (or earlier pasted) box.
    allow_truncation/min_inside: objects may cross the border keeping at least ``min_inside`` of each side.
    blend: "hard" | "alpha" | "feather" | "poisson"; feather_sigma in pixels.
    harmonize: "none" | "reinhard" | "linear_ot"; harmonize_strength in [0, 1]; harmonize_chroma scales the
        Reinhard a/b strength; harmonize_context: the reference window is the paste rectangle grown by this
        times its size on each side.
    label_threshold: alpha >= this is the pasted object's label mask.
    source_cache_mb: per-engine LRU (megabytes, 0 disables) of instances prepared at their own resolution
        (colour-bleed guard, integer pre-shrink, colour samples for harmonization), keyed by instance id, which
        must identify the pixels (bank ids are content hashes); results are the same with or without it.
    min_visible_fraction/min_remaining_area/max_box_shift/box_min_visible_fraction/polygon_parts: occlusion
        rules, see :mod:`genval_aug.paste.labels`.
    """

    n: int | tuple[int, int] | Mapping[int, float] = (1, 3)
    p: float = 1.0
    sampler_mode: str = "balanced"
    sampler_weights: Mapping[str, float] | None = None
    sampler_classes: Sequence[str] | None = None
    min_score: float | None = None
    sampler_options: Mapping[str, Any] | None = None
    use_size_prior: bool = True
    scale_range: tuple[float, float] = (0.08, 0.4)
    min_side: int = 8
    aspect_jitter: float = 0.1
    hflip: float = 0.5
    rotation: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.0
    colour_jitter_p: float = 0.5
    max_ioa: float = 0.3
    allow_truncation: bool = True
    min_inside: float = 0.5
    placement_retries: int = 20
    blend: str = "feather"
    feather_sigma: float = 1.5
    harmonize: str = "reinhard"
    harmonize_strength: float = 0.5
    harmonize_chroma: float = 0.5
    harmonize_context: float = 0.5
    harmonize_max_gain: float = 2.0
    label_threshold: int = 128
    min_visible_fraction: float = 0.1
    min_remaining_area: int = 300
    max_box_shift: float = 10.0
    box_min_visible_fraction: float = 0.3
    polygon_parts: str = "all"
    source_cache_mb: float = 64.0

    def __post_init__(self) -> None:
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"PasteConfig.blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if self.harmonize not in HARMONIZE_MODES:
            raise ConfigError(f"PasteConfig.harmonize must be one of {HARMONIZE_MODES}, got {self.harmonize!r}")
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"PasteConfig.p must be in [0, 1], got {self.p}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"PasteConfig.scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        if not 1 <= self.label_threshold <= 255:
            raise ConfigError(f"PasteConfig.label_threshold must be in [1, 255], got {self.label_threshold}")
        if self.polygon_parts not in ("all", "largest"):
            raise ConfigError(f"PasteConfig.polygon_parts must be 'all' or 'largest', got {self.polygon_parts!r}")
        if not 0 < self.min_inside <= 1:
            raise ConfigError(f"PasteConfig.min_inside must be in (0, 1], got {self.min_inside}")
        if not self.source_cache_mb >= 0:
            raise ConfigError(f"PasteConfig.source_cache_mb must be >= 0, got {self.source_cache_mb}")
        for name, lo, hi, finite in _NUMERIC_RANGES:
            v = getattr(self, name)
            try:
                ok = lo <= v <= hi and (not finite or math.isfinite(v))
            except TypeError:
                ok = False
            if not ok:  # NaN, a negative angle or a probability above 1 would silently change what is pasted
                what = f"in [{lo}, {hi}]" if hi != math.inf else f">= {lo}" + (" and finite" if finite else "")
                raise ConfigError(f"PasteConfig.{name} must be {what}, got {v!r}")
        _count_spec(self.n)  # validates

    def sample_count(self, rng: np.random.Generator) -> int:
        kind, spec = _count_spec(self.n)
        if kind == "int":
            return spec
        if kind == "range":
            return int(rng.integers(spec[0], spec[1] + 1))
        counts, probs = spec
        return int(counts[rng.choice(len(counts), p=probs)])

    @property
    def occlusion_rules(self) -> OcclusionRules:
        return OcclusionRules(
            self.min_visible_fraction, self.min_remaining_area, self.max_box_shift,
            self.box_min_visible_fraction, self.polygon_parts,
        )


# (field, low, high, must be finite) of the numeric PasteConfig fields checked in __post_init__
_NUMERIC_RANGES = (
    ("hflip", 0, 1, True), ("colour_jitter_p", 0, 1, True), ("harmonize_strength", 0, 1, True),
    ("min_visible_fraction", 0, 1, True), ("box_min_visible_fraction", 0, 1, True),
    ("rotation", 0, math.inf, True), ("aspect_jitter", 0, math.inf, True), ("brightness", 0, math.inf, True),
    ("contrast", 0, math.inf, True), ("saturation", 0, math.inf, True), ("hue", 0, 0.5, True),
    ("feather_sigma", 0, math.inf, True), ("harmonize_chroma", 0, math.inf, True),
    ("harmonize_context", 0, math.inf, True), ("harmonize_max_gain", 1, math.inf, True),
    ("max_ioa", 0, math.inf, False), ("max_box_shift", 0, math.inf, False), ("min_remaining_area", 0, math.inf, False),
)


def _count_spec(n: Any) -> tuple[str, Any]:
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        if n < 0:
            raise ConfigError(f"PasteConfig.n must be >= 0, got {n}")
        return "int", int(n)
    if isinstance(n, Mapping):
        counts = np.array([int(k) for k in n], np.int64)
        probs = np.array([float(v) for v in n.values()], np.float64)
        if len(counts) == 0 or (counts < 0).any() or (probs < 0).any() or probs.sum() <= 0:
            raise ConfigError(f"PasteConfig.n as a distribution needs counts >= 0 and weights >= 0, got {dict(n)}")
        return "dist", (counts, probs / probs.sum())
    if isinstance(n, Sequence) and len(n) == 2:
        lo, hi = int(n[0]), int(n[1])
        if not 0 <= lo <= hi:
            raise ConfigError(f"PasteConfig.n range must satisfy 0 <= lo <= hi, got {tuple(n)}")
        return "range", (lo, hi)
    raise ConfigError(f"PasteConfig.n must be an int, a (lo, hi) range or a {{count: prob}} mapping, got {n!r}")


@dataclass
class Targets:
    """Labels of one image. boxes (N, 4) float32 xyxy pixels; classes (N,) int64; optionally masks (N, H, W)
    bool or polygons (list of N (K, 2) float32 pixel arrays). Without masks and polygons the image is box-only."""

    boxes: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None
    polygons: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def mode(self) -> str:
        return "masks" if self.masks is not None else "polygons" if self.polygons is not None else "boxes"

    @classmethod
    def empty(cls, image_hw: tuple[int, int] | None = None, mode: str = "boxes") -> Targets:
        masks = np.zeros((0, *image_hw), bool) if mode == "masks" and image_hw else None
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), masks, [] if mode == "polygons" else None)

    def validated(self, image_hw: tuple[int, int]) -> Targets:
        """Checked, normalized copy of the arrays' dtypes/shapes (raises :class:`TargetsError`).

        Boxes partly outside the image are clipped to it; boxes that are non-finite, inverted or (with a
        positive area) entirely outside it are errors. Zero-area boxes are clipped and carried through.
        """
        H, W = image_hw
        boxes = np.asarray(self.boxes, np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise TargetsError(f"Targets.boxes must have shape (N, 4), got {boxes.shape}")
        n = len(boxes)
        classes = np.asarray(self.classes).reshape(-1)
        if len(classes) != n:
            raise TargetsError(f"Targets.classes has {len(classes)} entries but Targets.boxes has {n}")
        if n and not np.issubdtype(classes.dtype, np.integer):
            try:
                whole = bool(np.all(np.equal(np.mod(classes, 1), 0)))
            except TypeError:  # strings, None: not numbers at all
                whole = False
            if not whole:
                raise TargetsError(f"Targets.classes must be integers, got {classes.dtype}")
        classes = classes.astype(np.int64)
        if not np.isfinite(boxes).all():
            bad = int(np.flatnonzero(~np.isfinite(boxes).all(1))[0])
            raise TargetsError(f"Targets.boxes[{bad}] is not finite: {boxes[bad].tolist()}")
        inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if inverted.any():
            bad = int(np.flatnonzero(inverted)[0])
            raise TargetsError(f"Targets.boxes[{bad}] is not xyxy (x2 < x1 or y2 < y1): {boxes[bad].tolist()}")
        # zero-area boxes (what torchvision's crops leave of an object outside the crop, clamped onto the edge)
        # are carried through unchanged; only a box with an area that lies wholly outside is an error
        area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        outside = area & ((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= W) | (boxes[:, 1] >= H))
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            raise TargetsError(f"Targets.boxes[{bad}] = {boxes[bad].tolist()} lies outside the {W}x{H} image")
        boxes = boxes.copy()
        np.clip(boxes[:, 0::2], 0, W, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, H, out=boxes[:, 1::2])
        masks, polygons = self.masks, self.polygons
        if masks is not None and polygons is not None:
            raise TargetsError("Targets: give masks or polygons, not both")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.shape != (n, H, W):
                raise TargetsError(f"Targets.masks must have shape ({n}, {H}, {W}), got {masks.shape}")
            masks = masks if masks.dtype == bool else masks.astype(bool)
        if polygons is not None:
            if len(polygons) != n:
                raise TargetsError(f"Targets.polygons has {len(polygons)} entries but Targets.boxes has {n}")
            polys = [np.asarray(p, np.float32) for p in polygons]
            for i, p in enumerate(polys):
                if p.size == 0:
                    polys[i] = p = p.reshape(0, 2)
                if p.ndim != 2 or p.shape[1] != 2:
                    raise TargetsError(f"Targets.polygons[{i}] must have shape (K, 2), got {p.shape}")
            if polys and not np.isfinite(np.concatenate(polys)).all():
                bad = next(i for i, p in enumerate(polys) if not np.isfinite(p).all())
                raise TargetsError(f"Targets.polygons[{bad}] has non-finite coordinates")
            polygons = polys
        return Targets(boxes, classes, masks, polygons)


@dataclass
class PasteResult:
    """image: the composited image (same shape/dtype as the input); targets: kept originals first (in order),
    then pasted objects in paste order, in the input's label form; kept: indices of surviving originals;
    pasted: bool per output object; instance_ids: bank record id per output object (None for originals);
    placements: one dict per pasted instance in paste order: id, category, class, box at paste time, blend
    actually used, xy (top-left of the patch, may be negative), label_mask (the patch's label mask, unclipped),
    rect (clipped image rectangle x0, y0, x1, y1 the patch touched), output_index (its index in targets, None if
    a later paste occluded it below the thresholds). When nothing is pasted (probability ``p``), ``targets`` may
    share mask/polygon arrays with the input."""

    image: np.ndarray
    targets: Targets
    kept: np.ndarray
    pasted: np.ndarray
    instance_ids: list
    placements: list[dict] = field(default_factory=list)


class PasteEngine:
    """Pastes bank instances into images with correct labels.

    source: anything with ``sample(rng, n) -> list[Instance]`` (a ``BankSampler``) or an ``InstanceBank``
        (wrapped in a ``BankSampler`` built from the config's ``sampler_*`` options). A ``size_prior(category)``
        method on the source (or on its ``.bank``) is used for scales when present.
    class_map: ``{bank category name: dataset class id}`` or a callable name -> id | None (None = skip that
        instance); without it the instance's ``category_id`` is used. A category missing from a dict is an error.
    Unusable instances (not (H, W, 4) uint8, or no alpha >= ``label_threshold``) are skipped, counted in
    ``skipped`` and logged once.
    """

    def __init__(
        self,
        source: Any,
        config: PasteConfig | None = None,
        class_map: Mapping[str, int] | Callable[[str], int | None] | None = None,
    ) -> None:
        self.config = config or PasteConfig()
        self.sampler = _as_sampler(source, self.config)
        prior_owner = self.sampler if hasattr(self.sampler, "size_prior") else getattr(self.sampler, "bank", None)
        self._size_prior = getattr(prior_owner, "size_prior", None)
        self._prior_cache: dict[str, Any] = {}
        self.class_map = class_map
        self.skipped = 0  # unusable instances drawn from the source (bad array, empty alpha)
        self._warned = False
        self._sources = A.SourceCache(int(self.config.source_cache_mb * (1 << 20)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sampler={type(self.sampler).__name__}, config={self.config!r})"

    def with_config(self, **changes: Any) -> PasteEngine:
        """A copy of this engine with some config fields replaced."""
        return PasteEngine(self.sampler, replace(self.config, **changes), self.class_map)

    # -- helpers -----------------------------------------------------------------------------------------
    def _class_of(self, inst: Any) -> int | None:
        cm = self.class_map
        if cm is None:
            cid = getattr(inst, "category_id", None)
            if cid is None:
                raise ConfigError(
                    f"instance {getattr(inst, 'id', '?')} ({inst.category!r}) has no category_id; pass a class_map"
                )
            return int(cid)
        if callable(cm) and not isinstance(cm, Mapping):
            cid = cm(inst.category)
            return None if cid is None else int(cid)
        if inst.category not in cm:
            raise ConfigError(f"class_map has no entry for bank category {inst.category!r}")
        cid = cm[inst.category]
        return None if cid is None else int(cid)

    def _skip(self, inst: Any, why: str) -> None:
        """Skip an unusable instance: counted in ``self.skipped``, logged once per engine."""
        self.skipped += 1
        if not self._warned:
            logger.warning("skipping instance %s (%r): %s; further ones are counted in engine.skipped",
                           getattr(inst, "id", "?"), getattr(inst, "category", "?"), why)
            self._warned = True

    def _prior(self, category: str) -> Any:
        if not self.config.use_size_prior or self._size_prior is None:
            return None
        if category not in self._prior_cache:
            try:
                self._prior_cache[category] = self._size_prior(category)
            except (KeyError, LookupError):
                self._prior_cache[category] = None
        return self._prior_cache[category]

    def _augment(
        self, inst: Any, image_hw: tuple[int, int], rng: np.random.Generator, bgr: bool
    ) -> tuple[A.ObjectPatch, np.ndarray | None, np.ndarray] | None:
        """(patch in the image's channel order, colour-jitter matrix not yet applied (image channel order) or
        None, colour samples of the source (image channel order)); None when the instance is unusable."""
        cfg = self.config
        rgba = np.asarray(inst.rgba)
        if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8 or rgba.size == 0:
            self._skip(inst, f"rgba must be a non-empty (H, W, 4) uint8 array, got {rgba.shape} {rgba.dtype}")
            return None
        fast = A.crop_from_meta(rgba, getattr(inst, "meta", None)) if cfg.label_threshold == 128 else None
        crop, area = fast if fast is not None else A.crop_to_alpha(rgba, cfg.label_threshold)
        if area == 0:
            self._skip(inst, "its alpha has no pixel >= label_threshold")
            return None
        rel = A.sample_relative_size(rng, self._prior(inst.category), cfg.scale_range)
        j = cfg.aspect_jitter
        aspect = float(np.exp(rng.uniform(-np.log1p(j), np.log1p(j)))) if j > 0 else 1.0
        size = A.target_size(crop.shape[:2], area, image_hw, rel, aspect, cfg.min_side)
        flip = bool(rng.random() < cfg.hflip)
        angle = float(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation > 0 else 0.0
        key = getattr(inst, "id", None)
        key = key if isinstance(key, (str, int)) else None
        patch = A.resize_rotate_flip(crop, size, angle, flip, cache=self._sources, key=key)
        samples = self._sources.samples(key, crop, area, cfg.label_threshold)  # RGB, drawn from the source
        matrix = None
        if cfg.colour_jitter_p > 0 and (cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue):
            if rng.random() < cfg.colour_jitter_p:
                luma = A.samples_luma(samples) if len(samples) else A.mean_luma(patch)
                matrix = A.to_channel_order(
                    A.colour_matrix(rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, luma), bgr
                )
        patch = A.split_patch(patch, bgr)
        ph, pw = patch.shape
        if not cfg.allow_truncation and (ph > image_hw[0] or pw > image_hw[1]):
            # the size fits the image before rotation (and the anti-aliased resize may add a pixel): shrink the
            # rotated patch so that the object can lie fully inside, as allow_truncation=False promises
            patch = A.shrink_patch(patch, image_hw)
        if patch.alpha.size == 0:  # the resize left no visible pixel (sparse or thin instance, small image)
            logger.debug("instance %s vanished when resized to %s; not pasted", key, size)
            return None
        return patch, matrix, (samples[:, ::-1] if bgr else samples)

    def _colour(
        self, patch: A.ObjectPatch, jitter: np.ndarray | None, samples: np.ndarray, label: np.ndarray,
        image: np.ndarray, x: int, y: int, bgr: bool,
    ) -> np.ndarray:
        """The patch's final colours: colour jitter and harmonization composed into one affine where possible
        (the harmonizer's statistics come from the source's colour samples, jittered the same way); small
        patches get the exact per-pixel Lab map (Reinhard)."""
        cfg = self.config
        colour = patch.rgb
        h, w = patch.shape
        mode = cfg.harmonize
        if mode == "reinhard" and h * w <= EXACT_MAX_PIXELS:
            if jitter is not None:
                colour = cv2.transform(colour, jitter)
            return harmonize(mode, colour, label.view(np.uint8), context_window(image, x, y, h, w, cfg.harmonize_context),
                             bgr, cfg.harmonize_strength, cfg.harmonize_chroma, cfg.harmonize_max_gain)
        m = None
        if mode != "none":
            ref = context_window(image, x, y, h, w, cfg.harmonize_context)
            px = samples if jitter is None else A.apply_affine_uint8(samples, jitter)
            m = harmonize_matrix(mode, px, ref, bgr, cfg.harmonize_strength, cfg.harmonize_chroma,
                                 cfg.harmonize_max_gain)
        if m is None:
            m = jitter
        elif jitter is not None:
            m = A.compose_affine(m, jitter)
        return colour if m is None else cv2.transform(colour, m)

    # -- main --------------------------------------------------------------------------------------------
    def __call__(
        self,
        image: np.ndarray,
        targets: Targets,
        rng: np.random.Generator,
        channel_order: str = "rgb",
    ) -> PasteResult:
        """Paste instances into ``image`` (H, W, 3) uint8; returns a new image and updated targets.

        Grayscale (H, W) / (H, W, 1) images are pasted as RGB and converted back to gray; (H, W, 4) images get
        the objects composited into their colour channels and the pasted label masks set opaque in channel 3.
        The input image and targets are never modified.
        """
        if channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        img = np.asarray(image)
        if img.dtype != np.uint8:
            raise TargetsError(f"image must be uint8, got {img.dtype}")
        if img.ndim in (2, 3) and 0 in img.shape[:2]:
            raise TargetsError(f"image must have a positive height and width, got shape {img.shape}")
        if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
            gray = img.reshape(img.shape[:2])
            res = self(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), targets, rng, "rgb")
            res.image = cv2.cvtColor(res.image, cv2.COLOR_RGB2GRAY).reshape(img.shape)
            return res
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise TargetsError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
        H, W = img.shape[:2]
        t = targets.validated((H, W))
        cfg = self.config
        n_orig = len(t)
        if cfg.p < 1.0 and rng.random() >= cfg.p:
            return PasteResult(img.copy(), t, np.arange(n_orig), np.zeros(n_orig, bool), [None] * n_orig)
        k = cfg.sample_count(rng)
        instances = list(self.sampler.sample(rng, k)) if k > 0 else []

        out = img.copy()
        colour_view = out[..., :3] if img.shape[2] == 4 else out
        bgr = channel_order == "bgr"
        tracker = OcclusionTracker(t.boxes, t.classes, (H, W), t.masks, t.polygons, cfg.occlusion_rules)
        placements: list[dict] = []
        for inst in instances:
            cls = self._class_of(inst)
            if cls is None:
                continue
            aug = self._augment(inst, (H, W), rng, bgr)
            if aug is None:
                continue
            patch, jitter, samples = aug
            h, w = patch.shape
            pos = place(
                rng, (h, w), (H, W), tracker.occupied_boxes(), cfg.max_ioa, cfg.allow_truncation,
                cfg.min_inside, cfg.placement_retries,
            )
            if pos is None:
                logger.debug("no position with IoA <= %.2f for %s; skipped", cfg.max_ioa, getattr(inst, "id", "?"))
                continue
            x, y = pos
            label = patch.alpha >= cfg.label_threshold
            # labels first: a patch whose label mask misses the image is not drawn at all
            if not tracker.add(label, x, y, cls, getattr(inst, "id", None)):
                continue
            colour = self._colour(patch, jitter, samples, label, colour_view, x, y, bgr)
            used = blend_patch(colour_view, colour, patch.alpha, x, y, cfg.blend, cfg.feather_sigma, cfg.label_threshold)
            if img.shape[2] == 4:
                _opaque_alpha(out, label, x, y)
            placements.append(
                {"id": getattr(inst, "id", None), "category": inst.category, "class": cls,
                 "box": tracker.objects[-1].box.tolist(), "blend": used, "xy": (x, y), "label_mask": label,
                 "rect": (max(x, 0), max(y, 0), min(x + w, W), min(y + h, H))}
            )
        r = tracker.result()
        for pl, out_index in zip(placements, r["pasted_index"], strict=True):
            pl["output_index"] = out_index
        targets_out = Targets(r["boxes"], r["classes"], r["masks"], r["polygons"])
        return PasteResult(out, targets_out, r["kept"], r["pasted"], r["instance_ids"], placements)


def _opaque_alpha(out: np.ndarray, label: np.ndarray, x: int, y: int) -> None:
    H, W = out.shape[:2]
    h, w = label.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        a = out[y0:y1, x0:x1, 3]
        a[label[y0 - y : y1 - y, x0 - x : x1 - x]] = 255


def _as_sampler(source: Any, cfg: PasteConfig) -> Any:
    if hasattr(source, "sample"):
        return source
    if hasattr(source, "random_instance") and hasattr(source, "categories"):
        # the bank package is only needed when a bank (not a sampler) is given
        from genval_aug.bank import BankSampler

        return BankSampler(
            source, mode=cfg.sampler_mode, weights=cfg.sampler_weights, classes=cfg.sampler_classes,
            min_score=cfg.min_score, **dict(cfg.sampler_options or {}),
        )
    raise ConfigError(
        f"PasteEngine source must have .sample(rng, n) (a BankSampler) or be an InstanceBank, got {type(source).__name__}"
    )


def paste_instances(
    image: np.ndarray,
    targets: Targets,
    source: Any,
    rng: np.random.Generator,
    config: PasteConfig | None = None,
    class_map: Mapping[str, int] | Callable[[str], int | None] | None = None,
    channel_order: str = "rgb",
) -> PasteResult:
    """Functional form of :class:`PasteEngine` (builds the engine on every call)."""
    return PasteEngine(source, config, class_map)(image, targets, rng, channel_order)
