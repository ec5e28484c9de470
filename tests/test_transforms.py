"""torchvision transforms v2 adapter (GenValPaste) on real coco128-seg images with a real LMDB bank."""
from __future__ import annotations

import pickle

import adapter_helpers
import numpy as np
import pytest
import torch
from adapter_helpers import (
    Recorder,
    TVSampleDataset,
    check_output_objects,
    collate_list,
)
from label_checks import check_paste_result, coco128_samples
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from genval_aug.bank import InstanceBank
from genval_aug.errors import BankError, ConfigError, TargetsError
from genval_aug.transforms import GenValPaste, class_map_from_names

bank_path, names = adapter_helpers.bank_path, adapter_helpers.names  # the shared module-scoped fixtures

FORMATS = ("XYXY", "XYWH", "CXCYWH")


@pytest.fixture(scope="module")
def samples(coco128_seg):
    return coco128_samples(coco128_seg, limit=40)


def to_tv(s, fmt="XYXY", kind="image", extra=True):
    """A label_checks.Sample as the detection references' (image, target) with boxes in ``fmt``."""
    H, W = s.image.shape[:2]
    chw = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
    img = {"image": tv_tensors.Image(chw), "float": tv_tensors.Image(chw.float() / 255),
           "tensor": chw, "pil": PILImage.fromarray(s.image)}[kind]
    boxes = tv_tensors.BoundingBoxes(torch.from_numpy(s.boxes), format="XYXY", canvas_size=(H, W))
    target = {"boxes": F.convert_bounding_box_format(boxes, new_format=fmt),
              "masks": tv_tensors.Mask(torch.from_numpy(s.masks).to(torch.uint8)),
              "labels": torch.from_numpy(s.classes), "image_id": 7}
    if extra:
        target["area"] = torch.from_numpy(s.masks.reshape(len(s.masks), -1).sum(1).astype(np.float32))
        target["iscrowd"] = torch.zeros(len(s.classes), dtype=torch.int64)
    return img, target


def xyxy_of(boxes):
    return F.convert_bounding_box_format(boxes, new_format="XYXY").as_subclass(torch.Tensor).numpy()


def test_label_checker_over_real_samples_every_format(bank_path, samples, names):
    cm = class_map_from_names(names, bank_path)
    paste = GenValPaste(bank_path, class_map=cm, seed=0, n=(1, 4), max_ioa=0.6)
    rec = Recorder(paste.paster)
    paste.paster = rec
    cfg = rec.inner.engine.config
    kinds = ("image", "float", "tensor", "pil")
    totals = {"pasted": 0, "dropped": 0, "occluded": 0, "calls": 0}
    for i, s in enumerate(samples):
        for j, fmt in enumerate(FORMATS):
            kind = kinds[(i + j) % len(kinds)]
            img, target = to_tv(s, fmt, kind)
            out_img, out = paste(img, target)
            _, core_in, res = rec.calls[-1]
            H, W = s.image.shape[:2]
            # the adapter handed the core exactly the sample (xyxy pixels, classes, bool masks)
            np.testing.assert_allclose(core_in.boxes, s.boxes, atol=1e-3)
            assert np.array_equal(core_in.classes, s.classes) and np.array_equal(core_in.masks, s.masks)
            # independent checker on the core's result
            st = check_paste_result(core_in, res, (H, W), len(names), cfg, "masks")
            for k in ("pasted", "dropped", "occluded"):
                totals[k] += st[k]
            totals["calls"] += 1
            t = res.targets
            nk = len(res.kept)
            # output types, formats and dtypes are the input's
            assert type(out_img) is type(img) and out["boxes"].format.name == fmt
            assert out["boxes"].canvas_size == (H, W) and out["boxes"].dtype == target["boxes"].dtype
            assert isinstance(out["masks"], tv_tensors.Mask) and out["masks"].dtype == torch.uint8
            assert out["labels"].dtype == target["labels"].dtype and out["image_id"] == 7
            if kind == "float":
                assert out_img.dtype == torch.float32
                np.testing.assert_allclose(out_img.permute(1, 2, 0).numpy() * 255, res.image, atol=0.51)
            else:
                arr = np.asarray(out_img) if kind == "pil" else out_img.permute(1, 2, 0).numpy()
                assert np.array_equal(arr, res.image)
            # output == core result, in the user's format
            box = xyxy_of(out["boxes"])
            np.testing.assert_allclose(box, t.boxes, atol=1e-3)
            assert np.array_equal(out["masks"].numpy().astype(bool), t.masks)
            assert np.array_equal(out["labels"].numpy(), t.classes)
            assert out["iscrowd"].tolist() == [0] * len(t.classes)
            px = t.masks.reshape(len(t.classes), -1).sum(1)
            np.testing.assert_allclose(out["area"].numpy(), px)  # input area == pixels, so all rows must match
            # untouched originals come back with their exact input box rows
            in_rows = target["boxes"].as_subclass(torch.Tensor)
            for k, i0 in enumerate(res.kept):
                if np.array_equal(t.masks[k], s.masks[i0]):
                    assert torch.equal(out["boxes"].as_subclass(torch.Tensor)[k], in_rows[i0])
            # and what a consumer sees on its own is consistent
            check_output_objects(box, out["labels"].numpy(), out["masks"].numpy().astype(bool), (H, W),
                                 len(names), in_masks=s.masks, n_kept=nk, kept=res.kept)
    assert totals["calls"] == len(samples) * len(FORMATS)
    assert totals["pasted"] >= totals["calls"], totals
    assert totals["occluded"] > 0 and totals["dropped"] >= 0, totals


