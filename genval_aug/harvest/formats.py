"""Pick the reader for a dataset path: ``open_source(path, format="auto")``."""
from __future__ import annotations

import os
from pathlib import Path

from genval_aug.errors import ConfigError, DatasetError

FORMATS = ("auto", "yolo-seg", "yolo-det", "coco", "voc")


def detect_format(data: str | os.PathLike) -> str:
    """``coco`` for a .json, ``voc`` for a folder with SegmentationObject/, else YOLO: ``yolo-seg`` when
    the first label files hold polygons, ``yolo-det`` when they only hold boxes."""
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"{p}: dataset not found")
    if p.suffix.lower() == ".json":
        return "coco"
    from genval_aug.harvest.voc import is_voc_root

    if p.is_dir() and is_voc_root(p):
        return "voc"
    from genval_aug.datasets import YoloDataset

    ds = YoloDataset(p)
    split = "train" if "train" in ds.splits else ds.splits[0]
    return "yolo-seg" if ds.label_kind(split) == "segment" else "yolo-det"


def open_source(data: str | os.PathLike, *, format: str = "auto", split: str | None = None,
                names: dict[int, str] | None = None, images_dir: str | os.PathLike | None = None,
                box_lines: str = "skip"):
    """A harvest source for ``data`` (see :mod:`genval_aug.harvest.core` for the protocol)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(data) if format == "auto" else format
    if fmt == "coco":
        from genval_aug.harvest.coco import CocoSource

        return CocoSource(data, images_dir=images_dir, names=names)
    if fmt == "voc":
        from genval_aug.harvest.voc import VocSource

        return VocSource(data, split=split, names=names)
    if fmt == "yolo-det":
        from genval_aug.harvest.boxes import YoloBoxSource

        return YoloBoxSource(data, split=split or "train", names=names)
    from genval_aug.harvest.yolo_seg import YoloSegSource

    return YoloSegSource(data, split=split or "train", names=names, box_lines=box_lines)
