"""Helpers shared by bank tests: deterministic synthetic RGBA instances and writer processes."""
from __future__ import annotations

import numpy as np


def make_rgba(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A random-coloured ellipse on a transparent canvas; distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 2.4)) ** 2 + ((xx - w / 2) / (w / 2.4)) ** 2 <= 1
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (h, w, 3))
    rgba[..., 3] = np.where(inside, 255, 0)
    return rgba


def writer_process(path: str, categories: list[str], n: int, start: int, batch_size: int, delay: float = 0.0) -> None:
    """Add ``n`` instances (seeds start..start+n) cycling over categories; used as a subprocess target."""
    import time

    from genval_aug.bank import BankWriter

    with BankWriter(path, batch_size=batch_size) as w:
        for i in range(start, start + n):
            w.add(make_rgba(i), category=categories[i % len(categories)], source={"kind": "test", "seed": i})
            if delay:
                time.sleep(delay)


def noise_writer_process(path: str, n: int, side: int, seed: int) -> None:
    """Add ``n`` incompressible ``side``x``side`` instances (grows the map); used as a subprocess target."""
    import numpy as np

    from genval_aug.bank import BankWriter

    with BankWriter(path, batch_size=2, map_size=1 << 20) as w:
        for i in range(seed, seed + n):
            a = np.random.default_rng(i).integers(0, 256, (side, side, 4), dtype=np.uint8)
            a[..., 3] = 255
            w.add(a, category="noise")