def test_box_only_samples_and_dict_input(bank_path, samples, names):
    paste = GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), seed=1, n=3)
    for s in samples[:8]:
        img, target = to_tv(s, "XYWH", extra=False)
        del target["masks"]
        sample = {"image": img, **target}
        out = paste(sample)
        assert set(out) == set(sample) and "masks" not in out
        H, W = s.image.shape[:2]
        box = xyxy_of(out["boxes"])
        check_output_objects(box, out["labels"].numpy(), None, (H, W), len(names))
        assert len(out["labels"]) >= len(s.classes) - 3


def test_composes_with_v2_and_sanitize(bank_path, samples, names):
    pipe = v2.Compose([
        GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), seed=2),
        v2.RandomHorizontalFlip(p=1.0),
        v2.RandomPhotometricDistort(p=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])
    for s in samples[:6]:
        img, target = to_tv(s, "CXCYWH")
        out_img, out = pipe(img, target)
        assert out_img.dtype == torch.float32 and out["boxes"].format.name == "CXCYWH"
        n = len(out["labels"])
        assert out["boxes"].shape == (n, 4) and out["masks"].shape[0] == n == len(out["area"]) == len(out["iscrowd"])
        H, W = s.image.shape[:2]
        # the flip keeps the box == mask extent invariant exactly
        check_output_objects(xyxy_of(out["boxes"]), out["labels"].numpy(), out["masks"].numpy().astype(bool),
                             (H, W), len(names))
        assert n > len(s.classes) - 2


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_image_layout_conversions_are_exact(channels):
    from genval_aug.transforms import _image_to_array, _to_chw

    g = torch.Generator().manual_seed(channels)
    chw = torch.randint(0, 256, (channels, 37, 53), dtype=torch.uint8, generator=g)
    strided = torch.randint(0, 256, (channels, 37, 106), dtype=torch.uint8, generator=g)[:, :, ::2]  # a view
    for t in (chw, strided, tv_tensors.Image(chw)):
        arr, info = _image_to_array(t)
        np.testing.assert_array_equal(arr, t.permute(1, 2, 0).numpy())
        back = _to_chw(arr)
        assert back.is_contiguous() and back.dtype == torch.uint8
        torch.testing.assert_close(back, t.as_subclass(torch.Tensor), rtol=0, atol=0)
        assert back.data_ptr() != t.data_ptr()


