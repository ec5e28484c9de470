"""genval_aug.ultralytics against real Ultralytics: datasets, loaders, Format, and real training runs.

The datasets are coco128-seg images without person/car/elephant, so every person/car/elephant in a batch was
pasted from the bank (see yolo_fixtures.py). Training runs are small (12 images, imgsz 160, 3 epochs,
close_mosaic=1) and marked slow.
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import types
from copy import copy
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ultralytics")
torch = pytest.importorskip("torch")

from label_checks import check_paste_result, check_pixels, extent_box, rasterize  # noqa: E402
from yolo_fixtures import BANK_CLASS_IDS, make_bank, make_dataset  # noqa: E402

from genval_aug.errors import ConfigError  # noqa: E402
from genval_aug.ultralytics import (  # noqa: E402
    PasteSpec,
    YoloPaste,
    _AttachCallback,
    _polygons_to_segments,
    attach,
    build_class_map,
    hook_dataset,
)

PASTED_IDS = sorted(BANK_CLASS_IDS.values())
PASTE = {"n": 3}  # k = 3 instances per image, default blending and harmonization
IMGSZ = 160


# ------------------------------------------------------------------------------- Ultralytics version shims
# pyproject allows ultralytics >= 8.3; CI also runs this file against 8.3.0 (`make test-compat`). The shims
# cover what the tests (not genval_aug) use that changed since: CutMix (new in 8.3.x), the out-of-memory
# retry (8.4), InfiniteDataLoader.close() and plot_images(labels=...).
def _has_cutmix() -> bool:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return "cutmix" in DEFAULT_CFG_DICT


def _has_oom_retry() -> bool:
    import inspect

    from ultralytics.engine.trainer import BaseTrainer

    return "out of memory" in inspect.getsource(BaseTrainer).lower()


def _close_loader(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    else:  # before 8.4: shut the persistent workers down through the iterator
        getattr(getattr(loader, "iterator", None), "_shutdown_workers", lambda: None)()


def _plot(labels: dict, paths, fname: Path) -> None:
    """Ultralytics' plot_images on a training batch dict, as its trainers call it in this version."""
    from ultralytics.utils.plotting import plot_images

    try:
        plot_images(labels=labels, paths=paths, fname=fname, threaded=False)
    except TypeError:  # before 8.3.1xx: one argument per label array (its @threaded wrapper hides the signature)
        masks = labels.get("masks")
        plot_images(labels["img"], labels["batch_idx"], labels["cls"].reshape(-1), labels["bboxes"], paths=paths,
                    fname=fname, threaded=False, **({"masks": masks} if masks is not None else {}))


def test_outlines_are_resampled_exactly_like_ultralytics():
    """Same values as Ultralytics' resample_segments (since 8.3.x it keeps every vertex of a short polygon;
    8.3.0's interpolated evenly instead: there the reference is that newer definition, written out here)."""
    from ultralytics.utils.ops import resample_segments

    def reference(polys, n):
        out = []
        for s in polys:
            if len(s) == n:  # already resampled: left as it is
                out.append(s)
                continue
            s = np.concatenate((s, s[:1]))
            x = np.linspace(0, len(s) - 1, n - len(s) if len(s) < n else n)
            xp = np.arange(len(s))
            x = np.insert(x, np.searchsorted(x, xp), xp) if len(s) < n else x
            out.append(np.stack([np.interp(x, xp, s[:, i]) for i in range(2)], 1).astype(np.float32))
        return out

    probe = [np.float32([[0, 0], [10, 0], [10, 10]])]
    if not np.array_equal(resample_segments([probe[0].copy()], 10)[0], reference(probe, 10)[0]):
        resample_segments = reference  # noqa: F811 - an Ultralytics older than vertex-keeping resampling
    rng = np.random.default_rng(0)
    polys = [rng.uniform(0, 640, (m, 2)).astype(np.float32) for m in (3, 120, 999, 1000, 1001, 1500, 2)]
    boxes = np.tile(np.float32([[1, 2, 30, 40]]), (len(polys), 1))
    ours = _polygons_to_segments(polys, boxes, 1000)
    np.testing.assert_array_equal(ours, np.stack(resample_segments([p.copy() for p in polys], 1000)))
    empty = _polygons_to_segments([np.zeros((0, 2), np.float32)], boxes[:1], 1000)  # no outline: box pixels
    box_outline = np.float32([[1, 2], [29, 2], [29, 39], [1, 39]])
    np.testing.assert_array_equal(empty[0], resample_segments([box_outline], 1000)[0])


