"""Label correctness of the paste engine on real coco128-seg images, checked by an independent checker."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_checks import (
    MemoryInstance,
    MemorySource,
    Sample,
    check_paste_result,
    check_pixels,
    extent_box,
    rasterize,
)
from paste_fixtures import coco_samples, memory_source, real_bank, rgba_instances  # noqa: F401

from genval_aug.paste import PasteConfig, PasteEngine, Targets

MODES = ("masks", "polygons", "boxes")


def _targets(s, mode: str) -> Targets:
    return Targets(
        s.boxes, s.classes,
        masks=s.masks if mode == "masks" else None,
        polygons=s.polygons if mode == "polygons" else None,
    )


def _run(engine, samples, mode, seed0=0, pixels=True):
    totals = {"pasted": 0, "dropped": 0, "occluded": 0}
    for i, s in enumerate(samples):
        rng = np.random.default_rng(seed0 + i)
        before = s.image.copy()
        res = engine(s.image, _targets(s, mode), rng)
        assert np.array_equal(s.image, before), "input image modified"
        st = check_paste_result(s, res, s.image.shape[:2], 80, engine.config, mode)
        if pixels:
            check_pixels(s.image, res)
        for k in totals:
            totals[k] += st[k]
    return totals


@pytest.mark.parametrize("mode", MODES)
def test_default_config_labels(coco_samples, memory_source, mode):  # noqa: F811
    engine = PasteEngine(memory_source, PasteConfig(n=(1, 4)))
    totals = _run(engine, coco_samples, mode)
    assert totals["pasted"] >= len(coco_samples)  # at least one per image on average
    if mode != "boxes":
        assert totals["occluded"] > 0  # the IoA limit still lets pastes cut into masks


@pytest.mark.parametrize("mode", MODES)
def test_heavy_occlusion_labels(coco_samples, memory_source, mode):  # noqa: F811
    """Large, many, overlapping pastes: exercises cutting, dropping and paste-order occlusion."""
    cfg = PasteConfig(n=(4, 8), max_ioa=1.0, scale_range=(0.15, 0.6), rotation=20, hue=0.05)
    engine = PasteEngine(memory_source, cfg)
    totals = _run(engine, coco_samples[:25], mode, seed0=100)
    assert totals["dropped"] > 0 and totals["pasted"] > 50
    if mode != "boxes":
        assert totals["occluded"] > 0


def test_pasted_objects_occlude_each_other(coco_samples, memory_source):  # noqa: F811
    """Later pastes cut earlier pasted masks (checked by the checker); make sure it actually happens."""
    cfg = PasteConfig(n=8, max_ioa=1.0, scale_range=(0.3, 0.5))
    engine = PasteEngine(memory_source, cfg)
    cut = dropped = 0
    for i, s in enumerate(coco_samples[:10]):
        res = engine(s.image, _targets(s, "masks"), np.random.default_rng(i))
        check_paste_result(s, res, s.image.shape[:2], 80, cfg, "masks")
        for pl in res.placements:
            if pl["output_index"] is None:
                dropped += 1
            elif res.targets.masks[pl["output_index"]].sum() < pl["label_mask"].sum():
                cut += 1
    assert cut > 0 and dropped > 0


@pytest.mark.parametrize("blend", ["hard", "alpha", "feather", "poisson"])
@pytest.mark.parametrize("harmonize", ["none", "reinhard", "linear_ot"])
def test_every_blend_and_harmonizer(coco_samples, memory_source, blend, harmonize):  # noqa: F811
    cfg = PasteConfig(n=(2, 3), blend=blend, harmonize=harmonize)
    engine = PasteEngine(memory_source, cfg)
    _run(engine, coco_samples[:6], "polygons", seed0=7)


def test_real_bank_source(coco_samples, real_bank):  # noqa: F811
    """The engine on a real LMDB bank (wrapped in its default BankSampler), with the bank's size prior."""
    cfg = PasteConfig(n=(1, 3), sampler_classes=["car", "person"])
    engine = PasteEngine(real_bank, cfg)
    cats = set()
    for mode in MODES:
        _run(engine, coco_samples[:8], mode, seed0=50)
    for i, s in enumerate(coco_samples[:8]):
        res = engine(s.image, _targets(s, "masks"), np.random.default_rng(i))
        cats |= {pl["category"] for pl in res.placements}
        for pl in res.placements:
            assert pl["id"] in real_bank.categories() or len(pl["id"]) == 32
    assert cats and cats <= {"car", "person"}


def test_size_prior_sets_scale(coco_samples, real_bank):  # noqa: F811
    """Bank prior for 'car' (rel sqrt area 0.2, std ~0) -> pasted car area ~ 0.04 of the image."""
    cfg = PasteConfig(n=1, sampler_classes=["car"], aspect_jitter=0.0, allow_truncation=False, max_ioa=1.0)
    engine = PasteEngine(real_bank, cfg)
    for i, s in enumerate(coco_samples[:5]):
        H, W = s.image.shape[:2]
        res = engine(s.image, Targets.empty(), np.random.default_rng(i))
        (pl,) = res.placements
        rel = np.sqrt(pl["label_mask"].sum() / (H * W))
        assert rel == pytest.approx(0.2, rel=0.08)


