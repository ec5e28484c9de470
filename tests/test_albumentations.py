"""albumentations 2.0.x adapter (genval_aug.albumentations.GenValPaste) on real coco128-seg images."""
from __future__ import annotations

import json

import adapter_helpers
import numpy as np
import pytest
import torch
from adapter_helpers import AlbuSampleDataset, Recorder, check_output_objects
from label_checks import check_paste_result, coco128_samples

A = pytest.importorskip("albumentations")

from genval_aug.albumentations import GenValPaste, class_map_from_names  # noqa: E402
from genval_aug.errors import ConfigError, TargetsError  # noqa: E402

bank_path, names = adapter_helpers.bank_path, adapter_helpers.names  # the shared module-scoped fixtures

FORMATS = ("pascal_voc", "coco", "yolo", "albumentations")


@pytest.fixture(scope="module")
def samples(coco128_seg):
    return coco128_samples(coco128_seg, limit=12)


def to_format(xyxy: np.ndarray, fmt: str, hw) -> np.ndarray:
    H, W = hw
    b = np.asarray(xyxy, np.float64).reshape(-1, 4).copy()
    if fmt == "coco":
        b[:, 2:] -= b[:, :2]
    elif fmt == "yolo":
        b = np.c_[(b[:, 0] + b[:, 2]) / 2 / W, (b[:, 1] + b[:, 3]) / 2 / H, (b[:, 2] - b[:, 0]) / W,
                  (b[:, 3] - b[:, 1]) / H]
    elif fmt == "albumentations":
        b /= [W, H, W, H]
    return b


def from_format(b, fmt: str, hw) -> np.ndarray:
    H, W = hw
    b = np.asarray(b, np.float64).reshape(-1, 4).copy()
    if fmt == "coco":
        b[:, 2:] += b[:, :2]
    elif fmt == "yolo":
        cx, cy, w, h = (b[:, 0] * W, b[:, 1] * H, b[:, 2] * W, b[:, 3] * H)
        b = np.c_[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    elif fmt == "albumentations":
        b *= [W, H, W, H]
    return b


def flip_boxes(xyxy: np.ndarray, W: int) -> np.ndarray:
    out = xyxy.copy()
    out[:, 0], out[:, 2] = W - xyxy[:, 2], W - xyxy[:, 0]
    return out


def pipeline(bank_path, names, fmt, seed=0, **kw):
    paste = GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), p=1.0,
                        config={"n": [1, 4], "max_ioa": 0.6}, **kw)
    rec = Recorder(paste.paster)
    paste.paster = rec
    tf = A.Compose([paste, A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)],
                   bbox_params=A.BboxParams(format=fmt, label_fields=["class_labels"]), seed=seed)
    return tf, rec


def test_label_checker_in_every_bbox_format(bank_path, samples, names):
    totals = {"pasted": 0, "occluded": 0, "flipped": 0, "calls": 0}
    for k, fmt in enumerate(FORMATS):
        tf, rec = pipeline(bank_path, names, fmt, seed=k)
        cfg = rec.inner.engine.config
        for i, s in enumerate(samples):
            H, W = s.image.shape[:2]
            as_list = (i + k) % 2 == 0
            masks = list(s.masks.astype(np.uint8)) if as_list else s.masks.astype(np.uint8)
            out = tf(image=s.image, bboxes=to_format(s.boxes, fmt, (H, W)), class_labels=s.classes.tolist(),
                     masks=masks)
            _, core_in, res = rec.calls[-1]
            np.testing.assert_allclose(core_in.boxes, s.boxes, atol=1e-3)
            assert np.array_equal(core_in.masks, s.masks)
            st = check_paste_result(core_in, res, (H, W), len(names), cfg, "masks")
            totals["pasted"] += st["pasted"]
            totals["occluded"] += st["occluded"]
            totals["calls"] += 1
            t = res.targets
            n = len(t.classes)
            assert isinstance(out["masks"], list) == as_list and len(out["masks"]) == n
            out_masks = np.asarray(out["masks"]).astype(bool)
            flipped = not np.array_equal(out_masks, t.masks)
            totals["flipped"] += flipped
            exp_masks, exp_boxes = (t.masks[:, :, ::-1], flip_boxes(t.boxes, W)) if flipped else (t.masks, t.boxes)
            assert np.array_equal(out_masks, exp_masks), "masks are the core's (or their flip)"
            assert len(out["bboxes"]) == len(out["class_labels"]) == n
            boxes = from_format(out["bboxes"], fmt, (H, W))
            np.testing.assert_allclose(boxes, exp_boxes, atol=2e-3)
            assert [int(c) for c in out["class_labels"]] == t.classes.tolist()
            check_output_objects(boxes, np.asarray(out["class_labels"], np.int64), out_masks, (H, W), len(names))
            assert out["image"].shape == s.image.shape and out["image"].dtype == np.uint8
    assert totals["pasted"] >= totals["calls"] and totals["occluded"] > 0, totals
    assert 0 < totals["flipped"] < totals["calls"], totals


