"""Merge throughput: records/s that ``bank merge`` copies from one input bank into a new output, with each
record checked (decoded and re-hashed against its content id, the default) and, as the baseline in the same
run, copied unchecked (``check=False``, what merge did before it checked records).

Usage: python benchmarks/bank_merge.py [--data ../shared/data] [--n 2500] [--side 150] [--repeat 3]
(data: --data, else $GENVAL_AUG_SHARED_DATA, else ../shared/data beside the repository)
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
from bank_read import DEFAULT_DATA, build

from genval_aug.bank import merge


def timed_merge(src: str, out: str, **kw) -> float:
    t0 = time.perf_counter()
    res = merge(out, [src], **kw)
    s = time.perf_counter() - t0
    assert res["skipped"] == 0, res
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (holds rgba_objects/)")
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--side", type=int, default=150)
    ap.add_argument("--repeat", type=int, default=3, help="merges per mode; the best is reported")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    modes = {"checked": {}}
    if "check" in inspect.signature(merge).parameters:
        modes = {"unchecked": {"check": False}, **modes}
    with tempfile.TemporaryDirectory() as d:
        src = str(Path(d) / "src.lmdb")
        build(src, args.n, args.side, args.data)
        best = {}
        for r in range(args.repeat):
            for name, kw in modes.items():
                s = timed_merge(src, str(Path(d) / f"{name}-{r}.lmdb"), **kw)
                best[name] = min(best.get(name, s), s)
        for name, s in best.items():
            print(f"merge {args.n} records of ~{args.side}px, {name:9s}: {s:6.2f} s  {args.n / s:8.0f} records/s")
        if len(best) == 2:
            print(f"checked / unchecked time: {best['checked'] / best['unchecked']:.2f}x")


if __name__ == "__main__":
    main()
