"""Ultralytics YOLO-seg datasets (dataset yaml or folder; normalized polygons) as a harvest source."""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from genval_aug.datasets import LabelIssue, YoloDataset, YoloSample
from genval_aug.harvest.core import Annotation, SourceImage

log = logging.getLogger(__name__)


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (posix), or as given when it lies elsewhere."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def warn_if_nameless(ds: YoloDataset) -> None:
    if not ds.names:
        log.warning("%s: no class names (no yaml 'names', no classes.txt); class ids become category names - "
                    "pass names (CLI: --names coco_categories.json or another table)", ds.source)


class YoloSegSource:
    """Polygon lines become polygon annotations.

    Box lines (``class cx cy w h``) in a segmentation dataset are left out and counted as
    ``box_line`` unless ``box_lines="grabcut"`` (then GrabCut cuts them out, source kind
    ``harvest-grabcut``). Orphan label files (no image) are reported, as Ultralytics ignores them.
    """

    format = "yolo-seg"

    def __init__(self, data: str | os.PathLike, *, split: str = "train", names: dict[int, str] | None = None,
                 box_lines: str = "skip"):
        if box_lines not in ("skip", "grabcut"):
            raise ValueError(f"box_lines must be 'skip' or 'grabcut', got {box_lines!r}")
        self.dataset = YoloDataset(data, names=names)
        self.split = split
        self.box_lines = box_lines
        self.names = self.dataset.names
        self.name = self.dataset.name
        self._images = self.dataset.images(split)
        warn_if_nameless(self.dataset)

    def __len__(self) -> int:
        return len(self._images)

    def file_issues(self) -> list[LabelIssue]:
        out = []
        for p in self.dataset.orphan_label_files(self.split):
            n = sum(1 for line in p.read_text(errors="replace").splitlines() if line.strip())
            out.append(LabelIssue(str(p), None, "orphan_label_file",
                                  f"label file without an image ({n} objects ignored)", count=0))
        return out

    def to_source_image(self, s: YoloSample) -> SourceImage:
        anns: list[Annotation] = []
        skipped: Counter = Counter()
        for o in s.objects:
            name = self.dataset.class_name(o.cls)
            if o.polygon is not None:
                anns.append(Annotation(o.cls, name, {"line": o.line}, polygons=[o.polygon], normalized=True))
            elif self.box_lines == "grabcut":
                anns.append(Annotation(o.cls, name, {"line": o.line}, box=o.box_xyxy(1, 1), normalized=True))
            else:
                skipped["box_line"] += 1
        root = self.dataset.root
        return SourceImage(s.image, rel_path(s.image, root), anns, list(s.issues),
                           info={"labels": rel_path(s.label_file, root)}, skipped=skipped)

    def __iter__(self) -> Iterator[SourceImage]:
        for img in self._images:
            yield self.to_source_image(self.dataset.read_labels(img))
