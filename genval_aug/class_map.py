"""Map bank category names to a dataset's label ids (pure Python, no framework import)."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from genval_aug.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["normalize_name", "class_map_from_names"]


def normalize_name(name: str) -> str:
    """Case-, space-, underscore- and hyphen-insensitive key: ``"Traffic_Light"`` -> ``"traffic light"``."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _categories_of(bank: Any) -> list[str]:
    if isinstance(bank, (str, os.PathLike)):
        from genval_aug.bank import InstanceBank

        bank = InstanceBank(bank)
    if hasattr(bank, "categories") and callable(bank.categories):
        return list(bank.categories())
    if isinstance(bank, Mapping):
        return list(bank)
    if isinstance(bank, Iterable) and not isinstance(bank, (str, bytes)):
        return [str(c) for c in bank]
    raise ConfigError(f"class_map_from_names: cannot read bank categories from {type(bank).__name__}")


def class_map_from_names(
    dataset_names: Sequence[str] | Mapping[int, str],
    bank: Any,
    *,
    aliases: Mapping[str, str] | None = None,
    strict: bool = False,
) -> dict[str, int]:
    """Build ``{bank category name: dataset label id}`` by matching names.

    ``dataset_names``: the dataset's class names, either a sequence (label id = position, so torchvision's
    91-entry COCO list with ``"__background__"`` at 0 works as is) or a ``{label id: name}`` mapping (YOLO
    ``names``). ``bank``: an ``InstanceBank`` or bank path (its ``categories()``), or an iterable of category names.
    ``aliases``: extra ``{bank name: dataset name}`` pairs for names that differ (``{"motorbike": "motorcycle"}``).
    Matching ignores case, spaces, underscores and hyphens. Bank categories without a match are left out
    (logged); with ``strict=True`` they raise ``ConfigError``. An empty result always raises.
    """
    items = dataset_names.items() if isinstance(dataset_names, Mapping) else enumerate(dataset_names)
    by_name: dict[str, int] = {}
    for idx, name in items:
        key = normalize_name(name)
        if key in by_name and by_name[key] != int(idx):
            raise ConfigError(f"class_map_from_names: dataset class name {name!r} appears twice "
                              f"(ids {by_name[key]} and {idx})")
        by_name[key] = int(idx)
    alias = {normalize_name(k): normalize_name(v) for k, v in (aliases or {}).items()}
    out: dict[str, int] = {}
    missing: list[str] = []
    for cat in _categories_of(bank):
        key = normalize_name(cat)
        key = alias.get(key, key)
        if key in by_name:
            out[cat] = by_name[key]
        else:
            missing.append(cat)
    if missing:
        msg = f"bank categories without a dataset class of the same name: {sorted(missing)}"
        if strict:
            raise ConfigError(f"class_map_from_names: {msg}")
        logger.info("class_map_from_names: %s (they will not be pasted)", msg)
    if not out:
        raise ConfigError(
            f"class_map_from_names: no bank category matches a dataset class name "
            f"(bank: {sorted(_categories_of(bank))[:10]}..., dataset: {list(by_name)[:10]}...)")
    return out