def test_string_labels_extra_fields_and_empty_inputs(bank_path, samples, names):
    s = samples[0]
    H, W = s.image.shape[:2]
    tf = A.Compose([GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), p=1.0,
                                label_field="class_labels", label_defaults={"iscrowd": 0}, config={"n": 2})],
                   bbox_params=A.BboxParams(format="coco", label_fields=["iscrowd", "class_labels"]), seed=3)
    str_labels = [names[c] for c in s.classes]
    out = tf(image=s.image, bboxes=to_format(s.boxes, "coco", (H, W)), class_labels=str_labels,
             iscrowd=[1] * len(s.classes), masks=list(s.masks.astype(np.uint8)))
    n = len(out["bboxes"])
    assert n == len(out["class_labels"]) == len(out["iscrowd"]) == len(out["masks"])
    n_pasted = n - sum(1 for c in out["iscrowd"] if c == 1)
    assert n_pasted >= 1
    assert all(isinstance(c, str) for c in out["class_labels"])
    assert set(out["class_labels"][n - n_pasted:]) <= {"person", "car", "elephant", "potted plant"}
    assert list(out["iscrowd"][n - n_pasted:]) == [0] * n_pasted
    # empty box / mask lists: the pasted objects come with labels and masks
    out = tf(image=s.image, bboxes=[], class_labels=[], iscrowd=[], masks=[])
    n = len(out["bboxes"])
    assert n >= 1 and len(out["class_labels"]) == len(out["iscrowd"]) == len(out["masks"]) == n
    boxes = from_format(out["bboxes"], "coco", (H, W))
    check_output_objects(boxes, np.zeros(n, np.int64), np.asarray(out["masks"]).astype(bool), (H, W), 1)
    assert all(isinstance(c, str) for c in out["class_labels"])  # string labels seen before in this process

    # an empty first image cannot show that labels are names: class_names=True says so, None gives ids there
    # (numbers: albumentations hands list labels back as floats)
    for class_names, kind in ((True, str), (None, float)):
        tf = A.Compose([GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), p=1.0,
                                    class_names=class_names, config={"n": 2})],
                       bbox_params=A.BboxParams(format="coco", label_fields=["class_labels"]), seed=3)
        out = tf(image=s.image, bboxes=[], class_labels=[])
        assert len(out["class_labels"]) >= 1 and all(isinstance(c, kind) for c in out["class_labels"]), class_names


def test_downstream_filters_float_and_gray_images(bank_path, samples, names):
    s = samples[1]
    H, W = s.image.shape[:2]
    cm = class_map_from_names(names, bank_path)
    # min_area is applied by albumentations after the paste, to original and pasted boxes alike
    tf = A.Compose([GenValPaste(bank_path, class_map=cm, p=1.0, config={"n": 3})],
                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"], min_area=4000),
                   seed=0)
    out = tf(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    areas = np.prod(np.diff(np.asarray(out["bboxes"]).reshape(-1, 2, 2), axis=1), axis=-1).ravel()
    assert len(out["class_labels"]) == len(areas) and np.all(areas >= 4000)
    tf = A.Compose([GenValPaste(bank_path, class_map=cm, p=1.0, config={"n": 2})],
                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]), seed=0)
    f = s.image.astype(np.float32) / 255
    out = tf(image=f, bboxes=s.boxes, class_labels=s.classes)
    assert out["image"].dtype == np.float32 and 0 <= out["image"].min() and out["image"].max() <= 1
    changed = np.any(np.abs(out["image"] - f) > 0, axis=2)
    assert changed.any() and not changed.all()
    gray = s.image.mean(2).astype(np.uint8)
    out = tf(image=gray, bboxes=s.boxes, class_labels=s.classes)
    assert out["image"].shape == gray.shape and len(out["class_labels"]) > len(s.classes) - 3


