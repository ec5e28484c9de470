"""Helpers shared by the adapter tests (torchvision, albumentations): a real bank of real cut-outs, a recorder
around the core, output checks that only look at what the adapter returned, and a picklable Dataset.

Test modules bind the fixtures below to their own names: ``bank_path, names = adapter_helpers.bank_path, ...``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from label_checks import extent_box, load_rgba_objects

from genval_aug.bank import BankWriter


def coco_names(shared_data: Path) -> list[str]:
    import json

    cats = json.loads((shared_data / "coco_categories.json").read_text())["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["yolo_index"])]


def build_rgba_bank(path: Path, shared_data: Path) -> Path:
    """A real LMDB bank of the rembg cut-outs that have a COCO class (person, car, elephant, potted plant)."""
    insts = load_rgba_objects(shared_data / "rgba_objects", shared_data / "coco_categories.json", max_side=300)
    with BankWriter(path) as w:
        for inst in insts:
            w.add(inst.rgba, category=inst.category, category_id=inst.category_id,
                  source={"kind": "test", "file": inst.id})
    return path


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, shared_data):
    """The adapter tests' bank (see :func:`build_rgba_bank`), built once per test module."""
    return build_rgba_bank(tmp_path_factory.mktemp("bank") / "rgba.lmdb", shared_data)


@pytest.fixture(scope="module")
def names(shared_data):
    """COCO's 80 class names in YOLO order."""
    return coco_names(shared_data)


class Recorder:
    """Wraps an adapter's LazyPasteEngine and keeps (core input targets, core result) of every call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple] = []

    def __call__(self, image, targets, rng, channel_order="rgb"):
        res = self.inner(image, targets, rng, channel_order=channel_order)
        self.calls.append((image, targets, res))
        return res

    def __getattr__(self, name):
        return getattr(self.inner, name)


def check_output_objects(boxes_xyxy: np.ndarray, classes: np.ndarray, masks: np.ndarray | None,
                         image_hw: tuple[int, int], num_classes: int, in_masks: np.ndarray | None = None,
                         n_kept: int | None = None, kept: np.ndarray | None = None) -> None:
    """What a consumer can check from an adapter's output alone.

    Every box equals its mask's pixel extent (x_min, y_min, x_max + 1, y_max + 1), boxes are inside the image
    and non-empty, classes are valid, no mask is empty, pasted masks never overlap kept originals, and a kept
    original's mask is a subset of its input mask.
    """
    H, W = image_hw
    n = len(boxes_xyxy)
    assert boxes_xyxy.shape == (n, 4) and len(classes) == n
    assert np.all(boxes_xyxy[:, :2] >= -1e-4) and np.all(boxes_xyxy[:, 2] <= W + 1e-4)
    assert np.all(boxes_xyxy[:, 3] <= H + 1e-4)
    assert np.all(boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) and np.all(boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
    assert np.all((classes >= 0) & (classes < num_classes)), f"invalid classes {classes}"
    if masks is None:
        return
    assert masks.shape == (n, H, W)
    for k in range(n):
        assert masks[k].any(), f"object {k}: empty mask"
        np.testing.assert_allclose(boxes_xyxy[k], extent_box(masks[k]), atol=1e-3,
                                   err_msg=f"object {k}: box is not its mask's extent")
    if n_kept is not None:
        pasted_union = masks[n_kept:].any(0) if n > n_kept else np.zeros((H, W), bool)
        for k in range(n_kept):
            assert not (masks[k] & pasted_union).any(), f"kept object {k} overlaps a pasted object"
            if in_masks is not None and kept is not None:
                assert not (masks[k] & ~in_masks[kept[k]]).any(), f"kept object {k} grew outside its input mask"


class TVSampleDataset:
    """torch Dataset of (tv_tensors.Image, target) pairs built from in-memory samples, through a transform."""

    def __init__(self, samples, transform, length: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.length = length or len(samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        import torch
        from torchvision import tv_tensors

        s = self.samples[i % len(self.samples)]
        H, W = s.image.shape[:2]
        img = tv_tensors.Image(torch.from_numpy(s.image).permute(2, 0, 1).contiguous())
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(s.boxes), format="XYXY", canvas_size=(H, W)),
            "masks": tv_tensors.Mask(torch.from_numpy(s.masks).to(torch.uint8)),
            "labels": torch.from_numpy(s.classes),
        }
        return self.transform(img, target)


def collate_list(batch):
    return tuple(zip(*batch, strict=True))


class AlbuSampleDataset:
    """torch Dataset running an albumentations Compose on in-memory samples (pascal_voc boxes, stacked masks)."""

    def __init__(self, samples, compose, length: int | None = None) -> None:
        self.samples = samples
        self.compose = compose
        self.length = length or len(samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        s = self.samples[i % len(self.samples)]
        out = self.compose(image=s.image, bboxes=s.boxes, class_labels=s.classes, masks=s.masks.astype(np.uint8))
        return (out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
                np.asarray(out["class_labels"]), np.asarray(out["masks"]))
