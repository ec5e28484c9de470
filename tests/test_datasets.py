"""The generic YOLO dataset reader and names tables."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from genval_aug.datasets import (
    ImageError,
    YoloDataset,
    label_path_for,
    load_names,
    parse_yolo_labels,
    read_rgb,
)
from genval_aug.errors import DatasetError


def test_coco128_yaml(coco128_seg):
    ds = YoloDataset(coco128_seg / "coco128-seg.yaml")
    assert ds.splits == ["train", "val"] and ds.names[0] == "person" and len(ds.names) == 80
    imgs = ds.images("train")
    assert len(imgs) == 128 and len(ds.images("all")) == 128
    assert [p.name for p in ds.orphan_label_files()] == ["000000000656.txt", "000000000659.txt"]
    s = ds.read_labels(coco128_seg / "images" / "train2017" / "000000000009.jpg")
    assert len(s.objects) == 8 and not s.issues
    poly = s.objects[0].polygon_pixels(640, 480)
    assert poly.shape[1] == 2 and poly[:, 0].max() <= 640
    assert label_path_for(imgs[0]) == coco128_seg / "labels" / "train2017" / (imgs[0].stem + ".txt")
    assert ds.label_kind() == "segment"


def test_relative_yaml_path(coco128_seg, tmp_path, monkeypatch):
    """The README's `--data ../shared/data/coco128-seg/coco128-seg.yaml`: a yaml given by a relative path."""
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(coco128_seg / "coco128-seg.yaml", tmp_path)
    ds = YoloDataset(rel)
    assert ds.root == coco128_seg.resolve() and len(ds.images()) == 128
    assert all(p.is_file() for p in ds.images()[:5])


def test_folder_without_yaml(coco128_seg, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("000000000009", "000000000025"):
        shutil.copy(coco128_seg / "images" / "train2017" / f"{stem}.jpg", root / "images")
        shutil.copy(coco128_seg / "labels" / "train2017" / f"{stem}.txt", root / "labels")
    (root / "classes.txt").write_text("\n".join(str(i) for i in range(80)))
    ds = YoloDataset(root)
    assert ds.splits == ["train"] and len(ds.images()) == 2 and len(ds.names) == 80
    assert sum(len(s.objects) for s in ds) > 5


def test_names_tables(shared_data, tmp_path):
    coco = load_names(shared_data / "coco_categories.json")
    assert coco[0] == "person" and coco[79] == "toothbrush"  # yolo_index by default
    coco_ids = load_names(shared_data / "coco_categories.json", id_key="coco_id")
    assert coco_ids[1] == "person" and coco_ids[90] == "toothbrush"
    lvis = load_names(shared_data / "lvis_v1_categories.json")
    assert len(lvis) == 1203 and lvis[1] == "aerosol_can"
    assert load_names(shared_data / "lvis_v1_categories.csv") == lvis
    voc = load_names(shared_data / "labelme_voc_examples" / "data_dataset_voc" / "class_names.txt")
    assert voc[0] == "_background_" and "potted plant" in voc.values()
    with pytest.raises(DatasetError, match="not found"):
        load_names(tmp_path / "nope.json")
    # the same tables saved with a byte-order mark (Excel's "CSV UTF-8", Notepad) read the same
    for src in (shared_data / "lvis_v1_categories.csv", shared_data / "coco_categories.json",
                shared_data / "labelme_voc_examples" / "data_dataset_voc" / "class_names.txt"):
        bom = tmp_path / ("bom" + src.suffix)
        bom.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
        assert load_names(bom) == load_names(src), src.name


def test_parse_issues_name_lines(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("0 0.1 0.1 0.5 0.1 0.3 0.6\n1 0.2 0.2 0.1\n7 0.5 0.5 0.2 0.2\n2 0.1 0.1 0.5 0.1 0.3 1.2\n")
    objs, issues = parse_yolo_labels(p, valid_classes=[0, 1, 2])
    assert [o.line for o in objs] == [1] and objs[0].polygon.shape == (3, 2)
    assert [(i.line, i.reason) for i in issues] == [(2, "odd_coordinates"), (3, "unknown_class"), (4, "out_of_range")]
    assert str(issues[0]).startswith(f"{p}:2: ")
    box, _ = parse_yolo_labels(tmp_path / "missing.txt")
    assert box == []


def test_read_rgb(coco128_seg, tmp_path):
    rgb = read_rgb(coco128_seg / "images" / "train2017" / "000000000009.jpg")
    assert rgb.dtype == np.uint8 and rgb.shape == (480, 640, 3)
    gray = coco128_seg / "images" / "train2017" / "000000000086.jpg"
    with pytest.raises(ImageError, match="grayscale") as e:
        read_rgb(gray)
    assert e.value.reason == "grayscale_image" and str(gray) in str(e.value)
    conv = read_rgb(gray, convert=True)
    assert conv.ndim == 3 and np.array_equal(conv[..., 0], conv[..., 2])
    with pytest.raises(ImageError) as e:
        read_rgb(tmp_path / "none.jpg")
    assert e.value.reason == "missing_image"


def test_parse_non_finite_class_is_an_issue_not_a_crash(tmp_path):
    # int(float("nan")) raises ValueError and int(float("inf")) OverflowError: one bad line must not kill the reader
    p = tmp_path / "x.txt"
    p.write_text("nan 0.5 0.5 0.2 0.2\ninf 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    objs, issues = parse_yolo_labels(p)
    assert [o.line for o in objs] == [3]
    assert [(i.line, i.reason) for i in issues] == [(1, "bad_class"), (2, "bad_class")]
