"""Harvest throughput on coco128-seg (929 polygon annotations in 128 images), one process.

Prints annotations processed and instances kept per CPU-second (``time.process_time``, i.e. per core;
wall time is shown too but depends on machine load), for

* ``genval_aug``: the real harvest (exact crop-local rasterizer, pre-filters, PNG encode, LMDB writes);
* ``naive``: the same pipeline with the common full-frame approach (``cv2.fillPoly`` on an image-sized
  canvas per object, then cropped) -- the baseline measured in the same run;
* ``no bank writes``: the real harvest into a writer that only counts (no PNG encode, no LMDB);
* ``decode only``: reading and decoding the images, the floor of any harvest.

Goal (issue 3): >= 200 instances/s per core.

    python benchmarks/harvest.py [--data ../shared/data/coco128-seg/coco128-seg.yaml] [--repeat 3]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from genval_aug.bank import BankWriter
from genval_aug.datasets import ImageError, YoloDataset, read_rgb
from genval_aug.harvest import HarvestConfig, Harvester, open_source

GOAL = 200.0
SHARED = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEFAULT_DATA = SHARED / "coco128-seg" / "coco128-seg.yaml"


class NaiveHarvester(Harvester):
    """Baseline: every polygon filled on a full-size canvas with cv2.fillPoly."""

    def instance_mask(self, image, ann):
        if ann.polygons is None:
            return super().instance_mask(image, ann)
        H, W = image.shape[:2]
        polys = [np.round(np.asarray(p, np.float64) * (ann_scale(ann, W, H))).astype(np.int32) for p in ann.polygons]
        ann.normalized = False
        canvas = np.zeros((H, W), np.uint8)
        cv2.fillPoly(canvas, polys, 255)
        return canvas, 0, 0


class NullWriter:
    """Counts adds; no encoding, no LMDB (to split harvest cost from bank-write cost)."""

    path = None

    def __init__(self):
        self.added = self.duplicates = 0

    def add(self, rgba, **kw):
        self.added += 1

    def flush(self):
        pass

    def set_size_prior(self, *a):
        pass

    def record_rejections(self, *a):
        pass

    def set_status(self, *a):
        pass


def run_no_writes(data: str) -> tuple[float, float, int, int]:
    source = open_source(data)
    c0, w0 = time.process_time(), time.perf_counter()
    rep = Harvester().run(source, NullWriter())
    return time.process_time() - c0, time.perf_counter() - w0, rep.annotations, rep.kept


def ann_scale(ann, W, H):
    return np.array([W, H], np.float64) if ann.normalized else np.ones(2)


def run(harvester_cls, data: str, tmp: Path, workers: int = 0) -> tuple[float, float, int, int]:
    out = tmp / f"bank-{time.perf_counter_ns()}"
    source = open_source(data)
    c0, w0 = time.process_time(), time.perf_counter()
    with BankWriter(out) as w:
        rep = harvester_cls(HarvestConfig(workers=workers)).run(source, w)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    shutil.rmtree(out, ignore_errors=True)
    return cpu, wall, rep.annotations, rep.kept


def decode_only(data: str) -> tuple[float, float, int]:
    ds = YoloDataset(data)
    c0, w0 = time.process_time(), time.perf_counter()
    n = 0
    for p in ds.images("train"):
        try:
            read_rgb(p)
            n += 1
        except ImageError:
            pass
    return time.process_time() - c0, time.perf_counter() - w0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("GENVAL_AUG_BENCH_DATA", str(DEFAULT_DATA)))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="also time a harvest with this many worker processes")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"benchmark data not found: {args.data}")
    logging.disable(logging.WARNING)
    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="genval-bench-"))
    try:
        decode_only(args.data)  # warm the page cache
        results = {}
        for name, cls in (("naive", NaiveHarvester), ("genval_aug", Harvester)):
            best = min((run(cls, args.data, tmp) for _ in range(args.repeat)), key=lambda r: r[0])
            results[name] = best
        results["no bank writes"] = min((run_no_writes(args.data) for _ in range(args.repeat)), key=lambda r: r[0])
        par = min((run(Harvester, args.data, tmp, workers=args.workers) for _ in range(args.repeat)),
                  key=lambda r: r[1]) if args.workers > 1 else None
        dcpu, dwall, nimg = min((decode_only(args.data) for _ in range(args.repeat)), key=lambda r: r[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"coco128-seg harvest, 1 process, best of {args.repeat} (cv2 threads = 1)")
    print(f"{'':14s} {'cpu s':>7s} {'wall s':>7s} {'annotations/cpu-s':>18s} {'kept/cpu-s':>11s}")
    for name, (cpu, wall, n, kept) in results.items():
        print(f"{name:14s} {cpu:7.2f} {wall:7.2f} {n / cpu:18.0f} {kept / cpu:11.0f}")
    print(f"{'decode only':14s} {dcpu:7.2f} {dwall:7.2f} {'':>18s} {'':>11s}  ({nimg} images, {nimg / dcpu:.0f} images/cpu-s)")
    if par is not None:
        _, pwall, pn, pkept = par
        swall = results["genval_aug"][1]
        print(f"{'--workers ' + str(args.workers):14s} {'':7s} {pwall:7.2f}  {pn / pwall:8.0f} annotations/s, "
              f"{pkept / pwall:.0f} kept/s wall ({swall / pwall:.2f}x the 1-process wall time; "
              f"{os.cpu_count()} cores, shared)")
    cpu, _, n, kept = results["genval_aug"]
    ncpu, _, nn, nkept = results["naive"]
    print(f"speed-up vs naive full-frame masks: {ncpu / cpu:.2f}x")
    print(f"goal {GOAL:.0f} instances/s per core: annotations {n / cpu / GOAL:.2f}x of goal, "
          f"kept instances {kept / cpu / GOAL:.2f}x of goal")
    if nkept != kept:
        print(f"note: naive kept {nkept} vs {kept} (cv2.fillPoly paints every pixel an edge touches, so masks grow)")


if __name__ == "__main__":
    main()
