"""Framework-free paste engine (numpy + OpenCV only): augment, place, harmonize, blend, update labels."""
from __future__ import annotations

from genval_aug.paste.engine import PasteConfig, PasteEngine, PasteResult, Targets, paste_instances
from genval_aug.paste.labels import OcclusionRules

__all__ = ["OcclusionRules", "PasteConfig", "PasteEngine", "PasteResult", "Targets", "paste_instances"]