def test_degenerate_outlines_cover_the_object_pixels():
    """The core returns a 1- or 2-vertex polygon for a visible part that is a pixel or a 1-px line, with its pixel
    extent box (x_max + 1, y_max + 1); the box-outline fallback must rasterize to those pixels, not to a
    one pixel larger rectangle (a 6 px line used to become a 7 x 2 px segment)."""
    line = np.float32([[0, 268], [5, 268]])
    dot = np.float32([[7, 9]])
    diagonal = np.float32([[3, 3], [5, 5]])  # a 3-px diagonal line, not its 3 x 3 box
    boxes = np.float32([[0, 268, 6, 269], [7, 9, 8, 10], [3, 3, 6, 6]])
    segs = _polygons_to_segments([line, dot, diagonal], boxes, 100)
    for seg, poly, box in zip(segs, (line, dot, diagonal), boxes, strict=True):
        np.testing.assert_array_equal(rasterize(seg, 300, 20), rasterize(poly, 300, 20))
        np.testing.assert_array_equal(extent_box(rasterize(seg, 300, 20)), box)
    assert rasterize(segs[2], 300, 20).sum() == 3


@pytest.fixture(scope="module")
def bank(tmp_path_factory, rgba_objects) -> Path:
    return make_bank(rgba_objects, tmp_path_factory.mktemp("bank") / "objects.lmdb")


@pytest.fixture(scope="module")
def seg_yaml(tmp_path_factory, coco128_seg) -> Path:
    return make_dataset(coco128_seg, tmp_path_factory.mktemp("seg"), n=12)


@pytest.fixture(scope="module")
def box_yaml(tmp_path_factory, coco128_seg) -> Path:
    return make_dataset(coco128_seg, tmp_path_factory.mktemp("box"), n=12, boxes_only=True)


def train_dataset(data_yaml: Path, task: str = "segment", **hyp):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": IMGSZ, "task": task, **hyp})
    data = check_det_dataset(str(data_yaml))
    return build_yolo_dataset(cfg, data["train"], 4, data, mode="train", stride=32), cfg


