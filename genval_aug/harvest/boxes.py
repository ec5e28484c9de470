"""Box-only YOLO detection datasets: masks from OpenCV GrabCut seeded by each box.

Instances carry source kind ``harvest-grabcut`` so they can be filtered apart from real masks
(``BankSampler(sources=...)``). GrabCut masks are guesses: expect more rejections and check them
with ``genval-aug bank show``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from genval_aug.datasets import YoloDataset, YoloSample
from genval_aug.harvest.core import Annotation, SourceImage
from genval_aug.harvest.yolo_seg import YoloSegSource, rel_path, warn_if_nameless


class YoloBoxSource(YoloSegSource):
    """Every label line is used as a box (a polygon line contributes its bounding box)."""

    format = "yolo-det"

    def __init__(self, data: str | os.PathLike, *, split: str = "train", names: dict[int, str] | None = None):
        self.dataset = YoloDataset(data, names=names)
        self.split = split
        self.box_lines = "grabcut"
        self.names = self.dataset.names
        self.name = self.dataset.name
        self._images = self.dataset.images(split)
        warn_if_nameless(self.dataset)

    def to_source_image(self, s: YoloSample) -> SourceImage:
        anns = [Annotation(o.cls, self.dataset.class_name(o.cls), {"line": o.line}, box=o.box_xyxy(1, 1),
                           normalized=True) for o in s.objects]
        root = self.dataset.root
        return SourceImage(s.image, rel_path(s.image, root), anns, list(s.issues),
                           info={"labels": rel_path(s.label_file, root)})

    def __iter__(self) -> Iterator[SourceImage]:
        for img in self._images:
            yield self.to_source_image(self.dataset.read_labels(img))