def test_p_seed_and_serialization(bank_path, samples, names):
    s = samples[2]
    cm = class_map_from_names(names, bank_path)

    def make(seed, p=1.0):
        return A.Compose([GenValPaste(bank_path, class_map=cm, p=p), A.HorizontalFlip()],
                         bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]), seed=seed)

    a, b = make(7), make(7)
    for _ in range(3):
        oa = a(image=s.image, bboxes=s.boxes, class_labels=s.classes)
        ob = b(image=s.image, bboxes=s.boxes, class_labels=s.classes)
        assert np.array_equal(oa["image"], ob["image"]) and np.allclose(oa["bboxes"], ob["bboxes"])
    oc = make(8)(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    assert not np.array_equal(oa["image"], oc["image"])
    # p gates the transform like any albumentations transform
    half = make(1, p=0.5)
    applied = sum(len(half(image=s.image, bboxes=s.boxes, class_labels=s.classes)["bboxes"]) != len(s.boxes)
                  for _ in range(40))
    assert 8 <= applied <= 32
    never = make(1, p=0.0)
    out = never(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    assert len(out["bboxes"]) == len(s.boxes)
    # A.to_dict / from_dict round trip (plain JSON), same seed -> same output
    d = A.to_dict(make(7))
    restored = A.from_dict(json.loads(json.dumps(d)))
    restored.set_random_seed(7)
    fresh = make(7)
    o1 = restored(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    o2 = fresh(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    assert np.array_equal(o1["image"], o2["image"]) and np.array_equal(o1["class_labels"], o2["class_labels"])
    t = d["transform"]["transforms"][0]
    assert t["__class_fullname__"] == "genval_aug.albumentations.GenValPaste" and t["class_map"] == cm
    assert t["cache_mb"] == 256.0 and type(restored.transforms[0].paster.source).__name__ == "CachedInstanceBank"


def test_bad_input_is_a_clear_error(bank_path, samples, names):
    s = samples[0]
    H, W = s.image.shape[:2]
    tf = A.Compose([GenValPaste(bank_path, p=1.0)],
                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]))
    kw = dict(image=s.image, bboxes=s.boxes, class_labels=s.classes)
    with pytest.raises(TargetsError, match="masks: 1 masks"):
        tf(**kw, masks=[s.masks[0].astype(np.uint8)])
    with pytest.raises(TargetsError, match="semantic"):
        tf(**kw, mask=np.zeros((H, W), np.uint8))
    with pytest.warns(UserWarning, match="keypoints"):  # albumentations: no transform handles key points
        kp = A.Compose([GenValPaste(bank_path, p=1.0)],
                       bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]),
                       keypoint_params=A.KeypointParams(format="xy"))
    with pytest.raises(TargetsError, match="keypoints"):
        kp(**kw, keypoints=[(5, 5)])
    with pytest.raises(TargetsError, match="float"):
        tf(image=s.image.astype(np.float32), bboxes=s.boxes, class_labels=s.classes)
    with pytest.raises(TargetsError, match="bbox_params"):
        A.Compose([GenValPaste(bank_path, p=1.0)])(image=s.image)
    two = A.Compose([GenValPaste(bank_path, p=1.0)],
                    bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels", "ids"]))
    with pytest.raises(ConfigError, match="label_defaults"):
        two(**kw, ids=list(range(len(s.classes))))
    with pytest.raises(ConfigError, match="none of the class_map categories"):
        A.Compose([GenValPaste(bank_path, class_map={"unicorn": 1}, p=1.0)],
                  bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]))(**kw)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_workers(bank_path, coco128_seg, names, context):
    small = coco128_samples(coco128_seg, limit=2, size=160)
    tf = A.Compose([GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), p=1.0,
                                config={"n": 2}), A.HorizontalFlip()],
                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]), seed=0)
    ds = AlbuSampleDataset(small[:1], tf, length=8)
    ds[0]  # the parent opens the bank and builds the engine first
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    items = list(loader)
    assert len(items) == 8
    for img, boxes, labels, masks in items:
        img, boxes, labels, masks = (np.asarray(x) for x in (img, boxes, labels, masks))
        n = len(labels)
        assert n > len(small[0].classes) - 2 and boxes.shape == (n, 4) and masks.shape[0] == n
        check_output_objects(boxes, labels.astype(np.int64), masks.astype(bool), img.shape[:2], len(names))
    # albumentations copies one generator state into both workers; the adapter splits it by worker id, so
    # the 8 items (4 per worker) are 8 different pastes, not 4 pairs
    sums = {int(np.asarray(it[0]).sum()) for it in items}
    assert len(sums) > 4


