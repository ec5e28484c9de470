"""``genval-aug yolo train key=value ...``: Ultralytics training with bank instances pasted into the batches.

Every ``key=value`` goes to Ultralytics unchanged (values parsed the way the ``yolo`` CLI parses them),
except the genval keys: ``bank=`` (required) and ``paste_<option>=`` (``PasteConfig`` fields, plus
``paste_classes``, ``paste_class_map``, ``paste_synonyms``, ``paste_seed``, ``paste_cache_mb``).
"""
from __future__ import annotations

import argparse
from typing import Any

from genval_aug.errors import ConfigError

HELP = """Train an Ultralytics YOLO model (detect or segment) with bank instances pasted into its batches.

  genval-aug yolo train model=yolo11n-seg.yaml data=coco128-seg.yaml bank=cache/x.lmdb epochs=3 paste_n=3

Every key=value goes to Ultralytics unchanged, parsed as the `yolo` CLI parses it, except:
  bank=PATH               the LMDB instance bank (required)
  paste_<field>=VALUE     a PasteConfig field, e.g. paste_n=3 paste_harmonize=none paste_blend=alpha
  paste_classes=a,b       paste only these dataset classes / bank categories
  paste_class_map={...}   bank category -> dataset class name/id (None excludes it)
  paste_synonyms=PATH     LVIS categories JSON for synonym matching
  paste_seed=N, paste_cache_mb=MB
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "yolo",
        help="train an Ultralytics YOLO model with bank instances pasted in",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=["train"], help="Ultralytics mode (only 'train' pastes)")
    p.set_defaults(func=run, accepts_extra=True)


def parse_overrides(extra: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``key=value`` tokens into (Ultralytics overrides, genval spec dict)."""
    from dataclasses import fields

    from ultralytics.cfg import smart_value

    from genval_aug.paste import PasteConfig

    str_fields = {f.name for f in fields(PasteConfig) if isinstance(f.default, str)}  # e.g. harmonize=none
    overrides: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    for tok in extra:
        if "=" not in tok or tok.startswith("="):
            raise ConfigError(f"expected key=value, got {tok!r} (e.g. bank=cache/x.lmdb epochs=3)")
        key, value = tok.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        parsed = smart_value(value) if value != "" else None
        if key == "bank":
            spec["bank"] = value
        elif key.startswith("paste_"):
            name = key[len("paste_"):]
            if name == "classes" and isinstance(parsed, str):
                parsed = [c.strip() for c in parsed.split(",") if c.strip()]
            elif name == "classes" and isinstance(parsed, int):  # one class id, like Ultralytics' classes=0
                parsed = [parsed]
            elif name == "synonyms" or name in str_fields:
                parsed = value
            spec[name] = parsed
        else:
            overrides[key] = parsed
    if "bank" not in spec:
        raise ConfigError("bank=PATH is required (an LMDB instance bank, e.g. bank=cache/x.lmdb)")
    if "model" not in overrides:
        raise ConfigError("model=... is required (e.g. model=yolo11n-seg.yaml or model=yolo11n.pt)")
    return overrides, spec


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ultralytics import YOLO

    from genval_aug.ultralytics import PasteSpec, trainer_for

    overrides, spec = parse_overrides(extra)
    PasteSpec.from_dict(spec)  # validate before loading the model
    model = YOLO(overrides.pop("model"), task=overrides.pop("task", None))
    model.train(trainer=trainer_for(model.task), genval=spec, **overrides)
    return 0
