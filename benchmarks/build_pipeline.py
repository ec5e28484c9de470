"""Bank-build pipeline: overlapped stages vs a sequential loop over the same components, same run.

The generator and the validator are emulated by components that *wait* (``ShapesSource(delay=...)`` and a
sleeping validator), which is how a GPU generator and an HTTP VLM judge look to the pipeline: the time is
spent outside the Python interpreter. Writing to the bank (encode + LMDB commit) is real.

Goal (issue 9): overlapped throughput close to the ideal ``(g + v + w) / max(g, v, w)`` times the sequential
baseline, and pipeline overhead (no waiting at all) far above any real generator's rate.
Usage: python benchmarks/build_pipeline.py [--units 240] [--gen 0.02] [--val 0.015]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

from genval_aug.bank import BankWriter  # noqa: E402
from genval_aug.build import BankBuilder, parse_config  # noqa: E402
from genval_aug.build.pipeline import unit_seed  # noqa: E402
from genval_aug.build.registry import WorkUnit  # noqa: E402
from genval_aug.build.sources import ShapesSource  # noqa: E402
from genval_aug.quality import QualityRules, check_instance  # noqa: E402


class SleepyValidator:
    name = "sleepy"

    def __init__(self, per_instance: float):
        self.per_instance = per_instance

    def validate(self, rgbas, categories):  # noqa: ARG002
        time.sleep(self.per_instance * len(rgbas))
        return [{"keep": True, "score": 1.0, "criteria": {}, "reasons": {}, "model": self.name}] * len(rgbas)


def config(bank: str, units: int, batch: int) -> dict:
    return {
        "name": "bench", "output": {"bank": bank},
        "classes": {"names": [f"c{i}" for i in range(4)], "target": units // 4},
        "source": {"kind": "shapes", "batch_size": batch, "params": {"size": 128}},
        "validator": {"kind": "none", "batch_size": batch},
        "prefilter": {}, "pipeline": {"progress": False, "queue_size": 2},
    }


def sequential(bank: str, cfg, source, validator, batch: int) -> float:
    """Baseline: one thread, generate -> pre-filter -> validate -> write, batch after batch."""
    rules = QualityRules()
    t0 = time.perf_counter()
    with BankWriter(bank, batch_size=1 << 30) as w:
        for c in cfg.classes:
            for start in range(0, c.target, batch):
                units = [WorkUnit(c.name, i, unit_seed(cfg.seed, c.name, i)) for i in range(start, min(c.target, start + batch))]
                cands = source.produce(units)
                ok = [x for x in cands if not check_instance(x.rgba, rules)]
                verdicts = validator.validate([x.rgba for x in ok], [x.unit.category for x in ok])
                for x, v in zip(ok, verdicts, strict=True):
                    w.add(x.rgba, category=c.name, source={**x.source, "unit": x.unit.index}, verdict=v)
                w.flush()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen", type=float, default=0.02, help="emulated generator seconds per instance")
    ap.add_argument("--val", type=float, default=0.015, help="emulated validator seconds per instance")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="genval-bench-build-"))

    # 1. pipeline overhead: nothing waits (shapes rendering + pre-filter + encode + commit only)
    cfg = parse_config(config(str(tmp / "fast.lmdb"), args.units, args.batch))
    r = BankBuilder(cfg).run()
    overhead_rate = r.total_added / r.wall_s
    print(f"pipeline, no waiting:        {r.total_added} instances in {r.wall_s:.2f}s = {overhead_rate:8.1f} inst/s")
    for k, s in r.stages.items():
        if s.items:
            print(f"    stage {k:<9} busy {s.busy_s:6.2f}s  {s.rate:8.1f} items/s")

    # 2. emulated generator + validator: sequential baseline vs overlapped pipeline, same components
    source, validator = ShapesSource(size=128, delay=args.gen), SleepyValidator(args.val)
    t_seq = sequential(str(tmp / "seq.lmdb"), cfg, source, validator, args.batch)
    cfg2 = parse_config(config(str(tmp / "ovl.lmdb"), args.units, args.batch))
    b = BankBuilder(cfg2, components={"source": source, "validator": validator})
    r2 = b.run()
    n = r2.total_added
    write_s = r2.stages["write"].busy_s / max(1, r2.stages["write"].items)
    ideal = (args.gen + args.val + write_s) / max(args.gen, args.val, write_s)
    print(f"sequential baseline:         {n} instances in {t_seq:.2f}s = {n / t_seq:8.1f} inst/s")
    print(f"overlapped pipeline:         {n} instances in {r2.wall_s:.2f}s = {n / r2.wall_s:8.1f} inst/s")
    print(f"speed-up: {t_seq / r2.wall_s:.2f}x (ideal {ideal:.2f}x with gen {args.gen * 1e3:.0f} ms, "
          f"val {args.val * 1e3:.0f} ms, write {write_s * 1e3:.1f} ms per instance)")


if __name__ == "__main__":
    main()
