"""PasteEngine behaviour: determinism, channel order, config, bad input, image kinds, no-ops."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from label_checks import MemoryInstance, MemorySource, check_paste_result
from paste_fixtures import coco_samples, memory_source, rgba_instances  # noqa: F401

from genval_aug.errors import ConfigError, TargetsError
from genval_aug.paste import PasteConfig, PasteEngine, PasteResult, Targets, paste_instances


def _t(s, mode="masks"):
    return Targets(s.boxes, s.classes, masks=s.masks if mode == "masks" else None,
                   polygons=s.polygons if mode == "polygons" else None)


def _same(a: PasteResult, b: PasteResult) -> bool:
    ok = np.array_equal(a.image, b.image) and np.array_equal(a.targets.boxes, b.targets.boxes)
    ok &= np.array_equal(a.targets.classes, b.targets.classes) and np.array_equal(a.kept, b.kept)
    ok &= a.instance_ids == b.instance_ids
    if a.targets.masks is not None:
        ok &= np.array_equal(a.targets.masks, b.targets.masks)
    return bool(ok)


def test_core_does_not_import_torch():
    code = "import genval_aug.paste, sys; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deterministic_per_seed(coco_samples, memory_source):  # noqa: F811
    engine = PasteEngine(memory_source, PasteConfig(n=(1, 5), rotation=15, hue=0.05))
    s = coco_samples[3]
    a = engine(s.image, _t(s), np.random.default_rng(42))
    b = engine(s.image, _t(s), np.random.default_rng(42))
    assert _same(a, b)
    others = [engine(s.image, _t(s), np.random.default_rng(seed)) for seed in range(43, 48)]
    assert not all(_same(a, o) for o in others)
    # the functional form is the same computation
    c = paste_instances(s.image, _t(s), memory_source, np.random.default_rng(42), engine.config)
    assert _same(a, c)


@pytest.mark.parametrize("harmonize", ["none", "reinhard", "linear_ot"])
def test_bgr_input_gives_the_channel_swapped_result(coco_samples, memory_source, harmonize):  # noqa: F811
    engine = PasteEngine(memory_source, PasteConfig(n=3, harmonize=harmonize, hue=0.05))
    for s in coco_samples[:4]:
        rgb = engine(s.image, _t(s), np.random.default_rng(1), channel_order="rgb")
        bgr = engine(np.ascontiguousarray(s.image[..., ::-1]), _t(s), np.random.default_rng(1), channel_order="bgr")
        assert np.abs(rgb.image.astype(int) - bgr.image[..., ::-1]).max() <= 1
        np.testing.assert_array_equal(rgb.targets.masks, bgr.targets.masks)


def test_inputs_not_modified(coco_samples, memory_source):  # noqa: F811
    s = coco_samples[0]
    img, boxes, masks = s.image.copy(), s.boxes.copy(), s.masks.copy()
    polys = [p.copy() for p in s.polygons]
    engine = PasteEngine(memory_source, PasteConfig(n=6, max_ioa=1.0))
    engine(s.image, _t(s), np.random.default_rng(0))
    engine(s.image, _t(s, "polygons"), np.random.default_rng(0))
    assert np.array_equal(img, s.image) and np.array_equal(boxes, s.boxes) and np.array_equal(masks, s.masks)
    assert all(np.array_equal(a, b) for a, b in zip(polys, s.polygons, strict=True))


def test_count_specs(memory_source):  # noqa: F811
    img = np.full((200, 200, 3), 100, np.uint8)
    rng = np.random.default_rng(0)
    for n, allowed in [(0, {0}), (2, {2}), ((1, 3), {1, 2, 3}), ({0: 0.5, 4: 0.5}, {0, 4})]:
        engine = PasteEngine(memory_source, PasteConfig(n=n, max_ioa=1.0, scale_range=(0.1, 0.2)))
        seen = {len(engine(img, Targets.empty(), rng).placements) for _ in range(30)}
        assert seen <= allowed and (len(allowed) == 1 or len(seen) > 1)


def test_probability_p(memory_source):  # noqa: F811
    img = np.full((100, 100, 3), 100, np.uint8)
    engine = PasteEngine(memory_source, PasteConfig(n=1, p=0.5, max_ioa=1.0))
    rng = np.random.default_rng(0)
    pasted = [len(engine(img, Targets.empty(), rng).placements) for _ in range(200)]
    assert 60 < sum(pasted) < 140
    res = PasteEngine(memory_source, PasteConfig(n=3, p=0.0))(img, Targets.empty(), rng)
    assert res.placements == [] and np.array_equal(res.image, img) and res.image is not img


def test_class_map(memory_source, coco_samples):  # noqa: F811
    s = coco_samples[1]
    engine = PasteEngine(memory_source, PasteConfig(n=4, max_ioa=1.0), class_map=lambda name: 7 if name == "car" else None)
    res = engine(s.image, _t(s), np.random.default_rng(3))
    assert all(pl["category"] == "car" and pl["class"] == 7 for pl in res.placements)
    assert (res.targets.classes[res.pasted] == 7).all()
    engine = PasteEngine(memory_source, PasteConfig(n=4), class_map={"car": 1})
    with pytest.raises(ConfigError, match="class_map has no entry"):
        for seed in range(10):
            engine(s.image, _t(s), np.random.default_rng(seed))


def test_empty_source_is_a_documented_noop(coco_samples):  # noqa: F811
    class Empty:
        def sample(self, rng, n):
            return []

    s = coco_samples[0]
    res = PasteEngine(Empty(), PasteConfig(n=3))(s.image, _t(s), np.random.default_rng(0))
    assert np.array_equal(res.image, s.image) and np.array_equal(res.targets.masks, s.masks)
    assert res.kept.tolist() == list(range(len(s.classes))) and not res.pasted.any()


def test_unusable_instances_are_skipped_counted_and_logged_once(caplog):
    good = np.zeros((20, 20, 4), np.uint8)
    good[5:15, 5:15] = 255
    src = MemorySource([
        MemoryInstance("empty", "x", 0, np.zeros((20, 20, 4), np.uint8)),
        MemoryInstance("rgb", "x", 0, np.zeros((20, 20, 3), np.uint8)),
        MemoryInstance("float", "x", 0, np.zeros((20, 20, 4), np.float32)),
        MemoryInstance("ok", "x", 0, good),
    ])
    engine = PasteEngine(src, PasteConfig(n=4, max_ioa=1.0))
    with caplog.at_level("WARNING", logger="genval_aug.paste.engine"):
        results = [engine(np.zeros((50, 50, 3), np.uint8), Targets.empty(), np.random.default_rng(i)) for i in range(5)]
    n_ok = sum(len(r.placements) for r in results)
    assert n_ok > 0 and engine.skipped == 20 - n_ok
    assert all(pl["id"] == "ok" for r in results for pl in r.placements)
    assert len([r for r in caplog.records if "skipping instance" in r.getMessage()]) == 1


def test_bad_source_and_config():
    with pytest.raises(ConfigError):
        PasteEngine(object())
    with pytest.raises(ConfigError):
        PasteConfig(blend="smudge")
    with pytest.raises(ConfigError):
        PasteConfig(harmonize="magic")
    with pytest.raises(ConfigError):
        PasteConfig(n=(3, 1))
    with pytest.raises(ConfigError):
        PasteConfig(p=1.5)
    with pytest.raises(ConfigError):
        PasteConfig(scale_range=(0.5, 0.1))
    # numeric fields out of their range used to be accepted and silently change what is pasted (NaN max_ioa:
    # nothing fits; a negative rotation: no rotation; hflip 2: always flipped)
    for name, bad in [("max_ioa", float("nan")), ("rotation", -5), ("hflip", 2.0), ("harmonize_strength", 1.5),
                      ("min_visible_fraction", float("nan")), ("hue", 0.7), ("feather_sigma", -1),
                      ("aspect_jitter", float("inf")), ("harmonize_max_gain", 0.5), ("brightness", "0.1")]:
        with pytest.raises(ConfigError, match=f"PasteConfig.{name} must be"):
            PasteConfig(**{name: bad})
    PasteConfig(max_ioa=float("inf"), max_box_shift=float("inf"), min_remaining_area=0, rotation=180, hflip=True)


def test_bad_targets_raise_clear_errors(memory_source):  # noqa: F811
    engine = PasteEngine(memory_source)
    img = np.zeros((100, 120, 3), np.uint8)
    rng = np.random.default_rng(0)
    b = np.array([[10, 10, 50, 50]], np.float32)
    cases = [
        (Targets(b, np.array([1, 2])), "classes has 2 entries"),
        (Targets(b[:, :3], np.array([1])), r"shape \(N, 4\)"),
        (Targets(b, np.array([1]), masks=np.zeros((2, 100, 120), bool)), "masks must have shape"),
        (Targets(b, np.array([1]), masks=np.zeros((1, 99, 120), bool)), "masks must have shape"),
        (Targets(b, np.array([1]), polygons=[]), "polygons has 0 entries"),
        (Targets(b, np.array([1]), polygons=[np.zeros((3, 3))]), r"polygons\[0\] must have shape"),
        (Targets(np.array([[50, 10, 10, 50]], np.float32), np.array([1])), "not xyxy"),
        (Targets(np.array([[130, 10, 150, 50]], np.float32), np.array([1])), "outside"),
        (Targets(np.array([[np.nan, 10, 15, 50]], np.float32), np.array([1])), "not finite"),
        (Targets(b, np.array([0.5])), "integers"),
        (Targets(b, np.array(["person"])), "integers"),  # used to be numpy's TypeError from np.mod
        (Targets(b, np.array([None])), "integers"),
        (Targets(b, np.array([1]), masks=np.zeros((1, 100, 120), bool), polygons=[np.zeros((3, 2))]), "not both"),
    ]
    for t, msg in cases:
        with pytest.raises(TargetsError, match=msg):
            engine(img, t, rng)
    with pytest.raises(TargetsError, match="uint8"):
        engine(img.astype(np.float32), Targets.empty(), rng)
    with pytest.raises(TargetsError, match="image must be"):
        engine(np.zeros((10, 10, 5), np.uint8), Targets.empty(), rng)
    res = engine(img, Targets(b, np.array([3], object)), rng)  # an object array of whole numbers is fine
    assert res.targets.classes[0] == 3 and res.targets.classes.dtype == np.int64
    for shape in [(0, 0, 3), (5, 0, 3), (0, 7), (0, 4, 1), (0, 4, 4)]:  # used to be ZeroDivisionError / cv2.error
        with pytest.raises(TargetsError, match="positive height and width"):
            engine(np.zeros(shape, np.uint8), Targets.empty(), rng)
    with pytest.raises(ConfigError, match="rng"):
        engine(img, Targets.empty(), 0)
    with pytest.raises(ConfigError, match="channel_order"):
        engine(img, Targets.empty(), rng, channel_order="hsv")


def test_boxes_partly_outside_are_clipped(memory_source):  # noqa: F811
    engine = PasteEngine(memory_source, PasteConfig(n=0))
    t = Targets(np.array([[-5, 10, 50, 130]], np.float32), np.array([3]))
    res = engine(np.zeros((100, 120, 3), np.uint8), t, np.random.default_rng(0))
    assert res.targets.boxes.tolist() == [[0, 10, 50, 100]]


def test_grayscale_and_rgba_images(coco_samples, memory_source):  # noqa: F811
    s = coco_samples[2]
    engine = PasteEngine(memory_source, PasteConfig(n=3, max_ioa=1.0))
    gray = s.image.mean(axis=2).astype(np.uint8)
    for img in (gray, gray[..., None]):
        res = engine(img, _t(s), np.random.default_rng(0))
        assert res.image.shape == img.shape and res.image.dtype == np.uint8
        check_paste_result(s, res, img.shape[:2], 80, engine.config, "masks")
    rgba = np.dstack([s.image, np.full(s.image.shape[:2], 90, np.uint8)])
    res = engine(rgba, _t(s), np.random.default_rng(0))
    ref = engine(s.image, _t(s), np.random.default_rng(0))
    assert res.image.shape == rgba.shape
    np.testing.assert_array_equal(res.image[..., :3], ref.image)
    union = np.zeros(s.image.shape[:2], bool)
    for pl in res.placements:
        x, y = pl["xy"]
        lab = pl["label_mask"]
        h, w = lab.shape
        H, W = union.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        union[y0:y1, x0:x1] |= lab[y0 - y : y1 - y, x0 - x : x1 - x]
    assert (res.image[..., 3][union] == 255).all() and (res.image[..., 3][~union] == 90).all()


def test_empty_targets_and_tiny_image(memory_source):  # noqa: F811
    engine = PasteEngine(memory_source, PasteConfig(n=2))
    for mode in ("boxes", "masks", "polygons"):
        res = engine(np.zeros((64, 48, 3), np.uint8), Targets.empty((64, 48), mode), np.random.default_rng(0))
        assert len(res.targets) == len(res.placements) == 2
        assert res.targets.mode == mode
    res = engine(np.zeros((6, 5, 3), np.uint8), Targets.empty(), np.random.default_rng(0))
    assert (res.targets.boxes[:, 2] <= 5).all() and (res.targets.boxes[:, 3] <= 6).all()


def test_instance_that_vanishes_when_shrunk_is_not_pasted():
    """A sparse instance (two opaque pixels far apart) shrunk into a tiny image keeps no visible pixel after the
    anti-aliased resize; it is not pasted (it used to crash in cv2.cvtColor on the empty patch)."""
    sparse = np.zeros((400, 400, 4), np.uint8)
    sparse[..., :3] = 90
    sparse[0, 0, 3] = sparse[399, 399, 3] = 255
    src = MemorySource([MemoryInstance("sparse", "x", 0, sparse)])
    engine = PasteEngine(src, PasteConfig(n=3, scale_range=(0.5, 0.5), allow_truncation=False, max_ioa=1.0))
    image = np.zeros((8, 8, 3), np.uint8)
    res = engine(image, Targets.empty(), np.random.default_rng(0))
    assert res.placements == [] and len(res.targets) == 0 and np.array_equal(res.image, image)
    assert engine.skipped == 0  # the instance itself is usable (it pastes into larger images)
    res = engine(np.zeros((400, 400, 3), np.uint8), Targets.empty(), np.random.default_rng(0))
    assert len(res.placements) == 3


@pytest.mark.parametrize("rotation", [0.0, 45.0])
def test_no_truncation_keeps_every_object_inside(rotation):
    """allow_truncation=False: the whole patch lies inside the image. Objects sized to fill the image used to
    overflow it once rotated (the canvas grows) or by the pixel the anti-aliased resize can add, and were cut."""
    rgba = np.zeros((90, 60, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[5:85, 5:55, 3] = 255
    engine = PasteEngine(MemorySource([MemoryInstance("box", "x", 0, rgba)]),
                         PasteConfig(n=3, allow_truncation=False, rotation=rotation, scale_range=(0.7, 1.0),
                                     max_ioa=1.0, aspect_jitter=0.5))
    n = 0
    for seed in range(30):
        H, W = 12 + seed, 40 - seed
        res = engine(np.zeros((H, W, 3), np.uint8), Targets.empty((H, W), "masks"), np.random.default_rng(seed))
        for pl in res.placements:
            (x, y), (h, w) = pl["xy"], pl["label_mask"].shape
            assert 0 <= x and x + w <= W and 0 <= y and y + h <= H, (seed, pl["xy"], (h, w), (H, W))
            n += 1
        for k, pl in enumerate(res.placements):  # nothing was cut by the border
            if pl["output_index"] is not None and k == len(res.placements) - 1:
                assert res.targets.masks[pl["output_index"]].sum() == pl["label_mask"].sum()
    assert n == 90
