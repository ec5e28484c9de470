"""Harvest real instances from labeled datasets into an instance bank.

>>> from genval_aug.harvest import harvest, HarvestConfig
>>> report = harvest("coco128-seg/coco128-seg.yaml", "cache/coco128.lmdb")   # doctest: +SKIP
>>> print(report.summary())                                                    # doctest: +SKIP

Readers: :mod:`~genval_aug.harvest.yolo_seg` (Ultralytics polygons), :mod:`~genval_aug.harvest.coco`
(polygons/RLE), :mod:`~genval_aug.harvest.voc` (instance PNGs), :mod:`~genval_aug.harvest.boxes`
(box-only, GrabCut masks). The driver and its report live in :mod:`~genval_aug.harvest.core`.
"""
from genval_aug.harvest.core import (
    DEFAULT_RULES,
    Annotation,
    HarvestConfig,
    Harvester,
    HarvestReport,
    SourceImage,
    harvest,
)
from genval_aug.harvest.formats import FORMATS, detect_format, open_source

__all__ = [
    "DEFAULT_RULES",
    "FORMATS",
    "Annotation",
    "HarvestConfig",
    "HarvestReport",
    "Harvester",
    "SourceImage",
    "detect_format",
    "harvest",
    "open_source",
]
