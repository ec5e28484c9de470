"""Bank read throughput: raw random reads/s and decoded instances/s in one process,
alone and while a concurrent writer process commits new instances.

Goal (issue 2): >= 50k raw reads/s and >= 3k decoded instances/s per process.
Usage: python benchmarks/bank_read.py [--data ../shared/data] [--n 10000] [--side 150] [--seconds 3]
(data: --data, else $GENVAL_AUG_SHARED_DATA, else ../shared/data beside the repository)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

import cv2
import numpy as np

from genval_aug.bank import BankSampler, BankWriter, InstanceBank

DEFAULT_DATA = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_cutouts(data: Path) -> list[np.ndarray]:
    """Real photo cut-outs (``data``/rgba_objects), cropped to their alpha box; synthetic if absent."""
    out = []
    folder = data / "rgba_objects"
    for f in sorted(folder.glob("*.png")):
        im = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        x, y, w, h = cv2.boundingRect((im[..., 3] > 0).astype(np.uint8))
        out.append(cv2.cvtColor(im[y:y + h, x:x + w], cv2.COLOR_BGRA2RGBA))
    if not out:
        print(f"note: {folder} not found; using synthetic blobs (PNG sizes will not be realistic)")
        rng = np.random.default_rng(0)
        for _ in range(10):
            rgb = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (300, 300), interpolation=cv2.INTER_CUBIC)
            yy, xx = np.mgrid[:300, :300]
            alpha = ((((yy - 150) / 140.0) ** 2 + ((xx - 150) / 140.0) ** 2) <= 1).astype(np.uint8) * 255
            out.append(np.dstack([rgb, alpha]))
    return out


def instance(cutouts: list[np.ndarray], rng: np.random.Generator, side: int) -> np.ndarray:
    """A real cut-out resized to ~side on its long edge, randomly flipped and tinted (distinct content ids)."""
    src = cutouts[int(rng.integers(len(cutouts)))]
    s = (side + int(rng.integers(-20, 21))) / max(src.shape[:2])
    im = cv2.resize(src, (max(1, round(src.shape[1] * s)), max(1, round(src.shape[0] * s))), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        im = im[:, ::-1]
    im = im.copy()
    im[..., int(rng.integers(3))] ^= np.uint8(rng.integers(1, 4))
    return im


def build(path: str, n: int, side: int, data: Path, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    cutouts = load_cutouts(data)
    with BankWriter(path, batch_size=256) as w:
        for i in range(start, start + n):
            w.add(instance(cutouts, rng, side), category=f"class_{i % 50}", source={"kind": "bench", "i": i})


def writer_loop(path: str, side: int, seconds: float, data: Path) -> None:
    rng = np.random.default_rng(10**6)
    cutouts = load_cutouts(data)
    deadline = time.monotonic() + seconds
    with BankWriter(path, batch_size=32) as w:
        i = 0
        while time.monotonic() < deadline:
            w.add(instance(cutouts, rng, side), category=f"class_{i % 50}", source={"kind": "bench-writer"})
            i += 1


def measure(path: str, seconds: float) -> tuple[float, float]:
    bank = InstanceBank(path)
    ids = list(bank.ids())
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ids), 200_000)
    # raw: fetch metadata + encoded bytes of random records, each in its own read transaction
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for j in picks[k % 150_000: k % 150_000 + 1000]:
            bank.get_raw(ids[j])
        k += 1000
    raw = k / (time.perf_counter() - t0)
    sampler = BankSampler(bank, "balanced")
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        k += len(sampler.sample(rng, 64))
    decoded = k / (time.perf_counter() - t0)
    return raw, decoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (holds rgba_objects/)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--side", type=int, default=150)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "bench.lmdb")
        t0 = time.perf_counter()
        build(path, args.n, args.side, args.data)
        build_s = time.perf_counter() - t0
        size = (Path(path) / "data.mdb").stat().st_size
        print(f"built {args.n} instances of ~{args.side}x{args.side} in {build_s:.1f}s "
              f"({args.n / build_s:.0f}/s incl. encode), {size / args.n / 1024:.1f} KiB per record")
        raw, dec = measure(path, args.seconds)
        print(f"alone:             {raw:10.0f} raw reads/s   {dec:8.0f} decoded instances/s")
        ctx = mp.get_context("spawn")
        wp = ctx.Process(target=writer_loop, args=(path, args.side, 2 * args.seconds + 5, args.data))
        wp.start()
        time.sleep(3.0)  # let the spawned writer start committing
        raw_w, dec_w = measure(path, args.seconds)
        wp.join()
        added = InstanceBank(path, refresh_interval=0).count() - args.n
        print(f"with writer:       {raw_w:10.0f} raw reads/s   {dec_w:8.0f} decoded instances/s "
              f"(writer added {added} meanwhile)")
        print(f"goal: >= 50000 raw reads/s -> {'met' if min(raw, raw_w) >= 50_000 else 'NOT met'}; "
              f">= 3000 decoded/s -> {'met' if min(dec, dec_w) >= 3000 else 'NOT met'}")


if __name__ == "__main__":
    main()
