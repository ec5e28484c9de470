"""Label correctness of the paste engine on real coco128-seg images, checked by an independent checker."""
from __future__ import annotations

import numpy as np
import pytest
from label_checks import check_paste_result, check_pixels
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
