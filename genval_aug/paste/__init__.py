"""Framework-free paste engine (numpy + OpenCV only): augment, place, harmonize, blend, update labels.

One concept per module: :mod:`~genval_aug.paste.augment` (scale from the bank's size prior, aspect, flip,
rotation, colour jitter), :mod:`~genval_aug.paste.placement` (uniform, bounded IoA, truncation),
:mod:`~genval_aug.paste.harmonize` (none / local Reinhard / linear OT), :mod:`~genval_aug.paste.blend`
(hard / alpha / feather / Poisson), :mod:`~genval_aug.paste.labels` (occlusion bookkeeping and the label
conventions every adapter shares) and :mod:`~genval_aug.paste.engine` (``PasteConfig``, ``PasteEngine``).

Label conventions: boxes xyxy float pixels, a mask's box is its pixel extent (x_max + 1), pasted label mask =
alpha >= 128, output = kept originals in input order then pasted objects in paste order (see ``labels``).
"""
from __future__ import annotations

from genval_aug.paste.engine import PasteConfig, PasteEngine, PasteResult, Targets, paste_instances
from genval_aug.paste.labels import OcclusionRules

__all__ = ["OcclusionRules", "PasteConfig", "PasteEngine", "PasteResult", "Targets", "paste_instances"]
