"""``make demo``: the main job on the embedded default data, offline, on 2 CPU cores.

1. harvest an instance bank from ``../shared/data/coco128-seg`` (real COCO images and polygons);
2. write a contact sheet of the bank and a grid of augmented samples with their labels drawn;
3. train YOLO11n-seg briefly with the bank attached, and run a torchvision Mask R-CNN training step
   through ``GenValPaste``;
4. print where every output is and a one-paragraph summary.

Without ``../shared/data`` the demo still runs, on data that ships inside installed packages: Ultralytics'
two sample photos as backgrounds and a bank of rendered shapes (``genval_aug.build`` ``shapes`` source).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from genval_aug.offline import use_offline_environment

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data"))
log = logging.getLogger("genval_aug.demo")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ data
def coco128_subset(src: Path, dst: Path, n: int) -> Path:
    """Copy ``n`` images + labels of coco128-seg to a writable folder (Ultralytics writes label caches)."""
    import yaml

    cfg = yaml.safe_load((src / "coco128-seg.yaml").read_text())
    for sub in ("images/train2017", "labels/train2017"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for img in sorted((src / "images" / "train2017").glob("*.jpg"))[:n]:
        shutil.copy(img, dst / "images" / "train2017" / img.name)
        lab = src / "labels" / "train2017" / (img.stem + ".txt")
        if lab.exists():
            shutil.copy(lab, dst / "labels" / "train2017" / lab.name)
    out = dst / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(dst), "train": "images/train2017", "val": "images/train2017",
                                   "names": cfg["names"]}))
    return out


def packaged_dataset(dst: Path, bank_path: Path) -> tuple[Path, Path]:
    """Fallback without shared data: Ultralytics' sample photos (no labels) + a bank of rendered shapes."""
    import cv2
    import ultralytics
    import yaml

    from genval_aug.bank import BankWriter
    from genval_aug.build.sources import ShapesSource

    names = ["disc", "box", "triangle", "blob"]
    src = ShapesSource(size=96)
    with BankWriter(bank_path) as w:
        for cid, name in enumerate(names):
            for seed in range(12):
                rgba, _ = src.render(name, seed)
                w.add(rgba, category=name, category_id=cid, source={"kind": "shapes", "seed": seed})
    assets = Path(ultralytics.__file__).parent / "assets"
    for sub in ("images/train", "labels/train"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(assets.glob("*.jpg")) * 4):  # the 2 photos, flipped variants for a few images
        im = cv2.imread(str(f))
        cv2.imwrite(str(dst / "images" / "train" / f"{f.stem}_{i}.jpg"), im[:, ::-1] if i % 2 else im)
        (dst / "labels" / "train" / f"{f.stem}_{i}.txt").write_text("")
    out = dst / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(dst), "train": "images/train", "val": "images/train",
                                   "names": dict(enumerate(names))}))
    return out, bank_path


# ------------------------------------------------------------------------------------------------ stages
def stage_pictures(bank_path: Path, data_yaml: Path, out: Path) -> tuple[Path, Path]:
    from genval_aug.cli import main as cli
    from genval_aug.viz import contact_sheet

    sheet = out / "contact_sheet.png"
    contact_sheet(bank_path, sheet, per_class=6, max_classes=8)
    grid = out / "augmented_grid.png"
    code = cli(["preview", "--data", str(data_yaml), "--bank", str(bank_path), "--out", str(grid), "--n", "4",
                "--seed", "3", "--with-original", "--tile", "256", "--paste-n", "2-4"])
    if code:
        raise SystemExit(f"demo: preview failed with exit code {code}")
    return sheet, grid


