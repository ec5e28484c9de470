"""Map bank category names to a dataset's label ids: the one matcher behind every adapter (no framework import).

:func:`build_class_map` is the core (explicit overrides, equal normalized names, optional LVIS synonym
groups, a ``classes=`` subset); it returns the mapping and the bank categories left unmapped.
:func:`class_map_from_names` wraps it for the torchvision / albumentations adapters (a bank or path in,
a non-empty ``{bank category: label id}`` out); ``genval_aug.ultralytics`` uses it through ``PasteSpec``.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from genval_aug.errors import ConfigError, GenValAugError

logger = logging.getLogger(__name__)

__all__ = [
    "normalize_name",
    "load_category_table",
    "load_synonyms",
    "build_class_map",
    "class_map_from_names",
    "format_unmapped",
]

#: an LVIS categories JSON path, a ``{name: [synonyms]}`` mapping, or groups from :func:`load_synonyms`
Synonyms = str | os.PathLike | Mapping[str, Iterable[str]] | list[set[str]]


def normalize_name(name: str) -> str:
    """Case-, space-, underscore- and hyphen-insensitive key: ``"Traffic_Light"`` -> ``"traffic light"``."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def load_category_table(path: str | os.PathLike, *, error: type[GenValAugError] = ConfigError) -> list[Any]:
    """The category entries of an LVIS/COCO categories JSON: the list itself or its ``categories`` key.

    Raises ``error`` naming the file when it cannot be read or holds no list; entries are not checked.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"category table {path}: cannot read JSON ({e})") from e
    cats = data.get("categories", data) if isinstance(data, dict) else data
    if not isinstance(cats, list):
        raise error(f"category table {path}: expected a list of categories or a 'categories' key")
    return cats


def load_synonyms(source: Synonyms) -> list[set[str]]:
    """Synonym groups (normalized names) from an LVIS categories JSON or a ``{name: [synonyms]}`` mapping.

    The JSON may be the LVIS ``categories`` list itself or a dict with a ``categories`` key; each entry needs
    ``name`` and optionally ``synonyms``. Groups already loaded (a list of sets) are returned as they are.
    """
    if isinstance(source, list):
        return source
    if isinstance(source, Mapping):
        items = list(source.items())
    else:
        items = []
        for i, c in enumerate(load_category_table(source)):
            if not isinstance(c, dict) or "name" not in c:
                raise ConfigError(f"synonyms file {source}: categories[{i}] has no 'name'")
            items.append((c["name"], c.get("synonyms") or []))
    return [{normalize_name(name), *(normalize_name(s) for s in syns)} for name, syns in items]


def _categories_of(bank: Any) -> list[str]:
    """Category names of an ``InstanceBank``, a bank path, a ``{name: count}`` mapping or an iterable of names."""
    if isinstance(bank, (str, os.PathLike)):
        from genval_aug.bank import InstanceBank

        bank = InstanceBank(bank)
    if hasattr(bank, "categories") and callable(bank.categories):
        return list(bank.categories())
    if isinstance(bank, Mapping):
        return list(bank)
    if isinstance(bank, Iterable) and not isinstance(bank, bytes):
        return [str(c) for c in bank]
    raise ConfigError(f"cannot read bank categories from {type(bank).__name__}")


def _is_id(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy integers included


#: names that hold a label id's place without being a class (torchvision's COCO list: ``__background__``, ``N/A``)
_PLACEHOLDERS = frozenset({"__background__", "n/a", ""})


def _index_names(dataset_names: Sequence[str] | Mapping[int, str], on_duplicate: str) -> tuple[dict[int, str], dict[str, int]]:
    """``({id: name}, {normalized name: id})``; a name twice keeps the lowest id or raises (``on_duplicate``).

    Placeholders (``__background__``, ``N/A``, empty) keep their id in ``names`` but are never matched."""
    items = dataset_names.items() if isinstance(dataset_names, Mapping) else enumerate(dataset_names)
    names = {int(k): str(v) for k, v in items}
    by_norm: dict[str, int] = {}
    for i, n in sorted(names.items()):
        if n.strip().lower() in _PLACEHOLDERS:
            continue
        key = normalize_name(n)
        if key in by_norm and on_duplicate == "error":
            raise ConfigError(f"dataset class name {n!r} appears twice (ids {by_norm[key]} and {i})")
        by_norm.setdefault(key, i)
    return names, by_norm


def build_class_map(
    bank_categories: Any,
    dataset_names: Sequence[str] | Mapping[int, str],
    *,
    synonyms: Synonyms | None = None,
    class_map: Mapping[str, str | int | None] | None = None,
    classes: Iterable[str | int] | None = None,
    on_duplicate: str = "first",
) -> tuple[dict[str, int], list[str]]:
    """Map bank category names to dataset class ids by name; returns ``(mapping, unmapped)``.

    ``bank_categories``: category names (or an ``InstanceBank`` / bank path); ``dataset_names``: a sequence
    (label id = position, so torchvision's 91-entry COCO list with ``"__background__"`` at 0 works as is) or a
    ``{label id: name}`` mapping (YOLO ``names``). Order of resolution per bank category: explicit
    ``class_map`` entry (a dataset name or id; ``None`` excludes the category), equal normalized names
    (case, spaces, ``_`` and ``-`` ignored), then a shared synonym group (e.g. LVIS: bank ``"girl"`` ->
    dataset ``"person"``). ``classes`` restricts the result to these dataset class names/ids or bank
    category names. A dataset name given twice keeps its lowest id (``on_duplicate="first"``) or raises
    (``"error"``).
    """
    if on_duplicate not in ("first", "error"):
        raise ConfigError(f"on_duplicate must be 'first' or 'error', not {on_duplicate!r}")
    names, by_norm = _index_names(dataset_names, on_duplicate)
    groups = load_synonyms(synonyms) if synonyms is not None else ()
    explicit = {normalize_name(k): v for k, v in (class_map or {}).items()}

    def resolve_target(cat: str, target: str | int) -> int:
        if isinstance(target, numbers.Integral) and int(target) in names:
            return int(target)
        if isinstance(target, str) and normalize_name(target) in by_norm:
            return by_norm[normalize_name(target)]
        raise ConfigError(f"class_map[{cat!r}] = {target!r} is not a dataset class (names: {sorted(names.values())})")

    mapping: dict[str, int] = {}
    unmapped: list[str] = []
    for cat in _categories_of(bank_categories):
        key = normalize_name(cat)
        if key in explicit:
            if explicit[key] is not None:
                mapping[cat] = resolve_target(cat, explicit[key])
            continue
        if key in by_norm:
            mapping[cat] = by_norm[key]
            continue
        hit = next((min(by_norm[s] for s in g if s in by_norm) for g in groups
                    if key in g and any(s in by_norm for s in g)), None)
        if hit is None:
            unmapped.append(cat)
        else:
            mapping[cat] = hit

    if classes is not None:
        keep_ids: set[int] = set()
        keep_cats: set[str] = set()
        bank_norm = {normalize_name(c) for c in mapping} | {normalize_name(c) for c in unmapped}
        for c in classes:
            if _is_id(c):
                if int(c) not in names:
                    raise ConfigError(f"classes: {c} is not a dataset class id (0..{max(names, default=-1)})")
                keep_ids.add(int(c))
            elif normalize_name(c) in by_norm:
                keep_ids.add(by_norm[normalize_name(c)])
            elif normalize_name(c) in bank_norm:
                keep_cats.add(normalize_name(c))
            else:
                raise ConfigError(f"classes: {c!r} is neither a dataset class nor a bank category")
        mapping = {k: v for k, v in mapping.items() if v in keep_ids or normalize_name(k) in keep_cats}
    return mapping, unmapped


def format_unmapped(unmapped: Iterable[str]) -> str:
    """The one wording every adapter uses to report bank categories that match no dataset class."""
    unmapped = sorted(unmapped)
    return f"{len(unmapped)} bank categories match no dataset class and are skipped: {', '.join(unmapped)}"


def class_map_from_names(
    dataset_names: Sequence[str] | Mapping[int, str],
    bank: Any,
    *,
    aliases: Mapping[str, str] | None = None,
    strict: bool = False,
    synonyms: Synonyms | None = None,
    class_map: Mapping[str, str | int | None] | None = None,
    classes: Iterable[str | int] | None = None,
) -> dict[str, int]:
    """Build ``{bank category name: dataset label id}`` by matching names (see :func:`build_class_map`).

    ``bank``: an ``InstanceBank`` or bank path (its ``categories()``), or an iterable of category names.
    ``aliases``: extra ``{bank name: dataset name}`` pairs for names that differ (``{"motorbike": "motorcycle"}``);
    ``class_map`` overrides the same way and also takes ids or ``None`` (exclude); ``synonyms``: an LVIS
    categories JSON or ``{name: [synonyms]}``; ``classes``: keep only these dataset classes / bank categories.
    A dataset name given twice raises. Bank categories without a match are left out (logged once per call);
    with ``strict=True`` they raise ``ConfigError``. An empty result always raises.
    """
    overrides = {**(aliases or {}), **(class_map or {})}
    try:
        cats = _categories_of(bank)
        out, missing = build_class_map(cats, dataset_names, synonyms=synonyms, class_map=overrides,
                                       classes=classes, on_duplicate="error")
    except ConfigError as e:
        raise ConfigError(f"class_map_from_names: {e}") from None
    if missing:
        msg = f"bank categories without a dataset class of the same name: {sorted(missing)}"
        if strict:
            raise ConfigError(f"class_map_from_names: {msg}")
        logger.info("class_map_from_names: %s", format_unmapped(missing))
    if not out:
        shown = [normalize_name(n) for n in (dataset_names.values() if isinstance(dataset_names, Mapping)
                                             else dataset_names)]
        raise ConfigError(
            f"class_map_from_names: no bank category matches a dataset class name "
            f"(bank: {sorted(cats)[:10]}..., dataset: {shown[:10]}...)")
    return out
