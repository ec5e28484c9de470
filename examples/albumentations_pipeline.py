"""Bank instances pasted inside an albumentations ``A.Compose`` (boxes, class labels and masks stay in step).

    python examples/albumentations_pipeline.py --data ../shared/data/coco128-seg/coco128-seg.yaml \
        --bank cache/coco128.lmdb --n-images 8 --out cache/albu_grid.png

Reads the first ``--n-images`` images of a YOLO-seg dataset (``genval_aug.datasets``), runs them through
``GenValPaste`` + flip + brightness/contrast with COCO-format boxes, prints how many objects each image
had before and after, and writes a grid of the results with their labels drawn.
Harvests ``--bank`` from the dataset first if it does not exist. Needs the ``albu`` extra
(albumentations 2.0.x). ``--smoke``: 2 images, a temporary bank if none is given; the smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from genval_aug.albumentations import GenValPaste, class_map_from_names
from genval_aug.datasets import YoloDataset, read_rgb
from genval_aug.viz import draw_labels, make_grid, save_png

ROOT = Path(__file__).resolve().parents[1]


def load(ds: YoloDataset, path: Path):
    """image (H, W, 3) RGB uint8, COCO boxes [x, y, w, h], class ids, masks (N, H, W) uint8."""
    img = read_rgb(path, convert=True)
    h, w = img.shape[:2]
    objs = [o for o in ds.read_labels(path).objects if o.polygon is not None]
    masks = np.zeros((len(objs), h, w), np.uint8)
    for k, o in enumerate(objs):
        cv2.fillPoly(masks[k], [np.round(o.polygon_pixels(w, h)).astype(np.int32)], 1)
    xyxy = np.array([o.box_xyxy(w, h) for o in objs], np.float64).reshape(-1, 4).clip(0, [w, h, w, h])
    boxes = np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]]
    return img, boxes, [o.cls for o in objs], masks


def main(argv: list[str] | None = None) -> int:
    default_data = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data / "coco128-seg" / "coco128-seg.yaml")
    p.add_argument("--bank", type=Path, default=None, help="default: cache/<dataset>.lmdb (harvested if missing)")
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="grid PNG of the augmented samples")
    p.add_argument("--smoke", action="store_true", help="2 images (smoke test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_images = 2
    bank = args.bank or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "cache") / f"{args.data.stem}.lmdb"
    if not bank.exists():
        from genval_aug.harvest import harvest

        print(f"no bank at {bank}: harvesting {args.data}")
        harvest(args.data, bank)

    ds = YoloDataset(args.data)
    tf = A.Compose(
        [GenValPaste(bank, config={"n": [1, 3]}, class_map=class_map_from_names(ds.names, bank), p=1.0),
         A.HorizontalFlip(p=0.5),
         A.RandomBrightnessContrast(p=0.5)],
        bbox_params=A.BboxParams(format="coco", label_fields=["class_labels"], min_visibility=0.1),
        seed=0,
    )
    pictures = []
    for path in ds.images("train")[: args.n_images]:
        img, boxes, classes, masks = load(ds, path)
        out = tf(image=img, bboxes=boxes, class_labels=classes, masks=masks)
        n_in, n_out = len(classes), len(out["class_labels"])
        print(f"{path.name}: {n_in} objects -> {n_out} after the pipeline")
        if args.out:
            b = np.asarray(out["bboxes"], np.float64).reshape(-1, 4)
            m = np.asarray(out["masks"]) if len(out["masks"]) else None
            # boxes albumentations dropped (min_visibility) keep their masks; draw only rows that match
            m = m if m is not None and len(m) == len(b) else None
            pictures.append(draw_labels(out["image"], np.c_[b[:, :2], b[:, :2] + b[:, 2:]],
                                        np.asarray(out["class_labels"]), masks=m, names=ds.names))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(pictures, tile_size=320), args.out)
        print(f"grid: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
