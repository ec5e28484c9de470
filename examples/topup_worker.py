"""Top a bank up in a spawned worker while a DataLoader reads it through the paste transform.

A training-style ``DataLoader(num_workers=2)`` pastes bank instances into its samples with ``GenValPaste``
(reporting what it draws through ``TrackingSampler``) while ``start_worker`` runs the bank's only writer in a
spawned process: it fills every class to its target and then tops up the classes drawn most. Every 20 steps
the loop prints the bank's counts as the readers see them and the worker's status.

    python examples/topup_worker.py [--bank cache/topup_demo.lmdb] [--seconds 8]

Runs offline on CPU with the deterministic ``shapes`` source (the test suite's smoke test runs it as is, for
a few seconds); swap the ``source``/``validator`` blocks for ``layerdiffusion`` / ``agent`` (see
build_lvis_rare.yaml) to top up with generated, validated instances on a GPU, or run the worker on its own:
``genval-aug worker --bank cache/x.lmdb --config build.yaml``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from genval_aug.bank import BankSampler, InstanceBank
from genval_aug.build import BankBuilder, parse_config
from genval_aug.build.draws import TrackingSampler
from genval_aug.build.worker import start_worker

CONFIG = {
    "name": "topup-demo",
    "output": {"bank": "cache/topup_demo.lmdb"},
    "classes": {"names": ["disk", "box", "star"], "target": 60},
    "source": {"kind": "shapes", "batch_size": 8, "params": {"size": 96, "bad_fraction": 0.2, "delay": 0.02}},
    "validator": "none",
    "prefilter": {"reject_border": True},
    "pipeline": {"progress": False},
    "worker": {"poll_interval": 1.0, "most_drawn_top_k": 1, "topup_step": 10, "max_extra_per_class": 40},
}


class Images(torch.utils.data.Dataset):
    def __init__(self, bank: str):
        sampler = TrackingSampler(BankSampler(InstanceBank(bank, refresh_interval=1.0)))  # reports draws
        try:
            from genval_aug.transforms import GenValPaste

            self.paste = GenValPaste(sampler, n=(1, 3), p=1.0)
        except ImportError:  # torchvision adapter not installed: draw directly
            self.paste, self.sampler = None, sampler

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        if self.paste is None:
            return len(self.sampler.sample(np.random.default_rng(i), 2))
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.zeros(3, 128, 128, dtype=torch.uint8))
        tgt = {"boxes": tv_tensors.BoundingBoxes([[8, 8, 40, 40]], format="XYXY", canvas_size=(128, 128)),
               "labels": torch.tensor([0])}
        return len(self.paste(img, tgt)[1]["labels"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", default=CONFIG["output"]["bank"])
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="how long the loader runs beside the worker once the worker has committed its first batch")
    args = ap.parse_args(argv)
    cfg = parse_config({**CONFIG, "output": {"bank": args.bank}})
    # seed the bank with a few instances per class (a real run would start from a harvested bank)
    seed_cfg = parse_config({**CONFIG, "output": {"bank": args.bank}, "classes": {"names": ["disk", "box", "star"], "target": 5}})
    BankBuilder(seed_cfg).run()
    loader = torch.utils.data.DataLoader(Images(args.bank), batch_size=8, num_workers=2)
    t_start, t0 = time.monotonic(), None
    with start_worker(args.bank, cfg) as worker:        # spawned; holds the only writer
        for step, _ in enumerate(loader):
            if step % 20 == 0:
                st = worker.status()                    # None until the worker's first commit
                if st is not None and t0 is None:
                    t0 = time.monotonic()               # --seconds counts from there (spawning takes a while)
                st = st or {}
                print(f"step {step:4d}  bank {InstanceBank(args.bank, refresh_interval=None).categories()}  "
                      f"worker: +{st.get('total_added', st.get('added', 0))} added, missing {st.get('missing')}")
            now = time.monotonic()
            if (t0 is not None and now - t0 > args.seconds) or now - t_start > args.seconds + 120:
                break
    print("final:", InstanceBank(args.bank, refresh_interval=None).categories(), "| status:",
          {k: (worker.status() or {}).get(k) for k in ("state", "total_added", "extra")})


if __name__ == "__main__":
    main()