def _reseed_compose(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.compose.set_random_seed(torch.initial_seed() % 2**32)  # differs per worker and per epoch


@pytest.mark.slow
def test_non_persistent_workers_repeat_every_epoch(bank_path, coco128_seg, names):
    """What the README says: albumentations 2.0.8 restarts each worker from the parent's generator state every
    epoch, so non-persistent workers repeat their random stream (every transform, ours included);
    persistent workers or a reseeding worker_init_fn avoid it."""
    small = coco128_samples(coco128_seg, limit=1, size=128)

    def epochs(**loader_kw):
        tf = A.Compose([GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), p=1.0,
                                    config={"n": 2}), A.HorizontalFlip(), A.RandomBrightnessContrast(p=1.0)],
                       bbox_params=A.BboxParams(format="pascal_voc", label_fields=["class_labels"]), seed=0)
        ds = AlbuSampleDataset(small, tf, length=6)
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                                             **loader_kw)
        return [[np.asarray(item[0]).tobytes() for item in loader] for _ in range(2)]

    first, second = epochs()
    assert first == second and len(set(first)) > 1  # every epoch the same augmentations
    first, second = epochs(persistent_workers=True)
    assert all(a != b for a, b in zip(first, second, strict=True))
    first, second = epochs(worker_init_fn=_reseed_compose)
    assert all(a != b for a, b in zip(first, second, strict=True))


def _square_source():
    from label_checks import MemoryInstance, MemorySource

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[4:16, 4:16] = 200
    return MemorySource([MemoryInstance("a", "thing", 3, rgba)])


@pytest.mark.parametrize("empty", [[], np.zeros((0, 4)), np.zeros((0, 5))])
def test_empty_boxes_without_label_fields(empty):
    """Without label_fields the class is each box's extra column; an image with no objects (which albumentations
    hands over without columns) gets pasted rows with that column instead of a TargetsError."""
    tf = A.Compose([GenValPaste(_square_source(), config={"n": 2, "max_ioa": 1.0}, p=1.0)],
                   bbox_params=A.BboxParams(format="pascal_voc"), seed=0)
    out = tf(image=np.zeros((64, 64, 3), np.uint8), bboxes=empty)
    rows = np.asarray(out["bboxes"])
    assert rows.shape == (2, 5) and (rows[:, 4] == 3).all()
    assert (rows[:, 2] > rows[:, 0]).all() and (rows[:, 3] > rows[:, 1]).all()


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.float32])
def test_empty_mask_array_keeps_its_dtype(dtype):
    """Pasted masks take the dtype of the input masks, also of an empty (0, H, W) array (bool masks used to
    come back as uint8 when the image had no objects)."""
    tf = A.Compose([GenValPaste(_square_source(), config={"n": 2, "max_ioa": 1.0}, p=1.0)],
                   bbox_params=A.BboxParams(format="pascal_voc", label_fields=["cls"]), seed=0)
    out = tf(image=np.zeros((64, 64, 3), np.uint8), bboxes=[], cls=[], masks=np.zeros((0, 64, 64), dtype))
    masks = np.asarray(out["masks"])
    assert masks.shape == (2, 64, 64) and masks.dtype == dtype
    assert set(np.unique(masks).tolist()) == {0, 1}
