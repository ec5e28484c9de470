"""Makes the README's picture docs/images/yolo_train_batch.jpg: a real YOLO11n-seg run where every person, car
and elephant in the batch was pasted from the bank. For training on your own data, start from yolo_train.py.

    python examples/yolo_train_batch.py [--data ../shared/data] [--out docs/images/yolo_train_batch.jpg]

Builds a bank from shared/data/rgba_objects (person, car, elephant cut-outs), copies 16 coco128-seg images that
contain none of those classes (so every person/car/elephant in the picture was pasted), trains 2 epochs on CPU
with ``attach(model, bank=..., n=3)`` and copies Ultralytics' own ``train_batch*.jpg`` of the run to ``--out``.
Offline: ``genval_aug.offline.use_offline_environment`` (YOLO_OFFLINE=1, a local font in YOLO_CONFIG_DIR).
``--smoke``: 4 images, 1 epoch, imgsz 64 (the smoke test; writes the picture to ``--out`` all the same).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BANK = {"rembg_girl-1.png": "person", "rembg_girl-2.png": "person", "rembg_girl-3.png": "person",
        "rembg_car-1.png": "car", "rembg_car-2.png": "car", "rembg_animal-2.png": "elephant"}
BANK_IDS = {0, 2, 20}  # their COCO ids


def build_bank(rgba_dir: Path, path: Path) -> Path:
    from genval_aug.bank import BankWriter

    with BankWriter(path) as w:
        for name, category in BANK.items():
            rgba = cv2.cvtColor(cv2.imread(str(rgba_dir / name), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
            ys, xs = np.nonzero(rgba[..., 3])
            w.add(rgba[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1], category=category,
                  source={"kind": "example", "dataset": "rgba_objects", "image": name})
    return path


def copy_images(coco: Path, dst: Path, n: int) -> Path:
    (dst / "images" / "train").mkdir(parents=True)
    (dst / "labels" / "train").mkdir(parents=True)
    taken = 0
    for lab in sorted((coco / "labels" / "train2017").glob("*.txt")):
        rows = [r for r in lab.read_text().splitlines() if r.strip()]
        if not rows or {int(r.split()[0]) for r in rows} & BANK_IDS:
            continue
        shutil.copy(coco / "images" / "train2017" / f"{lab.stem}.jpg", dst / "images" / "train")
        shutil.copy(lab, dst / "labels" / "train")
        taken += 1
        if taken == n:
            break
    names = yaml.safe_load((coco / "coco128-seg.yaml").read_text())["names"]
    out = dst / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(dst), "train": "images/train", "val": "images/train", "names": names}))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--smoke", action="store_true", help="4 images, 1 epoch, imgsz 64")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "yolo_train_batch.jpg")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch-index", type=int, default=0, help="which train_batch<i>.jpg to keep")
    args = ap.parse_args(argv)
    from genval_aug.offline import use_offline_environment

    tmp = Path(tempfile.mkdtemp(prefix="genval-yolo-example-"))
    try:
        use_offline_environment(tmp)
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    """Build the bank, train, copy the picture (scratch files under ``tmp``)."""
    import torch
    from ultralytics import YOLO

    from genval_aug.ultralytics import attach

    torch.set_num_threads(1 if args.smoke else 2)
    bank = build_bank(args.data / "rgba_objects", tmp / "bank.lmdb")
    data = copy_images(args.data / "coco128-seg", tmp / "data", 4 if args.smoke else 16)
    model = attach(YOLO("yolo11n-seg.yaml"), bank=bank, n=3)
    epochs, imgsz = (1, 64) if args.smoke else (2, args.imgsz)
    model.train(data=str(data), epochs=epochs, close_mosaic=1, imgsz=imgsz, batch=4, device="cpu", workers=0,
                plots=True, val=False, amp=False, project=str(tmp / "runs"), name="seg", exist_ok=True, seed=0)
    src = tmp / "runs" / "seg" / f"train_batch{args.batch_index}.jpg"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KB) from {src}")


if __name__ == "__main__":
    main()
