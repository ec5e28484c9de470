"""Per-image cost of the paste engine on 640x640 real coco128-seg images, beside Ultralytics' CopyPaste.

    python benchmarks/paste.py [--data ../shared/data] [--images 32] [--repeats 3] [--quick]

Single thread (cv2.setNumThreads(1), BLAS/OpenMP threads 1). Images are letterboxed to 640x640 (grey 114 pad,
as Ultralytics does); labels are the images' YOLO-seg polygons resampled to 1000 points (Ultralytics' own
representation). Instances are the real RGBA cut-outs in shared/data/rgba_objects, cropped to their alpha and
limited to 256 px, kept decoded in memory with the metadata a bank record has ("engine" rows: the cost of the
engine alone) or stored in a real LMDB
bank ("bank" row: adds sampling + decode). With only 10 instances the engine's per-instance source cache
(``PasteConfig.source_cache_mb``) always hits after warm-up; the "source cache off" rows show the cost when every
draw is a miss (a bank much larger than the cache). The baseline is ``ultralytics.data.augment.CopyPaste(p=0.5,
mode="flip")`` on the same images in the same run, interleaved per image. The "OpenCV floor" row times only the
unavoidable OpenCV calls for the same number of instances (see ``opencv_floor``): a lower bound for any engine
built from these primitives. Times are CPU time of the calling
thread (``time.thread_time_ns``), so other processes on a shared machine inflate them less than wall-clock.
Prints median / p90 ms per image and the ratio of medians to the baseline.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genval_aug.paste import PasteConfig, PasteEngine, Targets  # noqa: E402
from genval_aug.quality import alpha_stats  # noqa: E402

SIZE = 640


@dataclass
class Inst:
    id: str
    category: str
    category_id: int
    rgba: np.ndarray
    meta: dict


class ListSource:
    """In-memory decoded instances with the BankSampler interface."""

    def __init__(self, instances):
        self.instances = instances

    def sample(self, rng, n):
        return [self.instances[int(i)] for i in rng.integers(0, len(self.instances), size=n)]


def resample(poly: np.ndarray, n: int = 1000) -> np.ndarray:
    """Resample a closed polygon to n points along its perimeter (as Ultralytics' resample_segments)."""
    p = np.concatenate([poly, poly[:1]], axis=0)
    seg = np.sqrt(((p[1:] - p[:-1]) ** 2).sum(1))
    t = np.concatenate([[0], np.cumsum(seg)])
    s = np.linspace(0, t[-1], n)
    return np.stack([np.interp(s, t, p[:, 0]), np.interp(s, t, p[:, 1])], 1).astype(np.float32)


def letterbox_samples(root: Path, limit: int):
    out = []
    for img_path in sorted((root / "images" / "train2017").glob("*.jpg")):
        lab = root / "labels" / "train2017" / (img_path.stem + ".txt")
        if not lab.exists():
            continue
        bgr = cv2.imread(str(img_path))
        h, w = bgr.shape[:2]
        r = SIZE / max(h, w)
        nh, nw = round(h * r), round(w * r)
        top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
        canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
        canvas[top : top + nh, left : left + nw] = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        cls, polys, boxes = [], [], []
        for line in lab.read_text().splitlines():
            v = line.split()
            if len(v) < 7:
                continue
            xy = np.array(v[1:], np.float64).reshape(-1, 2) * [nw, nh] + [left, top]
            poly = resample(xy.astype(np.float32))
            cls.append(int(v[0]))
            polys.append(poly)
            boxes.append([*poly.min(0), *poly.max(0)])
        if cls:
            out.append((canvas, np.array(cls, np.int64), np.array(boxes, np.float32), polys))
        if len(out) >= limit:
            break
    return out


def load_instances(data: Path, max_side: int = 256):
    cats = {c["name"]: c["yolo_index"] for c in json.loads((data / "coco_categories.json").read_text())["categories"]}
    out = []
    with open(data / "rgba_objects" / "objects.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["coco_class"] or row["class_name"]
            bgra = cv2.imread(str(data / "rgba_objects" / row["file"]), cv2.IMREAD_UNCHANGED)
            rgba = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)
            x, y, w, h = cv2.boundingRect(rgba[..., 3])
            rgba = rgba[y : y + h, x : x + w]
            f_ = min(1.0, max_side / max(h, w))
            rgba = cv2.resize(rgba, (max(int(w * f_), 1), max(int(h * f_), 1)), interpolation=cv2.INTER_AREA)
            rgba = np.ascontiguousarray(rgba)
            # the metadata a bank record carries (alpha area + bbox), which lets the engine skip an alpha scan
            meta = {"width": rgba.shape[1], "height": rgba.shape[0], "mask": alpha_stats(rgba).to_dict()}
            out.append(Inst(row["file"], name, cats.get(name, 0), rgba, meta))
    return out


def build_bank(instances, path: Path):
    from genval_aug.bank import BankWriter, InstanceBank

    with BankWriter(str(path)) as w:
        for inst in instances:
            w.add(inst.rgba, category=inst.category, category_id=inst.category_id)
    return InstanceBank(str(path))


def time_interleaved(fns: dict, samples, repeats: int) -> dict[str, np.ndarray]:
    """CPU time (ms, this thread only) of every fn on every sample, the fns interleaved per sample so that
    machine load affects all of them alike. Seeds depend on (repeat, sample) only."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for i, s in enumerate(samples):
            for name, fn in fns.items():
                rng = np.random.default_rng(1000 * r + i)
                t0 = time.thread_time_ns()
                fn(s, rng)
                times[name].append(time.thread_time_ns() - t0)
    return {k: np.array(v) / 1e6 for k, v in times.items()}


def ultralytics_copypaste(samples):
    from ultralytics.data.augment import CopyPaste
    from ultralytics.utils.instance import Instances

    cp = CopyPaste(p=0.5, mode="flip")
    counts = []

    def fn(s, rng):
        img, cls, boxes, polys = s
        labels = {
            "img": img,
            "cls": cls[:, None].astype(np.float32),
            "instances": Instances(boxes.copy(), np.stack(polys).copy(), bbox_format="xyxy", normalized=False),
        }
        out = cp(labels)
        counts.append(len(out["cls"]) - len(cls))

    return fn, counts


def opencv_floor(instances, k: int):
    """The fewest OpenCV calls any paste with the default mode's features needs, per image: copy the image;
    per instance (size drawn as the engine draws it, uniform position): bilinear resize, split colour/alpha,
    one colour affine, feathered alpha, alpha composite, outline of the label mask. No harmonization
    statistics, colour-bleed guard, overlap test, occlusion of other objects or input checks: a lower bound
    for the engine built from these primitives, not an alternative to it."""
    from genval_aug.paste import augment as A

    crops = [A.crop_to_alpha(inst.rgba) for inst in instances]
    cfg = PasteConfig()
    m = np.array([[1.05, 0.02, 0.0, 3.0], [0.0, 0.95, 0.03, -2.0], [0.02, 0.0, 1.0, 1.0]])

    def fn(s, rng):
        img = s[0]
        H, W = img.shape[:2]
        out = img.copy()
        for j in rng.integers(0, len(crops), size=k):
            crop, area = crops[j]
            rel = A.sample_relative_size(rng, None, cfg.scale_range)
            h, w = A.target_size(crop.shape[:2], area, (H, W), rel, 1.0, cfg.min_side)
            x, y = int(rng.integers(-(w // 2), W - w // 2)), int(rng.integers(-(h // 2), H - h // 2))
            patch = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
            alpha = cv2.extractChannel(patch, 3)
            colour = cv2.transform(cv2.cvtColor(patch, cv2.COLOR_RGBA2BGR), m)
            soft = cv2.min(alpha, cv2.GaussianBlur(alpha, (5, 5), cfg.feather_sigma))
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
            if x1 <= x0 or y1 <= y0:
                continue
            py, px = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
            dst = out[y0:y1, x0:x1]
            a3 = cv2.cvtColor(np.ascontiguousarray(soft[py, px]), cv2.COLOR_GRAY2BGR)
            fg = cv2.multiply(np.ascontiguousarray(colour[py, px]), a3, scale=1 / 255.0)
            bg = cv2.multiply(np.ascontiguousarray(dst), cv2.bitwise_not(a3), scale=1 / 255.0)
            dst[...] = cv2.add(fg, bg)
            _, label = cv2.threshold(alpha, cfg.label_threshold - 1, 1, cv2.THRESH_BINARY)
            cv2.findContours(label, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the default mode and the baseline")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    samples = letterbox_samples(args.data / "coco128-seg", args.images)
    instances = load_instances(args.data)
    print(f"{len(samples)} letterboxed 640x640 coco128-seg images, {len(instances)} RGBA instances "
          f"(<=256 px), cv2 {cv2.__version__}, numpy {np.__version__}, 1 thread")

    base_fn, counts = ultralytics_copypaste(samples)
    base_fn(samples[0], np.random.default_rng(0))  # warm-up (imports)
    counts.clear()
    source = ListSource(instances)

    def engine_fn(engine, label_mode="polygons"):
        def fn(s, rng):
            img, cls, boxes, polys = s
            t = Targets(boxes, cls, polygons=polys if label_mode == "polygons" else None)
            engine(img, t, rng, channel_order="bgr")

        return fn

    ks = (1, 3, 8)
    default = PasteConfig()
    fns = {"CopyPaste": base_fn}
    for k in ks:
        fns[f"default (feather+reinhard)|{k}"] = engine_fn(PasteEngine(source, PasteConfig(n=k)))
    fns["OpenCV floor (see opencv_floor)|3"] = opencv_floor(instances, 3)
    for k in ks:  # every draw prepares its instance from scratch (a bank much larger than the cache)
        fns[f"default, source cache off|{k}"] = engine_fn(PasteEngine(source, PasteConfig(n=k, source_cache_mb=0)))
    bank_dir = tempfile.TemporaryDirectory()
    if not args.quick:
        for k in ks:
            fns[f"default, box-only labels|{k}"] = engine_fn(PasteEngine(source, PasteConfig(n=k)), "boxes")
        for harm in ("none", "reinhard", "linear_ot"):
            for blend in ("hard", "alpha", "feather", "poisson"):
                if (harm, blend) == (default.harmonize, default.blend):
                    continue
                for k in ks:
                    fns[f"{blend}+{harm}|{k}"] = engine_fn(PasteEngine(source, PasteConfig(n=k, blend=blend, harmonize=harm)))
        bank = build_bank(instances, Path(bank_dir.name) / "bench.lmdb")
        for k in ks:
            fns[f"default + LMDB bank (sampling + decode)|{k}"] = engine_fn(PasteEngine(bank, PasteConfig(n=k)))
    for fn in fns.values():  # warm-up
        fn(samples[0], np.random.default_rng(0))
    counts.clear()
    times = time_interleaved(fns, samples, args.repeats)
    bank_dir.cleanup()
    base = times.pop("CopyPaste")
    base_med = float(np.median(base))
    print(f"baseline ultralytics CopyPaste(p=0.5, flip): median {base_med:.3f} ms, p90 "
          f"{np.percentile(base, 90):.3f} ms, mean pasted/image {np.mean(counts):.2f}")
    print()
    print("| mode | k | median ms/image | p90 ms | median / CopyPaste median |")
    print("|---|---|---|---|---|")
    print(f"| Ultralytics CopyPaste (flip, p=0.5) | {np.mean(counts):.1f} (mean) | {base_med:.2f} | "
          f"{np.percentile(base, 90):.2f} | 1.00 |")
    for name, ms in times.items():
        label, k = name.split("|")
        med = float(np.median(ms))
        print(f"| {label} | {k} | {med:.2f} | {np.percentile(ms, 90):.2f} | {med / base_med:.2f} |")


if __name__ == "__main__":
    main()