def paste_cost(bank_path: Path, data_yaml: Path, n_images: int = 16) -> float:
    """Median milliseconds to paste 1-3 instances (default blend + harmonization) into a dataset image."""
    import numpy as np

    from genval_aug.bank import InstanceBank
    from genval_aug.datasets import YoloDataset, read_rgb
    from genval_aug.lazy_engine import make_config
    from genval_aug.paste import PasteEngine

    ds = YoloDataset(data_yaml)
    engine = PasteEngine(InstanceBank(bank_path), config=make_config(None, {"n": (1, 3)}))
    rng = np.random.default_rng(0)
    times = []
    for path in ds.images()[:n_images]:
        img = read_rgb(path)
        targets = ds.read_labels(path).targets(img.shape[1], img.shape[0])
        t0 = time.perf_counter()
        engine(img, targets, rng)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def stage_yolo(bank_path: Path, data_yaml: Path, out: Path, epochs: int, imgsz: int) -> dict:
    import torch
    from ultralytics import YOLO

    from genval_aug.ultralytics import YoloPaste, attach

    torch.set_num_threads(2)
    seen: dict = {}

    def record(trainer) -> None:  # the transform lives in the training dataset (workers=0 on CPU)
        for t in getattr(trainer.train_loader.dataset.transforms, "transforms", []):
            if isinstance(t, YoloPaste):
                seen.update(t.stats)

    model = attach(YOLO("yolo11n-seg.yaml"), bank=str(bank_path), n=(1, 3), seed=0)
    model.add_callback("on_train_end", record)
    logging.getLogger("ultralytics").setLevel(logging.WARNING)  # keep the demo's own lines readable
    t0 = time.perf_counter()
    model.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=8, workers=0, device="cpu", amp=False,
                plots=True, val=False, project=str(out), name="yolo", exist_ok=True, verbose=False,
                close_mosaic=1, seed=0)
    seen["seconds"] = time.perf_counter() - t0
    seen["run_dir"] = str(out / "yolo")
    return seen