def test_grayscale_rgba_and_empty_samples(bank_path, samples, names):
    cm = class_map_from_names(names, bank_path)
    paste = GenValPaste(bank_path, class_map=cm, seed=3, n=2)
    s = samples[0]
    H, W = s.image.shape[:2]
    _, target = to_tv(s)
    gray = PILImage.fromarray(s.image).convert("L")
    out_img, out = paste(gray, target)
    assert out_img.mode == "L" and out_img.size == gray.size and len(out["labels"]) >= 1
    one = tv_tensors.Image(torch.from_numpy(np.array(gray))[None])
    out_img, out = paste(one, target)
    assert out_img.shape == (1, H, W) and out_img.dtype == torch.uint8
    rgba = PILImage.fromarray(s.image).convert("RGBA")
    out_img, out = paste(rgba, target)
    assert out_img.mode == "RGBA"
    # an empty sample gets pasted objects only
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W)),
             "masks": tv_tensors.Mask(torch.zeros(0, H, W, dtype=torch.uint8)),
             "labels": torch.zeros(0, dtype=torch.int64)}
    out_img, out = paste(tv_tensors.Image(torch.from_numpy(s.image).permute(2, 0, 1)), empty)
    n = len(out["labels"])
    assert n >= 1 and out["masks"].shape == (n, H, W)
    check_output_objects(xyxy_of(out["boxes"]), out["labels"].numpy(), out["masks"].numpy().astype(bool), (H, W),
                         len(names), n_kept=0)
    assert set(out["labels"].tolist()) <= set(cm.values())


def test_p_zero_returns_sample_untouched(bank_path, samples):
    paste = GenValPaste(bank_path, p=0.0, seed=0)
    img, target = to_tv(samples[0])
    out_img, out = paste(img, target)
    assert out_img is img and out is target


def test_bad_input_is_a_clear_error(bank_path, samples, tmp_path, caplog):
    paste = GenValPaste(bank_path, seed=0)
    s = samples[0]
    H, W = s.image.shape[:2]
    img, target = to_tv(s)
    cases = {
        "labels": dict(target, labels=target["labels"][:-1]),
        "masks": dict(target, masks=tv_tensors.Mask(target["masks"][:-1])),
        "area": dict(target, area=torch.ones(len(s.classes) + 1)),
        "canvas_size": dict(target, boxes=tv_tensors.BoundingBoxes(s.boxes, format="XYXY", canvas_size=(H + 1, W))),
        "lies outside": dict(target, boxes=tv_tensors.BoundingBoxes(s.boxes + 5000, format="XYXY", canvas_size=(H, W))),
        "invalid box": dict(target, boxes=tv_tensors.BoundingBoxes(s.boxes[:, [2, 1, 0, 3]], format="XYXY",
                                                                   canvas_size=(H, W))),
        "semantic": dict(target, masks=tv_tensors.Mask(torch.zeros(H, W, dtype=torch.uint8))),
        "no labels": {k: v for k, v in target.items() if k != "labels"},
        "scores": dict(target, scores=torch.ones(len(s.classes))),
        "canvas_size=\\(H, W\\)": dict(target, boxes=torch.from_numpy(s.boxes)),  # v1-style plain tensor
    }
    for what, bad in cases.items():
        with pytest.raises(TargetsError, match=what.split()[0] if what != "lies outside" else "outside"):
            paste(img, bad)
    with pytest.raises(TargetsError, match="image"):
        paste(img.float() * 2, target)  # not in [0, 1]
    with pytest.raises(TargetsError, match="batches"):
        paste(img[None], target)
    with pytest.raises(TargetsError, match="mode"):
        paste(PILImage.fromarray(s.image).convert("CMYK"), target)
    with pytest.raises(TargetsError, match="BoundingBoxes"):
        paste(img, {"labels": target["labels"]})
    rotated = tv_tensors.BoundingBoxes(torch.cat([torch.from_numpy(s.boxes), torch.zeros(len(s.boxes), 1)], 1),
                                       format="XYWHR", canvas_size=(H, W))
    with pytest.raises(TargetsError, match="XYWHR"):
        paste(img, dict(target, boxes=rotated))
    with pytest.raises(TargetsError, match="KeyPoints"):
        paste(img, dict(target, keypoints=tv_tensors.KeyPoints(torch.zeros(len(s.boxes), 2), canvas_size=(H, W))))
    # per-object fields can be filled explicitly
    ok = GenValPaste(bank_path, seed=0, extra_fields={"scores": 1.0})
    _, out = ok(img, dict(target, scores=torch.full((len(s.classes),), 0.5)))
    assert out["scores"].shape == out["labels"].shape and (out["scores"][len(s.classes):] == 1.0).all()
    # bank and class map problems
    with pytest.raises(BankError, match="no instance bank"):
        GenValPaste(tmp_path / "missing.lmdb")(img, target)
    with pytest.raises(ConfigError, match="none of the class_map categories"):
        GenValPaste(bank_path, class_map={"unicorn": 3})(img, target)
    with pytest.raises(ConfigError, match="PasteConfig fields"):
        GenValPaste(bank_path, no_such_option=1)
    # an empty bank is a logged no-op (a bank being filled by a worker may start empty)
    from genval_aug.bank import BankWriter

    with BankWriter(tmp_path / "empty.lmdb"):
        pass
    with caplog.at_level("WARNING", logger="genval_aug.lazy_engine"):
        out_img, out = GenValPaste(tmp_path / "empty.lmdb", seed=0)(img, target)
    assert out_img is img and out is target and "is empty" in caplog.text


