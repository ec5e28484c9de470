"""Fixtures shared by the paste tests: real coco128-seg samples and instance sources (memory + LMDB bank)."""
from __future__ import annotations

from pathlib import Path

import pytest
from label_checks import MemorySource, coco128_samples, load_rgba_objects


@pytest.fixture(scope="session")
def coco_samples(coco128_seg: Path):
    """40 real coco128-seg images with at least one object (native resolution)."""
    return coco128_samples(coco128_seg, limit=40)


@pytest.fixture(scope="session")
def rgba_instances(rgba_objects: Path, shared_data: Path):
    return load_rgba_objects(rgba_objects, shared_data / "coco_categories.json")


@pytest.fixture(scope="session")
def memory_source(rgba_instances):
    return MemorySource(rgba_instances)


@pytest.fixture(scope="session")
def real_bank(tmp_path_factory, rgba_objects: Path, shared_data: Path):
    """A real LMDB bank built from shared/data/rgba_objects (full-size cut-outs, COCO class ids)."""
    from genval_aug.bank import BankWriter, InstanceBank

    insts = load_rgba_objects(rgba_objects, shared_data / "coco_categories.json", max_side=None)
    path = tmp_path_factory.mktemp("bank") / "objects.lmdb"
    with BankWriter(str(path)) as w:
        for inst in insts:
            w.add(inst.rgba, category=inst.category, category_id=inst.category_id,
                  source={"kind": "test", "file": inst.id})
        w.set_size_prior("car", {"rel_sqrt_area_mean": 0.2, "rel_sqrt_area_std": 0.001,
                                 "aspect_mean": 2.0, "aspect_std": 0.1, "n": 3})
    return InstanceBank(str(path))