def stage_maskrcnn(bank_path: Path, data_yaml: Path) -> dict:
    import numpy as np
    import torch
    from torchvision import tv_tensors
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.ops import masks_to_boxes
    from torchvision.transforms import v2

    from genval_aug.datasets import YoloDataset, read_rgb
    from genval_aug.harvest.masks import rasterize_polygon
    from genval_aug.transforms import GenValPaste, class_map_from_names

    ds = YoloDataset(data_yaml)
    names = ["__background__", *[ds.names[i] for i in sorted(ds.names)]]
    paste = GenValPaste(str(bank_path), class_map=class_map_from_names(names, str(bank_path)), n=(2, 3), seed=0)
    tf = v2.Compose([paste, v2.Resize(None, max_size=320), v2.ToDtype(torch.float32, scale=True),
                     v2.SanitizeBoundingBoxes()])
    images, targets, pasted = [], [], 0
    for path in ds.images()[:2]:
        img = read_rgb(path)
        h, w = img.shape[:2]
        objs = ds.read_labels(path).objects
        polys = [o.polygon_pixels(w, h) for o in objs]
        masks = np.stack([rasterize_polygon(p, (h, w)) > 0 for p in polys]) if objs else np.zeros((0, h, w), bool)
        target = {"boxes": tv_tensors.BoundingBoxes(masks_to_boxes(torch.from_numpy(masks)), format="XYXY",
                                                    canvas_size=(h, w)),
                  "masks": tv_tensors.Mask(torch.from_numpy(masks)),
                  "labels": torch.as_tensor([o.cls + 1 for o in objs], dtype=torch.int64)}
        n_before = len(target["labels"])
        image, target = tf(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), target)
        pasted += max(0, len(target["labels"]) - n_before)
        images.append(image)
        targets.append(target)
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(names), min_size=320,
                                  max_size=320)
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = model(images, targets)
    total = sum(losses.values())
    optim.zero_grad()
    total.backward()
    optim.step()
    return {"loss": float(total.detach()), "finite": bool(torch.isfinite(total)), "images": len(images), "net_added": pasted}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="genval_aug demo: harvest, look, train (offline, CPU)")
    ap.add_argument("--out", default=str(ROOT / "cache" / "demo"), help="output folder (default cache/demo)")
    ap.add_argument("--images", type=int, default=32, help="coco128 images used for training")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--skip-train", action="store_true", help="only build the bank and the pictures")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    use_offline_environment(out / "offline")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    from genval_aug.bank import InstanceBank

    data_dir = out / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    bank_path = out / "bank.lmdb"
    if (SHARED / "coco128-seg" / "coco128-seg.yaml").is_file():
        from genval_aug.harvest import harvest

        _say(f"[1/4] harvesting {SHARED / 'coco128-seg'} into {bank_path}")
        report = harvest(SHARED / "coco128-seg" / "coco128-seg.yaml", bank_path)
        _say("      " + report.summary().replace("\n", "\n      "))
        data_yaml = coco128_subset(SHARED / "coco128-seg", data_dir, args.images)
        source = "coco128-seg (real COCO images and polygons)"
    else:
        _say(f"[1/4] {SHARED} not found: using data shipped inside installed packages "
             "(Ultralytics' sample photos as backgrounds, a bank of rendered shapes)")
        shutil.rmtree(bank_path, ignore_errors=True)
        data_yaml, bank_path = packaged_dataset(data_dir, bank_path)
        source = "packaged fallback (Ultralytics sample photos + rendered shapes)"
    bank = InstanceBank(bank_path)
    _say(f"      bank: {bank.count()} instances in {len(bank.categories())} classes")

    _say("[2/4] contact sheet and augmented samples")
    t0 = time.perf_counter()
    sheet, grid = stage_pictures(bank_path, data_yaml, out)
    _say(f"      {sheet}\n      {grid}  ({time.perf_counter() - t0:.1f}s)")
    ms = paste_cost(bank_path, data_yaml)
    _say(f"      pasting 1-3 instances costs {ms:.1f} ms per image (median, feathered alpha + Reinhard)")

    yolo = rcnn = None
    if not args.skip_train:
        _say(f"[3/4] YOLO11n-seg, {args.epochs} epoch(s) at imgsz {args.imgsz} on CPU with the bank attached")
        yolo = stage_yolo(bank_path, data_yaml, out, args.epochs, args.imgsz)
        _say(f"      {yolo.get('images', 0)} training images pasted into, {yolo.get('pasted', 0)} objects pasted, "
             f"{yolo['seconds']:.0f}s; batches drawn to {yolo['run_dir']}/train_batch*.jpg")
        _say("      torchvision Mask R-CNN training step through GenValPaste")
        rcnn = stage_maskrcnn(bank_path, data_yaml)
        _say(f"      loss {rcnn['loss']:.3f} (finite: {rcnn['finite']}) on {rcnn['images']} pasted images")

    _say("[4/4] summary")
    per_img = ""
    if yolo and yolo.get("images"):
        per_img = (f" During YOLO training {yolo['pasted']} instances were pasted into {yolo['images']} images "
                   f"({yolo['pasted'] / yolo['images']:.1f} per image), {yolo['errors']} paste errors, and a "
                   f"training epoch took {yolo['seconds'] / max(1, args.epochs):.0f}s on this CPU.")
    _say(f"      Source: {source}. The bank at {bank_path} holds {bank.count()} quality-filtered RGBA instances in "
         f"{len(bank.categories())} classes (contact sheet: {sheet}); augmented samples with pasted objects "
         f"outlined are in {grid}; pasting 1-3 instances costs {ms:.1f} ms per image.{per_img}"
         + (f" A Mask R-CNN step on pasted samples gave loss {rcnn['loss']:.2f}." if rcnn else "")
         + f" Total {time.perf_counter() - t_start:.0f}s.")
    return 0 if (rcnn is None or rcnn["finite"]) else 1


if __name__ == "__main__":
    sys.exit(main())