def test_class_map_from_names(bank_path, names, tmp_path):
    cm = class_map_from_names(names, bank_path)
    assert cm == {"person": 0, "car": 2, "elephant": 20, "potted plant": 58}
    tv_names = ["__background__", *names]  # torchvision's 91-style lists put background at 0
    assert class_map_from_names(tv_names, InstanceBank(bank_path))["car"] == 3
    assert class_map_from_names({5: "Potted_Plant", 9: "car"}, ["potted plant", "car", "tiger"]) == {
        "potted plant": 5, "car": 9}
    assert class_map_from_names(["automobile"], ["car"], aliases={"car": "automobile"}) == {"car": 0}
    with pytest.raises(ConfigError, match="tiger"):
        class_map_from_names(names, ["car", "tiger"], strict=True)
    with pytest.raises(ConfigError, match="no bank category"):
        class_map_from_names(["dog"], ["car"])
    # the same matcher as the Ultralytics adapter: LVIS synonyms, explicit overrides, a classes= subset
    lvis = {"person": ["girl", "boy"]}
    assert class_map_from_names(names, ["girl", "car", "tiger"], synonyms=lvis) == {"girl": 0, "car": 2}
    assert class_map_from_names(names, ["tiger", "car"], class_map={"tiger": 21, "car": None}) == {"tiger": 21}
    assert class_map_from_names(names, bank_path, classes=["car", 0]) == {"person": 0, "car": 2}
    with pytest.raises(ConfigError, match="appears twice"):
        class_map_from_names(["car", "Car"], ["car"])
    with pytest.raises(ConfigError, match="automobile"):  # an override must name a dataset class
        class_map_from_names(names, ["car"], aliases={"car": "automobile"})
    (tmp_path / "syn.json").write_text('[{"synonyms": ["girl"]}]')
    with pytest.raises(ConfigError, match=r"syn\.json: categories\[0\] has no 'name'"):
        class_map_from_names(names, ["girl"], synonyms=tmp_path / "syn.json")
    from genval_aug.class_map import build_class_map  # the core; YOLO's duplicate names keep the first id

    assert build_class_map(["car", "girl", "tiger"], names, synonyms=lvis) == ({"car": 2, "girl": 0}, ["tiger"])
    assert build_class_map(["car"], ["x", "car", "Car"]) == ({"car": 1}, [])


