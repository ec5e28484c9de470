"""Category names and definitions (LVIS / COCO tables) for the agents' requests."""
from __future__ import annotations

import logging
import os
import re

from genval_aug.class_map import load_category_table
from genval_aug.errors import DatasetError

logger = logging.getLogger(__name__)


def normalize_name(name: str) -> str:
    """``"Orange_(fruit)"`` -> ``"orange (fruit)"``; lower case, single spaces.

    A display form for prompts, so unlike ``genval_aug.class_map.normalize_name`` (a matching key) it keeps
    hyphens (``"t-shirt"``) and spaces parenthesised qualifiers.
    """
    s = str(name).replace("_", " ").strip().lower()
    s = re.sub(r"\s*\(\s*", " (", s)
    s = re.sub(r"\s*\)", ")", s)
    return re.sub(r"\s+", " ", s)


def display_name(name: str) -> str:
    return normalize_name(name)


def head_name(name: str) -> str:
    """The name without a parenthesised qualifier: ``"orange (fruit)"`` -> ``"orange"``."""
    return re.sub(r"\s*\(.*?\)", "", normalize_name(name)).strip()


class CategoryDefinitions:
    """name -> definition, with LVIS synonyms; look-ups ignore case, ``_`` vs space and qualifiers."""

    def __init__(self, definitions: dict[str, str] | None = None, synonyms: dict[str, list[str]] | None = None):
        self._defs: dict[str, str] = {}
        self._syn: dict[str, list[str]] = {}
        for k, v in (definitions or {}).items():
            self._defs[normalize_name(k)] = v
        for k, v in (synonyms or {}).items():
            self._syn[normalize_name(k)] = [normalize_name(s) for s in v]

    @classmethod
    def from_lvis(cls, path: str | os.PathLike) -> CategoryDefinitions:
        """Read an LVIS v1 category table (JSON list or ``{"categories": [...]}`` with name/synonyms/def)."""
        cats = load_category_table(path, error=DatasetError)
        defs: dict[str, str] = {}
        syns: dict[str, list[str]] = {}
        bad = 0
        for c in cats:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                bad += 1
                continue
            d = c.get("def") or c.get("definition")
            names = [c["name"], *[s for s in c.get("synonyms", []) if isinstance(s, str)]]
            for n in names:
                key = normalize_name(n)
                if isinstance(d, str) and d and key not in defs:
                    defs[key] = d
                syns.setdefault(key, [normalize_name(x) for x in names])
        if bad:
            logger.warning("%s: skipped %d malformed category entries", path, bad)
        return cls(defs, syns)

    @classmethod
    def from_env(cls) -> CategoryDefinitions:
        """From ``$GENVAL_AUG_LVIS_CATEGORIES`` when set, else empty."""
        p = os.environ.get("GENVAL_AUG_LVIS_CATEGORIES")
        return cls.from_lvis(p) if p else cls()

    def get(self, name: str) -> str | None:
        key = normalize_name(name)
        if key in self._defs:
            return self._defs[key]
        for k in (head_name(key), key.replace(" ", "_")):
            if k in self._defs:
                return self._defs[k]
        return None

    def synonyms(self, name: str) -> list[str]:
        key = normalize_name(name)
        return self._syn.get(key, [key])

    def __len__(self) -> int:
        return len(self._defs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None
