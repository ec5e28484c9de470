"""Small real datasets and banks for the Ultralytics tests and benchmark (copied to temp dirs).

Ultralytics writes ``labels/*.cache`` beside the labels, so every dataset is a copy. The images are picked
from coco128-seg so that none contains a person, car or elephant: those three are the bank's categories,
which makes every instance of them in a batch a pasted one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

BANK_FILES = {  # rgba_objects file -> bank category (tiger has no COCO class: it must be reported unmapped)
    "rembg_girl-1.png": "person",
    "rembg_girl-2.png": "person",
    "rembg_girl-3.png": "person",
    "rembg_car-1.png": "car",
    "rembg_car-2.png": "car",
    "rembg_animal-2.png": "elephant",
    "rembg_animal-1.png": "tiger",
}
BANK_CLASS_IDS = {"person": 0, "car": 2, "elephant": 20}  # COCO / coco128 class ids


def pick_images(coco128_seg: Path, n: int, exclude: set[int] | None = None) -> list[str]:
    """The first ``n`` image stems (sorted) whose labels contain none of ``exclude`` (default: bank classes)."""
    exclude = set(BANK_CLASS_IDS.values()) if exclude is None else exclude
    stems = []
    for lab in sorted((coco128_seg / "labels" / "train2017").glob("*.txt")):
        classes = {int(line.split()[0]) for line in lab.read_text().splitlines() if line.strip()}
        if classes and not classes & exclude:
            stems.append(lab.stem)
        if len(stems) == n:
            break
    assert len(stems) == n, f"only {len(stems)} suitable images in {coco128_seg}"
    return stems


def polygon_row_to_box_row(row: str) -> str:
    """``cls x1 y1 x2 y2 ...`` (normalized polygon) -> ``cls xc yc w h`` (its bounding box)."""
    vals = row.split()
    xy = np.array(vals[1:], dtype=np.float64).reshape(-1, 2)
    x1, y1 = xy.min(0)
    x2, y2 = xy.max(0)
    return f"{vals[0]} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"


def make_dataset(coco128_seg: Path, root: Path, n: int = 12, boxes_only: bool = False) -> Path:
    """Copy ``n`` coco128-seg images (+ polygon or box labels) to ``root``; returns the data YAML path."""
    src_yaml = yaml.safe_load((coco128_seg / "coco128-seg.yaml").read_text())
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for stem in pick_images(coco128_seg, n):
        shutil.copy(coco128_seg / "images" / "train2017" / f"{stem}.jpg", root / "images" / "train" / f"{stem}.jpg")
        rows = (coco128_seg / "labels" / "train2017" / f"{stem}.txt").read_text().splitlines()
        if boxes_only:
            rows = [polygon_row_to_box_row(r) for r in rows if r.strip()]
        (root / "labels" / "train" / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/train", "names": src_yaml["names"]}
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def load_rgba(path: Path, max_side: int = 256) -> np.ndarray:
    """RGBA uint8 cut-out, cropped to its alpha and downscaled to ``max_side``."""
    bgra = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    rgba = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    rgba = rgba[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    s = max_side / max(rgba.shape[:2])
    if s < 1:
        rgba = cv2.resize(rgba, (round(rgba.shape[1] * s), round(rgba.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgba)


def make_bank(rgba_objects: Path, path: Path, max_side: int = 256) -> Path:
    """An LMDB bank with person, car, elephant (COCO names) and tiger (no COCO class) from rgba_objects."""
    from genval_aug.bank import BankWriter

    with BankWriter(path) as w:
        for name, cat in BANK_FILES.items():
            w.add(load_rgba(rgba_objects / name, max_side), category=cat,
                  source={"kind": "test", "dataset": "rgba_objects", "image": name})
    return path