def test_deterministic_and_picklable(bank_path, samples):
    img, target = to_tv(samples[1])
    a = GenValPaste(bank_path, seed=5)
    b = pickle.loads(pickle.dumps(GenValPaste(bank_path, seed=5)))
    for _ in range(3):
        (ia, ta), (ib, tb) = a(img, target), b(img, target)
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    # seed=None follows torch's global RNG like other v2 transforms
    c = GenValPaste(bank_path)
    torch.manual_seed(11)
    r1 = c(img, target)
    torch.manual_seed(11)
    r2 = c(img, target)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1]["labels"], r2[1]["labels"])
    a.set_epoch(1)
    r3 = a(img, target)
    a2 = GenValPaste(bank_path, seed=5)
    a2.set_epoch(1)
    assert torch.equal(r3[0], a2(img, target)[0])


def _run_loader(ds, context, seed=0):
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context,
                                         collate_fn=collate_list, generator=torch.Generator().manual_seed(seed))
    out = []
    for images, targets in loader:
        for im, t in zip(images, targets, strict=True):
            out.append((im.clone(), t["boxes"].clone(), t["labels"].clone(), t["masks"].clone()))
    return out


@pytest.mark.slow
def test_dataloader_two_workers_fork_and_spawn(bank_path, coco128_seg, names):
    small = coco128_samples(coco128_seg, limit=3, size=160)
    bank = InstanceBank(bank_path)  # the parent holds and reads the bank first
    assert bank.count() > 0 and bank.random_instance("car", np.random.default_rng(0)).rgba.shape[2] == 4
    paste = GenValPaste(bank, class_map=class_map_from_names(names, bank), seed=123, n=2)
    ds = TVSampleDataset([small[0]], paste, length=8)  # one image: every item differs only by its paste
    ds[0]  # ...and builds its engine in the parent before the workers start
    runs = {"fork": _run_loader(ds, "fork"), "fork2": _run_loader(ds, "fork"), "spawn": _run_loader(ds, "spawn")}
    assert len(runs["fork"]) == 8
    for other in ("fork2", "spawn"):
        for a, b in zip(runs["fork"], runs[other], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"{other} differs from fork"
    # worker 0 gets items 0,1,4,5 and worker 1 items 2,3,6,7: their streams must differ
    imgs = [r[0] for r in runs["fork"]]
    assert not torch.equal(imgs[0], imgs[2]) and not torch.equal(imgs[1], imgs[3])
    assert len({r[0].sum().item() for r in runs["fork"]}) > 4
    for im, boxes, labels, masks in runs["spawn"]:
        check_output_objects(boxes.numpy(), labels.numpy(), masks.numpy().astype(bool), im.shape[-2:], len(names))


@pytest.mark.slow
def test_maskrcnn_training_step_on_pasted_batch(bank_path, coco128_seg, names):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    small = coco128_samples(coco128_seg, limit=2, size=320)
    cm = {k: v + 1 for k, v in class_map_from_names(names, bank_path).items()}  # 0 is background
    pipe = v2.Compose([
        GenValPaste(bank_path, class_map=cm, seed=0, n=(2, 3)),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])
    images, targets = [], []
    for s in small:
        img, target = to_tv(s)
        target["labels"] = target["labels"] + 1
        im, t = pipe(img, target)
        assert len(t["labels"]) > len(s.classes) - 2 and t["masks"].shape[0] == len(t["labels"])
        images.append(im)
        targets.append({"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]})
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(names) + 1,
                                  min_size=320, max_size=320)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    opt.zero_grad()
    total.backward()
    grads = [p.grad for p in model.roi_heads.mask_predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()


def test_mask_value_convention_read_from_all_masks(bank_path, samples, names):
    """Masks stored as 0/255 keep that convention for pasted objects even when the first mask is empty."""
    cm = class_map_from_names(names, bank_path)
    paste = GenValPaste(bank_path, class_map=cm, seed=3, n=2)
    img, target = to_tv(samples[0])
    m = target["masks"].as_subclass(torch.Tensor).clone() * 255
    m[0] = 0  # e.g. an object a previous crop emptied
    target["masks"] = tv_tensors.Mask(m)
    _, out = paste(img, target)
    assert set(torch.unique(out["masks"]).tolist()) <= {0, 255}
    assert int(out["masks"][-1].max()) == 255


def test_bfloat16_image(bank_path, samples, names):
    """Every float dtype in [0, 1] works, bfloat16 included (numpy has no bfloat16)."""
    paste = GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), seed=3, n=2)
    img, target = to_tv(samples[0], kind="float")
    out_img, out = paste(tv_tensors.Image(img.to(torch.bfloat16)), target)
    assert out_img.dtype == torch.bfloat16 and out_img.shape == img.shape
    assert len(out["labels"]) > 0 and 0 <= float(out_img.min()) and float(out_img.max()) <= 1


def test_degenerate_boxes_left_by_a_crop_pass_through(bank_path, samples, names):
    """torchvision's crops clamp a box that falls outside the crop to a zero-area box on the edge; GenValPaste
    placed after such a crop (before SanitizeBoundingBoxes) must keep it as is, not raise and kill the loader."""
    paste = GenValPaste(bank_path, class_map=class_map_from_names(names, bank_path), seed=3, n=2)
    img, target = to_tv(samples[0], extra=False)
    H, W = img.shape[-2:]
    crop_h, crop_w = H // 2, W // 2
    c_img = F.crop(img, 0, 0, crop_h, crop_w)
    boxes = torch.cat([target["boxes"].as_subclass(torch.Tensor),
                       torch.tensor([[W - 20.0, H - 20.0, W - 2.0, H - 2.0]])])  # outside the crop
    c_boxes = F.crop(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)), 0, 0, crop_h, crop_w)
    last = c_boxes[-1].as_subclass(torch.Tensor)
    assert last[0] == last[2] and last[1] == last[3]  # clamped to a point on the crop's corner
    labels = torch.cat([target["labels"], torch.tensor([1])])
    _, out = paste(c_img, {"boxes": c_boxes, "labels": labels})
    kept = out["boxes"].as_subclass(torch.Tensor)
    assert any(torch.equal(b, last) for b in kept)  # returned unchanged
    _, clean = v2.SanitizeBoundingBoxes()(c_img, out)
    assert not any(torch.equal(b, last) for b in clean["boxes"].as_subclass(torch.Tensor))