@pytest.mark.parametrize("mode", MODES)
def test_border_truncation_stress(coco_samples, memory_source, mode):  # noqa: F811
    """Big, rotated objects mostly outside the image: clipping of masks, polygons and boxes at every border."""
    cfg = PasteConfig(n=(3, 6), min_inside=0.1, scale_range=(0.3, 0.7), rotation=45, max_ioa=0.8)
    engine = PasteEngine(memory_source, cfg)
    totals = _run(engine, coco_samples[:12], mode, seed0=300)
    assert totals["pasted"] > 20
    truncated = 0
    for i, s in enumerate(coco_samples[:12]):
        res = engine(s.image, _targets(s, mode), np.random.default_rng(300 + i))
        H, W = s.image.shape[:2]
        for pl in res.placements:
            x, y = pl["xy"]
            h, w = pl["label_mask"].shape
            truncated += x < 0 or y < 0 or x + w > W or y + h > H
    assert truncated > 10


def _synthetic_case(seed: int):
    """Random image, random (possibly overlapping, border-touching, holed) objects and instances."""
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(40, 200)), int(rng.integers(40, 200))
    image = rng.integers(0, 256, (H, W, 3), np.uint8)
    polys, masks, boxes, classes = [], [], [], []
    for _ in range(int(rng.integers(0, 8))):
        c = rng.uniform([-10, -10], [W + 10, H + 10])
        r = rng.uniform(2, max(H, W) / 2)
        ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 12))))
        rad = r * rng.uniform(0.4, 1.0, len(ang))
        poly = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1).astype(np.float32)
        m = rasterize(poly, H, W)
        b = extent_box(m)
        if b is None:
            continue
        polys.append(poly)
        masks.append(m)
        boxes.append(b)
        classes.append(int(rng.integers(0, 80)))
    n = len(classes)
    sample = Sample("synthetic", image, np.array(classes, np.int64).reshape(n), polys,
                    np.array(masks, bool).reshape(n, H, W), np.array(boxes, np.float32).reshape(n, 4))
    insts = []
    for j in range(3):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 256, 3)
        a = np.zeros((h, w), np.uint8)
        cv2.ellipse(a, (w // 2, h // 2), (max(w // 2 - 1, 1), max(h // 2 - 1, 1)), 0, 0, 360, 255, -1)
        if rng.random() < 0.5:  # a hole and a detached part
            cv2.circle(a, (w // 2, h // 2), max(min(h, w) // 6, 1), 0, -1)
            cv2.circle(a, (1, 1), 1, 255, -1)
        rgba[..., 3] = cv2.GaussianBlur(a, (3, 3), 1) if rng.random() < 0.5 else a
        insts.append(MemoryInstance(f"s{seed}-{j}", "thing", int(rng.integers(0, 80)), rgba))
    return sample, MemorySource(insts), rng


@pytest.mark.parametrize("mode", MODES)
def test_random_synthetic_cases(mode):
    """Many small random scenes (tiny objects, border objects, holes, soft alphas) through the checker."""
    for seed in range(60):
        s, src, rng = _synthetic_case(seed)
        cfg = PasteConfig(
            n=(0, 6), max_ioa=float(rng.choice([0.3, 1.0])), scale_range=(0.05, 0.9),
            rotation=float(rng.choice([0, 30])), min_inside=float(rng.choice([0.2, 1.0])),
            allow_truncation=bool(rng.random() < 0.7), blend=str(rng.choice(["hard", "alpha", "feather", "poisson"])),
            harmonize=str(rng.choice(["none", "reinhard", "linear_ot"])), min_side=2,
        )
        res = PasteEngine(src, cfg)(s.image, _targets(s, mode), np.random.default_rng(seed))
        check_paste_result(s, res, s.image.shape[:2], 80, cfg, mode)
        check_pixels(s.image, res)


def test_bank_sampler_options_pass_through(real_bank):  # noqa: F811
    """An InstanceBank source gets a BankSampler built from the config's sampler options."""
    img = np.full((240, 320, 3), 128, np.uint8)
    engine = PasteEngine(real_bank, PasteConfig(n=4, max_ioa=1.0, sampler_mode="weights",
                                                sampler_weights={"person": 1.0, "car": 0.0}))
    cats = {pl["category"] for i in range(5) for pl in engine(img, Targets.empty(), np.random.default_rng(i)).placements}
    assert cats == {"person"}
    with pytest.raises(TypeError, match="no_such_option"):
        PasteEngine(real_bank, PasteConfig(sampler_options={"no_such_option": 1}))
    engine = PasteEngine(real_bank, PasteConfig(n=3, max_ioa=1.0, sampler_options={"min_side": 10_000}))
    res = engine(img, Targets.empty(), np.random.default_rng(0))
    assert res.placements == []  # nothing in the bank is that large: a no-op, not an error
