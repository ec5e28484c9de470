"""``make demo``: the main job on the embedded default data, offline, on CPU.

Builds an instance bank from ../shared/data (real RGBA cut-outs) and prints its statistics.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from genval_aug.bank import BankWriter, InstanceBank, verify
from genval_aug.bank.maintenance import read_rgba_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "cache" / "demo"


def bank_from_cutouts(out: Path) -> InstanceBank:
    folder = SHARED / "rgba_objects"
    with BankWriter(out) as w:
        for row in csv.DictReader(open(folder / "objects.csv")):
            name = row["coco_class"] or row["class_name"]
            w.add(read_rgba_file(folder / row["file"]), category=name,
                  source={"kind": "import", "file": row["file"], "origin": row["source_repo"]})
    return InstanceBank(out)


def main() -> int:
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    if not (SHARED / "rgba_objects").is_dir():
        print(f"demo: {SHARED} not found; nothing to build", file=sys.stderr)
        return 1
    bank = bank_from_cutouts(OUT / "cutouts.lmdb")
    print(f"bank {bank.path}: {bank.count()} instances")
    for name, n in sorted(bank.categories().items()):
        print(f"  {name:12s} {n}")
    print(verify(bank))
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