def test_extra_fields_filled_for_an_empty_target():
    """extra_fields rows are added for pasted objects also when the sample has no objects (they used to be
    skipped for N == 0, leaving e.g. 0 scores for 2 boxes)."""
    from label_checks import MemoryInstance, MemorySource

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[4:16, 4:16] = 200
    paste = GenValPaste(MemorySource([MemoryInstance("a", "thing", 3, rgba)]), seed=0, n=2, max_ioa=1.0,
                        extra_fields={"scores": 1.0})
    img = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    for n in (1, 0):
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 1.0, 10.0, 10.0]])[:n], format="XYXY",
                                                    canvas_size=(64, 64)),
                  "labels": torch.tensor([1])[:n], "scores": torch.tensor([0.5])[:n],
                  "other": torch.zeros(0)}  # an unrelated empty tensor: left alone
        _, out = paste(img, target)
        assert len(out["labels"]) == n + 2
        assert out["scores"].tolist() == [0.5] * n + [1.0, 1.0]
        assert out["other"] is target["other"]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_float_images_of_every_channel_count(channels):
    """Float (C, H, W) images come back as float with the pasted pixels and bit-exact elsewhere, grayscale
    included (its changed window used to lose its channel axis in OpenCV and crash in permute)."""
    from label_checks import MemoryInstance, MemorySource

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[4:16, 4:16] = 200
    paste = GenValPaste(MemorySource([MemoryInstance("a", "thing", 3, rgba)]), seed=0, n=1, blend="hard",
                        harmonize="none", brightness=0.0, contrast=0.0, saturation=0.0)
    img = tv_tensors.Image(torch.full((channels, 64, 64), 0.25))
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(64, 64)),
             "labels": torch.zeros(0, dtype=torch.int64), "masks": tv_tensors.Mask(torch.zeros(0, 64, 64))}
    out_img, out = paste(img, empty)
    assert out_img.dtype == torch.float32 and out_img.shape == img.shape
    obj = out["masks"][0].bool()
    assert len(out["labels"]) == 1 and obj.any()
    assert torch.equal(out_img[:, ~obj], img[:, ~obj])
    assert torch.allclose(out_img[:3, obj], torch.tensor(200 / 255), atol=0.51 / 255)  # gray 200 stays 200