def names_of(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


# ------------------------------------------------------------------------------------------------ class map
def test_class_map_by_name_synonyms_explicit_and_subset(shared_data):
    names = {0: "person", 1: "cell phone", 2: "car", 3: "teddy bear"}
    m, un = build_class_map(["person", "Cell_Phone", "girl", "tiger", "car"], names)
    assert m == {"person": 0, "Cell_Phone": 1, "car": 2} and un == ["girl", "tiger"]

    lvis = shared_data / "lvis_v1_categories.json"
    m, un = build_class_map(["girl", "teddy_bear", "tiger", "smart_phone"], {**names, 4: "mobile phone"},
                            synonyms=lvis)
    assert m == {"girl": 0, "teddy_bear": 3, "smart_phone": 4} and un == ["tiger"]  # LVIS synonym groups

    m, un = build_class_map(["tiger", "person", "car"], names, class_map={"tiger": "teddy bear", "car": None})
    assert m == {"tiger": 3, "person": 0} and un == []
    m, _ = build_class_map(["person", "car", "cell phone"], names, classes=["person", 1])
    assert m == {"person": 0, "cell phone": 1}
    m, _ = build_class_map(["person", "girl"], names, synonyms={"person": ["girl"]}, classes=["girl"])
    assert m == {"girl": 0}  # a bank category name also selects
    with pytest.raises(ConfigError, match="zebra"):
        build_class_map(["person"], names, classes=["zebra"])
    with pytest.raises(ConfigError, match="class_map"):
        build_class_map(["tiger"], names, class_map={"tiger": "zebra"})


def test_cli_splits_genval_keys_from_ultralytics_keys():
    from genval_aug.cli.yolo import parse_overrides

    ov, spec = parse_overrides(["model=yolo11n-seg.yaml", "data=d.yaml", "bank=cache/x.lmdb", "epochs=3",
                                "classes=[0,2]", "paste_n=3", "paste_harmonize=none", "paste_classes=person,car",
                                "amp=False", "lr0=0.01"])
    assert ov == {"model": "yolo11n-seg.yaml", "data": "d.yaml", "epochs": 3, "classes": [0, 2], "amp": False,
                  "lr0": 0.01}
    assert spec == {"bank": "cache/x.lmdb", "n": 3, "harmonize": "none", "classes": ["person", "car"]}
    _, spec = parse_overrides(["model=m.yaml", "bank=x", "paste_class_map={'tiger': 'cat', 'logo': None}",
                               "paste_n=(1,3)", "paste_scale_range=(0.1,0.3)"])
    assert spec == {"bank": "x", "class_map": {"tiger": "cat", "logo": None}, "n": (1, 3), "scale_range": (0.1, 0.3)}
    PasteSpec.from_dict(spec)
    with pytest.raises(ConfigError, match="bank"):
        parse_overrides(["model=yolo11n.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model=yolo11n.yaml", "bank=x", "oops"])
    with pytest.raises(ConfigError):
        PasteSpec("x.lmdb", blend="sparkle")  # PasteConfig validation reaches the user early


def test_attach_fails_early_on_a_missing_bank(tmp_path):
    from genval_aug.errors import BankError

    added = []
    model = types.SimpleNamespace(add_callback=lambda event, fn: added.append(event))
    with pytest.raises(BankError, match="nowhere.lmdb"):
        attach(model, bank=tmp_path / "nowhere.lmdb", n=3)
    assert added == []


# ------------------------------------------------------------------------------------------------ hooking
def test_hook_before_mixup_survives_close_mosaic_and_dataset_rebuilds(seg_yaml, bank, caplog):
    ds, cfg = train_dataset(seg_yaml)
    spec = PasteSpec(bank, **PASTE)
    with caplog.at_level(logging.WARNING, logger="genval_aug.ultralytics"):
        t = spec.make_transform(ds)
        spec.make_transform(ds)
    assert t.class_map == BANK_CLASS_IDS and t.polygons
    assert caplog.text.count("tiger") == 1  # unmapped category reported once

    hook_dataset(ds, t)
    n = names_of(ds.transforms)
    assert n.index("YoloPaste") == n.index("MixUp") - 1 == 1
    ds.close_mosaic(hyp=copy(cfg))  # rebuilds the Compose from scratch
    n = names_of(ds.transforms)
    assert n.index("YoloPaste") == n.index("MixUp") - 1 and ds.transforms.transforms[0].transforms[0].p == 0
    assert ds.transforms.transforms[1] is t  # the same transform object (its per-process engine) survives
    hook_dataset(ds, t)
    assert names_of(ds.transforms).count("YoloPaste") == 1  # idempotent

    # attach()'s callback hooks the trainer's current dataset and every later train dataset (OOM retry)
    resets = []
    fresh, _ = train_dataset(seg_yaml)
    val, _ = train_dataset(seg_yaml)
    trainer = types.SimpleNamespace(
        train_loader=types.SimpleNamespace(dataset=fresh, reset=lambda: resets.append(1)),
        build_dataset=lambda p, mode="train", batch=None: train_dataset(seg_yaml)[0] if mode == "train" else val,
    )
    _AttachCallback(spec)(trainer)
    assert "YoloPaste" in names_of(fresh.transforms) and resets == [1]
    rebuilt = trainer.build_dataset("x", "train", 4)
    assert "YoloPaste" in names_of(rebuilt.transforms)
    assert "YoloPaste" not in names_of(trainer.build_dataset("x", "val", 4).transforms)
    pickle.loads(pickle.dumps(t))  # picklable without an engine (spawned workers, DDP state)
    pose = types.SimpleNamespace(data={"names": {0: "person"}}, use_keypoints=True, use_segments=False)
    assert PasteSpec(bank).make_transform(pose).class_map == {}  # pose/OBB: passed through unpasted


def test_yolopaste_takes_a_pasteconfig_or_a_mapping(bank):
    from genval_aug.paste import PasteConfig

    for options in (PasteConfig(n=2, harmonize="none"), {"n": 2, "harmonize": "none"}):
        t = YoloPaste(bank, options, BANK_CLASS_IDS, polygons=True)
        t = pickle.loads(pickle.dumps(t))  # as a spawned worker gets it
        t._setup()
        cfg = t._engine.config
        assert (cfg.n, cfg.harmonize, cfg.sampler_classes) == (2, "none", sorted(BANK_CLASS_IDS))
    with pytest.raises(ConfigError, match="PasteConfig fields"):
        YoloPaste(bank, {"nn": 2}, BANK_CLASS_IDS)._setup()


def test_trainer_spec_reaches_ddp_workers(seg_yaml, bank, tmp_path, monkeypatch):
    """What Ultralytics' DDP launch file does: rebuild the trainer class from vars(args) + the callbacks."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    from genval_aug.ultralytics import SPEC_ENV, GenValSegmentationTrainer

    monkeypatch.delenv(SPEC_ENV, raising=False)
    args = {"model": "yolo11n-seg.yaml", "data": str(seg_yaml), "imgsz": IMGSZ, "device": "cpu",
            "project": str(tmp_path), "name": "ddp", "exist_ok": True}
    parent = GenValSegmentationTrainer(overrides={**args, "genval": {"bank": str(bank), "n": 3, "classes": ["car"]}})
    assert "genval" not in vars(parent.args)  # Ultralytics re-validates args in its validators
    cfg = {**DEFAULT_CFG_DICT, "save_dir": ""}
    # 8.4 cloudpickles the callbacks into the launch state (its own contain lambdas; ours pickle plainly)
    callbacks = {k: [f if f.__module__.startswith("ultralytics") else pickle.loads(pickle.dumps(f)) for f in v]
                 for k, v in parent.callbacks.items()}
    child = GenValSegmentationTrainer(cfg=cfg, overrides=vars(parent.args), _callbacks=callbacks)
    assert child.genval.to_dict() == parent.genval.to_dict() == {"bank": str(bank), "classes": ["car"], "n": 3}
    monkeypatch.setenv(SPEC_ENV, json.dumps(parent.genval.to_dict()))  # older Ultralytics: environment only
    child = GenValSegmentationTrainer(cfg=cfg, overrides=vars(parent.args))
    assert child.genval.to_dict() == parent.genval.to_dict()
    monkeypatch.delenv(SPEC_ENV)
    with pytest.raises(ConfigError, match="genval"):
        GenValSegmentationTrainer(overrides=args)


def check_formatted_sample(s: dict, use_masks: bool) -> int:
    """Consistency of one Format output; returns the number of pasted (bank-class) objects."""
    n = len(s["cls"])
    assert s["img"].shape == (3, IMGSZ, IMGSZ) and s["img"].dtype == torch.uint8
    assert s["bboxes"].shape == (n, 4) and s["batch_idx"].shape == (n,)
    b = s["bboxes"].numpy()
    assert np.all(b[:, 2:] > 0) and np.all(b[:, :2] - b[:, 2:] / 2 >= -1e-3) and np.all(b[:, :2] + b[:, 2:] / 2 <= 1 + 1e-3)
    cls = s["cls"].numpy().reshape(-1)
    assert np.all(cls == np.round(cls)) and np.all((cls >= 0) & (cls < 80))
    if use_masks:
        m = s["masks"].numpy()
        assert m.shape == (1, IMGSZ // 4, IMGSZ // 4) and m.max() <= n
        for k in range(n):  # every mask pixel of instance k lies in its box (boxes recomputed after cuts)
            ys, xs = np.nonzero(m[0] == k + 1)
            if len(xs):
                xc, yc, w, h = b[k] * (IMGSZ // 4)
                assert xs.min() >= xc - w / 2 - 1.5 and xs.max() <= xc + w / 2 + 0.5
                assert ys.min() >= yc - h / 2 - 1.5 and ys.max() <= yc + h / 2 + 0.5
    return int(np.isin(cls, PASTED_IDS).sum())


@pytest.mark.parametrize("kind", ["seg", "box", "seg+mixup+cutmix"])
def test_dataset_items_are_pasted_and_consistent(kind, seg_yaml, box_yaml, bank):
    task = "detect" if kind == "box" else "segment"
    hyp = {"mixup": 1.0, **({"cutmix": 1.0} if _has_cutmix() else {})} if "mixup" in kind else {}
    ds, _ = train_dataset(box_yaml if kind == "box" else seg_yaml, task=task, **hyp)
    t = PasteSpec(bank, **PASTE).make_transform(ds)
    hook_dataset(ds, t)
    pasted = sum(check_formatted_sample(ds[i], use_masks=task == "segment") for i in range(len(ds)))
    assert t.stats["errors"] == 0 and t.stats["images"] == len(ds)
    assert pasted >= len(ds)  # n=3 per image, some dropped by placement/occlusion or the later affine crop
    if kind == "box":  # box-only data stays box-only: no segments invented for a detect dataset
        labels = ds.get_image_and_label(0)
        assert len(labels["instances"].segments) == 0


def test_pasted_polygons_become_correct_masks_after_format(seg_yaml, bank):
    """Engine result checked independently (label_checks), the adapter's conversion checked against it, and
    after Format (smaller masks drawn over larger ones) the pixels of pasted objects belong to them."""
    from ultralytics.data.augment import Format

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # the transform's per-process RNG derives from torch.initial_seed() (workers=0)
    ds, _ = train_dataset(seg_yaml, mosaic=0.0)
    # large objects allowed over existing ones: uncut originals (smaller) would be drawn over them by Format
    t = PasteSpec(bank, n=2, seed=1, scale_range=(0.4, 0.6), use_size_prior=False, max_ioa=1.0).make_transform(ds)
    t._setup()
    engine, calls = t._engine, []

    def spy(img, targets, rng, channel_order):
        res = engine(img, targets, rng, channel_order=channel_order)
        calls.append((img.copy(), targets, res))
        return res

    t._engine = spy
    pre = ds.transforms.transforms[0]  # Mosaic(p=0) + RandomPerspective: what the insertion point receives
    fmt = Format(bbox_format="xywh", normalize=True, return_mask=True, batch_idx=True, mask_ratio=1,
                 mask_overlap=True, bgr=0.0)
    checked = occluded = 0
    for i in range(len(ds)):
        labels = pre(ds.get_image_and_label(i))
        inst = labels["instances"]
        inst.convert_bbox("xyxy")
        # the checker's convention: a box is its polygon's raster extent
        H, W = labels["img"].shape[:2]
        inst.update(bboxes=np.stack([extent_box(rasterize(s, H, W)) for s in inst.segments]).astype(np.float32),
                    segments=inst.segments)
        out = t(labels)
        img_in, targets_in, res = calls[-1]
        stats = check_paste_result(targets_in, res, (H, W), 80, engine.config, "polygons")
        check_pixels(img_in, res, margin=4)
        occluded += stats["occluded"]

        # adapter output == engine result in Ultralytics' layout
        segs, cls, boxes = out["instances"].segments, out["cls"].reshape(-1), out["instances"].bboxes
        assert segs.shape == (len(cls), 1000, 2) and boxes.shape == (len(cls), 4)
        np.testing.assert_array_equal(cls, res.targets.classes)
        np.testing.assert_allclose(boxes, res.targets.boxes)
        assert np.array_equal(out["img"], res.image)
        for k, poly in enumerate(res.targets.polygons):
            a, b = rasterize(poly, H, W), rasterize(segs[k], H, W)
            assert (a & b).sum() / max((a | b).sum(), 1) > 0.9, f"image {i} object {k}: resampled polygon drifted"

        changed = (out["img"] != img_in).any(-1)
        f = fmt(out)
        m, fcls = f["masks"][0].numpy(), f["cls"].numpy().reshape(-1)
        pasted_ids = np.flatnonzero(np.isin(fcls, PASTED_IDS)) + 1
        claimed = np.isin(m, pasted_ids)
        core = cv2.erode(changed.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        near_changed = cv2.dilate(changed.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if core.sum() < 50:
            continue
        # pasted masks cover what was pasted (no original object drawn over it) ...
        assert claimed[core].mean() > 0.95, f"image {i}: pasted pixels claimed by other objects"
        # ... and nothing else
        assert near_changed[claimed].mean() > 0.97, f"image {i}: pasted mask outside the pasted pixels"
        checked += 1
    assert checked >= len(ds) // 2 and occluded > 0


def test_forked_workers_read_the_bank(seg_yaml, bank):
    """Ultralytics forks its loader workers; the bank opens per worker (CPU training would use workers=0)."""
    from ultralytics.data.build import build_dataloader

    ds, _ = train_dataset(seg_yaml)
    t = PasteSpec(bank, **PASTE).make_transform(ds)
    hook_dataset(ds, t)
    assert check_formatted_sample(ds[0], True) >= 0  # the parent reads the bank first (workers=0 path) ...
    from genval_aug.bank.store import _REGISTRY

    assert str(Path(bank).resolve()) in _REGISTRY._handles  # ... and holds it open when the workers fork
    loader = build_dataloader(ds, batch=4, workers=2, shuffle=True, rank=-1)
    try:
        assert type(loader).__name__ == "InfiniteDataLoader" and loader.num_workers == 2
        pasted = 0
        for _ in range(2):  # two epochs on the same persistent workers
            for batch in loader:
                cls = batch["cls"].numpy().reshape(-1)
                pasted += int(np.isin(cls, PASTED_IDS).sum())
                assert batch["masks"].shape[0] == batch["img"].shape[0]
        assert pasted >= len(ds)  # ... then forked workers paste too
    finally:
        _close_loader(loader)


# ------------------------------------------------------------------------------------------------ training
def make_recorder(oom_once: bool = False):
    """An on_pretrain_routine_end callback (a plain function: Ultralytics deep-copies default callbacks)
    recording every batch and every saved train_batch plot; ``oom_once`` fakes one out-of-memory error on the
    first batch, so Ultralytics halves the batch size and builds a new train dataset and loader."""
    rec = {"batches": [], "plots": [], "oom": 0}

    def on_pretrain_routine_end(trainer):
        pre, plot = trainer.preprocess_batch, trainer.plot_training_samples
        mosaic = trainer.train_loader.dataset.transforms.transforms[0].transforms[0]

        def preprocess(batch):
            if oom_once and not rec["oom"]:
                rec["oom"] += 1
                raise RuntimeError("CUDA out of memory (simulated by the test)")
            ds = trainer.train_loader.dataset
            rec["batches"].append({
                "dataset": id(ds),
                "epoch": trainer.epoch,
                "mosaic_p": ds.transforms.transforms[0].transforms[0].p,
                "has_paste": "YoloPaste" in names_of(ds.transforms),
                **{k: v.clone() for k, v in batch.items() if k in ("cls", "bboxes", "batch_idx", "masks", "img")},
            })
            return pre(batch)

        def plot_samples(batch, ni):  # copy first: plot_images converts the dict's tensors in a thread
            rec["plots"].append((ni, {k: (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else v)
                                      for k, v in batch.items()}, Path(trainer.save_dir) / f"train_batch{ni}.jpg"))
            plot(batch, ni)

        trainer.preprocess_batch, trainer.plot_training_samples = preprocess, plot_samples
        rec["mosaic_p0"] = mosaic.p

    return on_pretrain_routine_end, rec


def check_run(rec: dict, use_masks: bool, tmp_path: Path) -> None:
    batches = rec["batches"]
    assert {b["epoch"] for b in batches} == {0, 1, 2}
    for b in batches:
        assert b["has_paste"]
        assert (b["mosaic_p"] > 0) == (b["epoch"] < 2)  # close_mosaic=1: epoch 2 has no mosaic
        n = len(b["cls"])
        assert b["bboxes"].shape == (n, 4) and b["batch_idx"].shape == (n,)
        for i in range(b["img"].shape[0]):
            sel = b["batch_idx"] == i
            sample = {"img": b["img"][i], "cls": b["cls"][sel], "bboxes": b["bboxes"][sel],
                      "batch_idx": b["batch_idx"][sel]}
            if use_masks:
                sample["masks"] = b["masks"][i: i + 1]
            check_formatted_sample(sample, use_masks)
    pasted = {e: sum(int(np.isin(b["cls"].numpy(), PASTED_IDS).sum()) for b in batches if b["epoch"] == e)
              for e in (0, 1, 2)}
    assert all(v > 0 for v in pasted.values()), f"pasted objects per epoch: {pasted}"

    # the saved train_batch pictures (mosaic: 0-2, after close_mosaic: 6-8) show pasted objects
    plotted = {ni for ni, _, _ in rec["plots"]}
    assert {0, 1, 2} <= plotted and {6, 7, 8} <= plotted
    for ni, batch, path in rec["plots"]:
        assert path.is_file()
        cls = batch["cls"].reshape(-1)
        assert np.isin(cls, PASTED_IDS).any(), f"train_batch{ni}.jpg has no pasted object"
        again = tmp_path / f"again{ni}.jpg"
        _plot(batch, batch["im_file"], again)
        saved, redrawn = cv2.imread(str(path)), cv2.imread(str(again))
        assert np.abs(saved.astype(int) - redrawn).mean() < 1.0  # the saved picture draws these labels
        keep = ~np.isin(cls, PASTED_IDS)
        bare = {"img": batch["img"], "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep],
                "batch_idx": batch["batch_idx"][keep]}
        _plot(bare, batch["im_file"], tmp_path / "bare.jpg")
        with_boxes = {**bare, "cls": batch["cls"], "bboxes": batch["bboxes"], "batch_idx": batch["batch_idx"]}
        _plot(with_boxes, batch["im_file"], tmp_path / "boxes.jpg")
        diff = np.abs(cv2.imread(str(tmp_path / "bare.jpg")).astype(int) - cv2.imread(str(tmp_path / "boxes.jpg")))
        assert diff.max() > 100  # the pasted objects' labels are drawn


@pytest.mark.slow
def test_segment_training_with_attach_survives_close_mosaic_and_oom_retry(seg_yaml, bank, tmp_path):
    from ultralytics import YOLO

    torch.set_num_threads(1)
    oom = _has_oom_retry()
    cb, rec = make_recorder(oom_once=oom)
    model = attach(YOLO("yolo11n-seg.yaml"), bank=bank, **PASTE)
    model.add_callback("on_pretrain_routine_end", cb)
    first = []
    model.add_callback("on_pretrain_routine_end", lambda tr: first.append(id(tr.train_loader.dataset)))
    model.train(data=str(seg_yaml), epochs=3, close_mosaic=1, imgsz=IMGSZ, batch=4, device="cpu", workers=0,
                plots=True, val=False, amp=False, project=str(tmp_path), name="seg", exist_ok=True, seed=0,
                verbose=False)
    check_run(rec, use_masks=True, tmp_path=tmp_path)
    if not oom:  # an Ultralytics without the out-of-memory retry (before 8.4)
        return
    # the OOM retry built a new dataset (batch 4 -> 2) and the paste came with it
    assert rec["oom"] == 1 and first and all(b["dataset"] != first[0] for b in rec["batches"])
    assert all(len(b["img"]) <= 2 for b in rec["batches"])


@pytest.mark.slow
def test_detect_training_on_box_data_with_the_cli(box_yaml, bank, tmp_path, monkeypatch):
    """`genval-aug yolo train ...` -> GenValDetectionTrainer (the trainer= route), with 2 forked loader workers
    (re-forked at close_mosaic) although on CPU; recorder via Ultralytics' default callbacks."""
    from ultralytics.utils.callbacks import base

    from genval_aug.cli import main

    torch.set_num_threads(1)
    cb, rec = make_recorder()
    monkeypatch.setitem(base.default_callbacks, "on_pretrain_routine_end",
                        [*base.default_callbacks["on_pretrain_routine_end"], cb])

    def forked_workers(trainer):  # Ultralytics forces workers=0 on CPU; undo it before the loaders exist
        trainer.args.workers = 2

    def record_workers(trainer):
        rec["workers"] = trainer.train_loader.num_workers

    monkeypatch.setitem(base.default_callbacks, "on_pretrain_routine_start",
                        [*base.default_callbacks["on_pretrain_routine_start"], forked_workers])
    monkeypatch.setitem(base.default_callbacks, "on_train_start",
                        [*base.default_callbacks["on_train_start"], record_workers])
    rc = main(["yolo", "train", "model=yolo11n.yaml", f"data={box_yaml}", f"bank={bank}", "paste_n=3",
               "epochs=3", "close_mosaic=1", f"imgsz={IMGSZ}", "batch=4", "device=cpu", "workers=0", "plots=True",
               "val=False", "amp=False", f"project={tmp_path}", "name=det", "exist_ok=True", "seed=0",
               "verbose=False"])
    assert rc == 0
    assert rec["workers"] == 2  # batches came from forked workers that opened the bank themselves
    check_run(rec, use_masks=False, tmp_path=tmp_path)
    assert (tmp_path / "det" / "weights" / "last.pt").is_file()


@pytest.mark.parametrize("extra", [{"classes": [0, 2]}, {"single_cls": True}])
def test_training_classes_and_single_cls_are_respected(extra, box_yaml, bank, tmp_path):
    """Ultralytics' ``classes=`` keeps only those class ids: the elephant (20) of the bank must not be pasted.
    ``single_cls=True`` labels every object 0 (8.4 renames the classes to "item"): bank objects paste as 0."""
    from genval_aug.ultralytics import GenValDetectionTrainer, YoloPaste

    tr = GenValDetectionTrainer(overrides={
        "model": "yolo11n.yaml", "data": str(box_yaml), "imgsz": IMGSZ, "genval": {"bank": str(bank), **PASTE},
        "project": str(tmp_path), "name": "t", "exist_ok": True, "device": "cpu", **extra})
    if not hasattr(tr, "data"):  # 8.3 reads the dataset in _setup_train
        tr.data = tr.get_dataset()
    tr.model = tr.get_model(cfg="yolo11n.yaml", verbose=False)
    ds = tr.build_dataset(tr.data["train"], "train", 4)
    cls = np.concatenate([ds[i]["cls"].numpy().reshape(-1) for i in range(len(ds))]).astype(int)
    paste = next(t for t in ds.transforms.transforms if isinstance(t, YoloPaste))
    assert paste.stats["pasted"] >= len(ds) and paste.stats["errors"] == 0
    if "classes" in extra:
        assert set(cls) <= {0, 2} and {0, 2} <= set(cls) and sorted(paste.class_map) == ["car", "person"]
    else:
        assert set(cls) == {0} and set(paste.class_map.values()) == {0} and len(paste.class_map) == 4


def test_rtdetr_dataset_items_are_pasted_before_and_after_close_mosaic(box_yaml, bank):
    """RT-DETR (Ultralytics' RTDETRDataset: its own transform list, stretched to imgsz) gets the paste the same
    way, also after close_mosaic rebuilds the transforms."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.models.rtdetr.val import RTDETRDataset

    cfg = get_cfg(overrides={"imgsz": IMGSZ, "task": "detect"})
    data = check_det_dataset(str(box_yaml))
    ds = RTDETRDataset(img_path=data["train"], imgsz=IMGSZ, batch_size=4, augment=True, hyp=cfg, rect=False,
                       data=data)
    t = PasteSpec(bank, **PASTE).make_transform(ds)
    hook_dataset(ds, t)
    for phase in ("mosaic", "closed"):
        if phase == "closed":
            ds.close_mosaic(hyp=copy(cfg))
        assert "YoloPaste" in names_of(ds.transforms), phase
        pasted = sum(check_formatted_sample(ds[i], use_masks=False) for i in range(len(ds)))
        assert pasted >= len(ds), phase
    assert t.stats["errors"] == 0 and t.stats["images"] == 2 * len(ds)


@pytest.mark.slow
def test_rtdetr_training_with_attach(box_yaml, bank, tmp_path):
    """attach() on an RTDETR model: its trainer builds RTDETRDataset through the hooked build_dataset."""
    from ultralytics import RTDETR

    torch.set_num_threads(1)
    seen = []

    def record(trainer):  # every batch: the dataset class, its transforms, how many bank-class objects
        pre = trainer.preprocess_batch

        def preprocess(batch):
            ds = trainer.train_loader.dataset
            seen.append((type(ds).__name__, names_of(ds.transforms),
                         int(np.isin(batch["cls"].numpy().reshape(-1), PASTED_IDS).sum())))
            return pre(batch)

        trainer.preprocess_batch = preprocess

    model = attach(RTDETR("rtdetr-l.yaml"), bank=bank, **PASTE)
    model.add_callback("on_pretrain_routine_end", record)
    model.train(data=str(box_yaml), epochs=1, imgsz=IMGSZ, batch=4, device="cpu", workers=0, plots=False,
                val=False, amp=False, project=str(tmp_path), name="rtdetr", exist_ok=True, seed=0, verbose=False,
                fraction=0.67)
    assert seen and all(name == "RTDETRDataset" and "YoloPaste" in tf for name, tf, _ in seen)
    assert sum(n for _, _, n in seen) >= len(seen)  # objects of the bank's classes (absent from the images)


def test_cli_single_class_id():
    """``paste_classes=0`` is one class id, as Ultralytics' own ``classes=0``; not an int to iterate."""
    from genval_aug.cli.yolo import parse_overrides

    _, spec = parse_overrides(["model=m.yaml", "bank=x", "paste_classes=0"])
    assert spec["classes"] == [0]
    assert PasteSpec.from_dict(spec).classes == [0]


def test_class_map_from_torchvision_coco_list():
    """torchvision's COCO category list (``weights.meta["categories"]``: ``__background__`` at 0 and ten ``N/A``
    placeholders) works as is: placeholders are not class names, so they are neither duplicates nor matches."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    from genval_aug.class_map import class_map_from_names

    cats = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert cats[0] == "__background__" and cats.count("N/A") > 1
    assert class_map_from_names(cats, ["person", "dog", "traffic_light"]) == {"person": 1, "dog": 18,
                                                                              "traffic_light": 10}
    with pytest.raises(ConfigError, match="no bank category matches"):
        class_map_from_names(cats, ["N/A", "background"])
    with pytest.raises(ConfigError, match="appears twice"):
        class_map_from_names(["cat", "dog", "Cat"], ["cat"])  # real duplicates still raise
