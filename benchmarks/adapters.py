"""Cost of the framework adapters over the paste core they wrap, on real coco128-seg images.

    python benchmarks/adapters.py [--data ../shared/data] [--images 32] [--repeats 3] [--n 3]

For every image the same paste (same instances, same places: the same numpy seed) is run through
  core          PasteEngine on an (H, W, 3) uint8 array + Targets with (N, H, W) bool masks (the baseline)
  tv uint8      genval_aug.transforms.GenValPaste on (tv_tensors.Image, {BoundingBoxes XYWH, Mask, labels, area,
                iscrowd})
  tv float      the same with a float32 image in [0, 1]
  albu          genval_aug.albumentations.GenValPaste inside A.Compose(bbox_params=coco, label_fields) with masks
Instances come from a real LMDB bank of the cut-outs in shared/data/rgba_objects. Single thread; CPU time of the
calling thread. Prints median / p90 ms per image and each adapter's ratio of medians to the core in the same run.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_images(data: Path, limit: int):
    from genval_aug.datasets import YoloDataset, read_rgb

    ds = YoloDataset(data / "coco128-seg" / "coco128-seg.yaml")
    out = []
    for path in ds.images("train"):
        try:
            img = read_rgb(path)
        except Exception:
            continue
        h, w = img.shape[:2]
        masks, classes = [], []
        for o in ds.read_labels(path).objects:
            poly = o.polygon_pixels(w, h)
            if poly is None:
                continue
            m = np.zeros((h, w), np.uint8)
            cv2.fillPoly(m, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], 1)
            if m.any():
                masks.append(m.astype(bool))
                classes.append(o.cls)
        if not masks:
            continue
        masks = np.array(masks)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        out.append((img, np.array(boxes, np.float32), np.array(classes, np.int64), masks))
        if len(out) >= limit:
            break
    return out


def build_bank(data: Path, path: Path) -> Path:
    from genval_aug.bank import BankWriter

    names = {c["name"]: c["yolo_index"] for c in json.loads((data / "coco_categories.json").read_text())["categories"]}
    with BankWriter(path) as w, open(data / "rgba_objects" / "objects.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["coco_class"] in names:
                bgra = cv2.imread(str(data / "rgba_objects" / row["file"]), cv2.IMREAD_UNCHANGED)
                w.add(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA), category=row["coco_class"],
                      category_id=names[row["coco_class"]])
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=3, help="instances pasted per image")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    import albumentations as A
    import torch
    from torchvision import tv_tensors

    from genval_aug.albumentations import GenValPaste as AlbuPaste
    from genval_aug.bank import InstanceBank
    from genval_aug.paste import Targets
    from genval_aug.transforms import GenValPaste

    torch.set_num_threads(1)
    samples = load_images(args.data, args.images)
    tmp = Path(tempfile.mkdtemp(prefix="genval-bench-"))
    bank = InstanceBank(build_bank(args.data, tmp / "bank.lmdb"))
    options = {"n": args.n}
    tv = GenValPaste(bank, **options)
    engine = tv.paster.engine  # the very engine the adapter calls: identical work
    albu = AlbuPaste(bank, config=options, p=1.0)
    albu.paster._engine, albu.paster._pid = engine, os.getpid()
    compose = A.Compose([albu], bbox_params=A.BboxParams(format="coco", label_fields=["class_labels"]))

    def tv_inputs(img, boxes, classes, masks, dtype):
        h, w = img.shape[:2]
        chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        image = tv_tensors.Image(chw if dtype == "uint8" else chw.float() / 255)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(xywh), format="XYWH", canvas_size=(h, w)),
                  "masks": tv_tensors.Mask(torch.from_numpy(masks).to(torch.uint8)),
                  "labels": torch.from_numpy(classes), "area": torch.from_numpy(masks.sum((1, 2)).astype(np.float32)),
                  "iscrowd": torch.zeros(len(classes), dtype=torch.int64)}
        return image, target

    rows = {"core": [], "tv uint8": [], "tv float": [], "albu": []}
    for rep in range(args.repeats):
        for i, (img, boxes, classes, masks) in enumerate(samples):
            seed = 1000 * rep + i
            xywh = boxes.copy()
            xywh[:, 2:] -= xywh[:, :2]
            tv_u8 = tv_inputs(img, boxes, classes, masks, "uint8")
            tv_f = tv_inputs(img, boxes, classes, masks, "float")
            m8 = masks.astype(np.uint8)
            calls = {  # (function, args, kwargs): inputs are built before the clock starts
                "core": (engine, (img, Targets(boxes, classes, masks), np.random.default_rng(seed)), {}),
                "tv uint8": (tv, tv_u8, {}),
                "tv float": (tv, tv_f, {}),
                "albu": (compose, (), {"image": img, "bboxes": xywh, "class_labels": classes, "masks": m8}),
            }
            tv._generator = lambda seed=seed: np.random.default_rng(seed)
            for name, (fn, a, kw) in calls.items():
                albu.set_random_state(np.random.default_rng(seed), albu.py_random)
                t0 = time.thread_time_ns()
                fn(*a, **kw)
                rows[name].append((time.thread_time_ns() - t0) / 1e6)
    base = float(np.median(rows["core"]))
    print(f"{len(samples)} real coco128-seg images x {args.repeats} repeats, {args.n} instances each, "
          f"{np.mean([len(s[2]) for s in samples]):.1f} objects per image (masks), 1 thread")
    print(f"{'path':<10} {'median ms':>10} {'p90 ms':>8} {'x core':>7}")
    for name, ts in rows.items():
        med = float(np.median(ts))
        print(f"{name:<10} {med:>10.2f} {np.percentile(ts, 90):>8.2f} {med / base:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
