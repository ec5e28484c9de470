"""Ultralytics training-dataset ``__getitem__`` throughput with and without genval_aug's paste.

    python benchmarks/yolo_loader.py [--data ../shared/data] [--images 64] [--imgsz 640] [--n 3] [--rounds 3]

One real ``YOLODataset`` (task segment, default hyperparameters, ``cache=False`` as Ultralytics defaults) over a
copy of coco128-seg; the bank is a real LMDB bank built from shared/data/rgba_objects (person, car, elephant,
cut-outs limited to 400 px). Both variants run in the same process on the same images, with the same
Ultralytics randomness (global ``random``/``numpy`` seeded identically before each pass; the paste draws from
its own generator), interleaved pass by pass, after one warm-up pass each. For context the mosaic phase also
times Ultralytics' own ``copy_paste=0.5`` (flip mode, its own objects) in place of genval_aug. The paste variant is the
``Compose`` that ``genval_aug.ultralytics`` builds (paste before MixUp, k = ``--n`` instances, default
blending and harmonization). Timed phases: with mosaic (first epochs) and after ``close_mosaic``.
Times are CPU time of the calling thread (``time.thread_time_ns``; cv2 runs single-threaded under
Ultralytics) so other processes on a shared machine inflate them less; wall-clock is printed beside it.
Goal: throughput ratio (paste / baseline) >= 0.90.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
_TMP = Path(tempfile.mkdtemp(prefix="genval-yolo-bench-"))
os.environ.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_VERBOSE": "False",
                   "YOLO_CONFIG_DIR": str(_TMP / "yolo"), "MPLCONFIGDIR": str(_TMP / "mpl")})

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from copy import copy  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _font() -> None:
    """Ultralytics HEAD-requests Arial.ttf in check_det_dataset; give it matplotlib's DejaVuSans instead."""
    import matplotlib

    d = _TMP / "yolo" / "Ultralytics"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", d / name)


def copy_dataset(src: Path, dst: Path, n: int) -> Path:
    (dst / "images" / "train").mkdir(parents=True)
    (dst / "labels" / "train").mkdir(parents=True)
    for img in sorted((src / "images" / "train2017").glob("*.jpg"))[:n]:
        shutil.copy(img, dst / "images" / "train" / img.name)
        lab = src / "labels" / "train2017" / f"{img.stem}.txt"
        if lab.exists():
            shutil.copy(lab, dst / "labels" / "train" / lab.name)
    names = yaml.safe_load((src / "coco128-seg.yaml").read_text())["names"]
    out = dst / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(dst), "train": "images/train", "val": "images/train", "names": names}))
    return out


def timed_pass(ds, compose, indices, seed: int) -> tuple[float, float]:
    import torch

    ds.transforms = compose
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
    for i in indices:
        ds[i]
    return (time.thread_time_ns() - cpu) / 1e6, (time.perf_counter_ns() - wall) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--n", type=int, default=3, help="instances pasted per image (k)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _font()

    import cv2
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from yolo_fixtures import make_bank

    from genval_aug.ultralytics import PasteSpec, insert_transform

    data_yaml = copy_dataset(args.data / "coco128-seg", _TMP / "data", args.images)
    bank = make_bank(args.data / "rgba_objects", _TMP / "bank.lmdb", max_side=400)
    cfg = get_cfg(overrides={"imgsz": args.imgsz, "task": "segment"})
    data = check_det_dataset(str(data_yaml))
    ds = build_yolo_dataset(cfg, data["train"], 16, data, mode="train", stride=32)
    variants = {"paste": PasteSpec(bank, n=args.n).make_transform(ds),  # default: decoded-instance LRU
                # no decoded-instance LRU and no engine source cache: every draw decodes and prepares anew
                "paste_nocache": PasteSpec(bank, n=args.n, cache_mb=0, source_cache_mb=0).make_transform(ds)}
    indices = list(range(len(ds)))
    print(f"dataset: {len(ds)} coco128-seg images, imgsz {args.imgsz}, task segment, cache=False; "
          f"bank: {bank.name} ({', '.join(sorted(variants['paste'].class_map))}, 7 instances); k={args.n}; "
          f"cv2 threads {cv2.getNumThreads()}; {args.rounds} interleaved rounds")
    for phase, hyp in (("mosaic", copy(cfg)), ("close_mosaic", None)):
        if hyp is None:
            hyp = copy(cfg)
            hyp.mosaic = hyp.mixup = hyp.cutmix = hyp.copy_paste = 0.0
        composes = {"base": ds.build_transforms(copy(hyp))}
        if phase == "mosaic":  # context: Ultralytics' own copy-paste (flip mode, its objects) in the same loader
            cp = copy(hyp)
            cp.copy_paste, cp.copy_paste_mode = 0.5, "flip"
            composes["ultralytics_copy_paste"] = ds.build_transforms(cp)
        for name, t in variants.items():
            composes[name] = ds.build_transforms(copy(hyp))
            insert_transform(composes[name], t)
        for c in composes.values():  # warm-up (file cache, image buffer, bank open, first decodes)
            timed_pass(ds, c, indices, 0)
        tot = {name: [0.0, 0.0] for name in composes}
        before = {name: dict(t.stats) for name, t in variants.items()}
        for r in range(args.rounds):
            names = list(composes) if r % 2 == 0 else list(reversed(composes))
            for name in names:
                cpu, wall = timed_pass(ds, composes[name], indices, 100 + r)
                tot[name][0] += cpu
                tot[name][1] += wall
        n_items = args.rounds * len(indices)
        b_cpu, b_wall = (v / n_items for v in tot["base"])
        print(f"[{phase}] baseline {b_cpu:.2f} ms/img CPU ({1000 / b_cpu:.0f} img/s)")
        if "ultralytics_copy_paste" in tot:
            u_cpu, u_wall = (v / n_items for v in tot["ultralytics_copy_paste"])
            print(f"[{phase}] for context, Ultralytics copy_paste=0.5 (flip) instead of genval_aug: {u_cpu:.2f} ms/img "
                  f"CPU; throughput ratio CPU {b_cpu / u_cpu:.3f}, wall {b_wall / u_wall:.3f}")
        for name, t in variants.items():
            p_cpu, p_wall = (v / n_items for v in tot[name])
            pasted_per_img = (t.stats["pasted"] - before[name]["pasted"]) / n_items
            print(f"[{phase}] {name:13s} {p_cpu:.2f} ms/img CPU ({1000 / p_cpu:.0f} img/s), "
                  f"{pasted_per_img:.2f} objects pasted/img, errors {t.stats['errors']}; throughput ratio "
                  f"(paste / baseline): CPU {b_cpu / p_cpu:.3f}, wall {b_wall / p_wall:.3f}  (goal >= 0.90)")
    shutil.rmtree(_TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
