"""PASCAL-VOC-style instance PNGs (SegmentationObject + SegmentationClass) as a harvest source.

The object PNG holds an instance id per pixel (0 background, 255 void), the class PNG the class index
of each pixel; an instance's class is the majority class under it. Void pixels (VOC's 5-px boundary
band) are not part of any instance.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from genval_aug.datasets import IMAGE_EXTENSIONS, LabelIssue, load_names
from genval_aug.errors import DatasetError
from genval_aug.harvest.core import Annotation, SourceImage

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def is_voc_root(path: Path) -> bool:
    return (path / "SegmentationObject").is_dir() and (path / "SegmentationClass").is_dir()


def _read_index_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise DatasetError(f"{path}: expected an indexed (palette) or 8-bit PNG, got mode {im.mode}")
        return np.asarray(im)


class VocSource:
    """``root`` holds ``JPEGImages/``, ``SegmentationObject/``, ``SegmentationClass/`` and optionally
    ``class_names.txt`` (one name per line, index = class id) and ``ImageSets/Segmentation/<split>.txt``."""

    format = "voc"

    def __init__(self, root: str | os.PathLike, *, split: str | None = None, names: dict[int, str] | None = None):
        self.root = Path(root)
        if not is_voc_root(self.root):
            raise DatasetError(f"{self.root}: not a VOC-style folder (needs SegmentationObject/ and SegmentationClass/)")
        if names:
            self.names = dict(names)
        elif (self.root / "class_names.txt").is_file():
            self.names = load_names(self.root / "class_names.txt")
        else:
            self.names = dict(enumerate(VOC_CLASSES))
        self.name = self.root.name
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt" if split else None
        if listing is not None and listing.is_file():
            self._stems = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
        elif split and split != "all":
            raise DatasetError(f"{self.root}: no split list {listing}")
        else:
            self._stems = sorted(p.stem for p in (self.root / "SegmentationObject").glob("*.png"))

    def __len__(self) -> int:
        return len(self._stems)

    def file_issues(self) -> list[LabelIssue]:
        return []

    def _image_path(self, stem: str) -> Path:
        for ext in (".jpg", ".jpeg", ".png", *sorted(IMAGE_EXTENSIONS)):
            p = self.root / "JPEGImages" / f"{stem}{ext}"
            if p.is_file():
                return p
        return self.root / "JPEGImages" / f"{stem}.jpg"  # reported as missing by the driver

    def __iter__(self) -> Iterator[SourceImage]:
        for stem in self._stems:
            obj_p = self.root / "SegmentationObject" / f"{stem}.png"
            cls_p = self.root / "SegmentationClass" / f"{stem}.png"
            image = self._image_path(stem)
            rel = image.relative_to(self.root).as_posix()
            try:
                obj = _read_index_png(obj_p)
                cls = _read_index_png(cls_p)
            except (OSError, DatasetError) as e:
                yield SourceImage(image, rel, [], [LabelIssue(str(obj_p), None, "unreadable_labels", str(e), count=0)])
                continue
            if obj.shape != cls.shape:
                msg = f"object PNG {obj.shape[::-1]} and class PNG {cls.shape[::-1]} differ in size"
                yield SourceImage(image, rel, [], [LabelIssue(str(obj_p), None, "size_mismatch", msg, count=0)])
                continue
            anns, issues = [], []
            # one pass: instance id x class index histogram
            valid = (obj != 0) & (obj != 255)
            pairs = obj[valid].astype(np.int64) * 256 + cls[valid]
            hist = np.bincount(pairs, minlength=256 * 256).reshape(256, 256)
            hist[:, 0] = 0
            hist[:, 255] = 0
            for iid in np.flatnonzero(np.bincount(obj[valid].ravel(), minlength=256)):
                c = int(np.argmax(hist[iid]))
                if hist[iid, c] == 0:
                    issues.append(LabelIssue(str(obj_p), None, "no_class", f"instance {iid}: no class pixels under it"))
                    continue
                if c not in self.names:
                    issues.append(LabelIssue(str(cls_p), None, "unknown_class", f"instance {iid}: class index {c} "
                                             "is not in the class names"))
                    continue
                anns.append(Annotation(c, self.names[c], {"instance": int(iid)}, mask=obj == iid))
            h, w = obj.shape
            yield SourceImage(image, rel, anns, issues, info={"object_png": obj_p.relative_to(self.root).as_posix()},
                              expected_size=(w, h))