def test_torchvision_coco_detection_wrapped_for_v2(bank_path, shared_data):
    """The torchvision tutorial's way to read COCO json: ``CocoDetection`` + ``wrap_dataset_for_transforms_v2``
    (PIL image -> tv_tensors target), on the labelme VOC examples' real COCO annotations, with GenValPaste first
    in the dataset's v2 transforms. ``target_keys="all"`` keeps COCO's raw per-object lists, which no transform
    updates: that is a clear error naming them, not silently stale labels."""
    import json

    pytest.importorskip("pycocotools")
    from torchvision import datasets

    root = shared_data / "labelme_voc_examples" / "data_dataset_coco"
    cats = json.loads((root / "annotations.json").read_text())["categories"]
    by_id = {c["id"]: c["name"] for c in cats}
    cm = class_map_from_names([by_id.get(i, "N/A") for i in range(max(by_id) + 1)], bank_path)
    assert cm == {"car": 7, "person": 15, "potted plant": 16}  # VOC ids of the bank's classes; elephant: none

    def dataset(keys):
        t = v2.Compose([GenValPaste(bank_path, class_map=cm, n=3, seed=0), v2.RandomHorizontalFlip(p=0.5),
                        v2.SanitizeBoundingBoxes()])
        coco = datasets.CocoDetection(root, root / "annotations.json", transforms=t)
        raw = datasets.wrap_dataset_for_transforms_v2(datasets.CocoDetection(root, root / "annotations.json"),
                                                      target_keys=keys)
        return datasets.wrap_dataset_for_transforms_v2(coco, target_keys=keys), raw

    pasted = 0
    for keys in (None, ("boxes", "labels", "masks", "image_id")):
        ds, raw = dataset(keys)
        for i in range(len(ds)):
            img, out = ds[i]
            _, before = raw[i]
            assert isinstance(img, PILImage.Image) and out["image_id"] == before["image_id"]
            n, nk = len(out["labels"]), len(before["labels"])
            assert out["boxes"].shape == (n, 4) and out["boxes"].canvas_size == before["boxes"].canvas_size
            new = out["labels"][nk:] if n > nk else out["labels"][:0]
            pasted += len(new)
            assert set(new.tolist()) <= set(cm.values())
            if keys is not None:  # masks: every pasted object's box is its mask's extent
                m = out["masks"].numpy().astype(bool)
                assert m.shape[0] == n
                for k in range(n - len(new), n):
                    ys, xs = np.nonzero(m[k])
                    box = F.convert_bounding_box_format(out["boxes"], new_format="XYXY")[k].tolist()
                    assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert pasted >= 2 * 3  # two key sets x three images, 1-3 pasted each (placement may skip some)

    ds, _ = dataset("all")
    with pytest.raises(TargetsError, match=r"area: expected a tensor, got list.*target_keys"):
        ds[0]
