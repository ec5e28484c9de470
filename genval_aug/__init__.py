"""genval_aug: Gen-n-Val instance banks and copy-paste augmentation for YOLO and torchvision.

The top-level import is light (numpy, OpenCV, lmdb): heavy frameworks are imported only by the
modules that need them (``genval_aug.transforms``, ``genval_aug.ultralytics``, ``genval_aug.generation``).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "InstanceBank": "genval_aug.bank",
    "BankWriter": "genval_aug.bank",
    "BankSampler": "genval_aug.bank",
    "Instance": "genval_aug.bank",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genval_aug' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
