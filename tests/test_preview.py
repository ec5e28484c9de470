"""`genval-aug preview` and the label drawing it uses, on real coco128-seg images and a harvested bank."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from genval_aug.cli import main
from genval_aug.viz import class_color, draw_labels, make_grid


@pytest.fixture(scope="module")
def harvested_bank(tmp_path_factory, coco128_seg):
    out = tmp_path_factory.mktemp("bank") / "coco128.lmdb"
    rc = main(["bank", "harvest", "--data", str(coco128_seg / "coco128-seg.yaml"), "--out", str(out),
               "--max-images", "40", "--no-progress"])
    assert rc == 0
    return out


def test_preview_writes_a_grid(harvested_bank, coco128_seg, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["preview", "--data", str(coco128_seg / "coco128-seg.yaml"), "--bank", str(harvested_bank),
               "--out", str(out), "--n", "3", "--seed", "1", "--tile", "200", "--with-original", "--cols", "2",
               "--paste-n", "2-3"])
    assert rc == 0 and "6 tiles" in capsys.readouterr().out
    grid = cv2.imread(str(out))
    # 3 rows x 2 columns of 200 px cells + an 18 px caption band, 4 px padding
    assert grid.shape == (3 * (200 + 18 + 4) + 4, 2 * (200 + 4) + 4, 3)
    # the augmented column differs from the original column
    left, right = grid[:, 4:204], grid[:, 208:408]
    assert not np.array_equal(left, right)


def test_preview_bad_input(harvested_bank, tmp_path, capsys):
    rc = main(["preview", "--data", str(tmp_path / "nope.yaml"), "--bank", str(harvested_bank),
               "--out", str(tmp_path / "g.png")])
    assert rc == 2 and "nope.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preview", "--data", "x", "--bank", "y", "--out", "z", "--paste-n", "3-1"])


def test_draw_labels_marks_pasted_objects():
    img = np.full((120, 160, 3), 90, np.uint8)
    boxes = np.array([[10, 10, 60, 60], [80, 40, 150, 110]], np.float32)
    masks = np.zeros((2, 120, 160), bool)
    masks[0, 10:60, 10:60] = True
    masks[1, 40:110, 80:150] = True
    out = draw_labels(img, boxes, np.array([3, 7]), masks=masks, names={3: "car", 7: "dog"},
                      pasted=np.array([False, True]))
    assert out.shape == img.shape and not np.array_equal(out, img)
    assert np.array_equal(img, np.full_like(img, 90)), "input untouched"
    white = np.all(out == 255, axis=2)
    assert white[:, 70:].any() and not white[20:50, 20:50].any(), "only the pasted object gets a white frame"
    # mask pixels are tinted towards the class colour (default mask_alpha 0.35)
    inner = out[80, 110].astype(int)
    expected = 90 * (1 - 0.35) + np.array(class_color(7)) * 0.35
    assert np.all(np.abs(inner - expected) <= 1)
    # polygons work as well as masks
    polys = [np.array([[10, 10], [60, 10], [60, 60], [10, 60]], np.float32)]
    out2 = draw_labels(img, boxes[:1], np.array([3]), polygons=polys)
    assert not np.array_equal(out2, img)
    grid = make_grid([out, out2, img], cols=2, tile_size=100, captions=["a", "b", "c"])
    assert grid.shape == (2 * (100 + 18 + 4) + 4, 2 * (100 + 4) + 4, 3)


def test_preview_with_bank_categories_the_dataset_lacks(harvested_bank, coco128_seg, tmp_path, capsys):
    """A bank category without a dataset class (here 'tiger') is never drawn, as in the training adapters;
    it made the preview fail with 'class_map has no entry for bank category'."""
    from genval_aug.bank import BankWriter, InstanceBank

    src = InstanceBank(harvested_bank)
    bank = tmp_path / "mixed.lmdb"
    with BankWriter(bank) as w:
        for i, rid in enumerate(list(src.ids("person"))[:6]):
            w.add(src.get(rid).rgba, category="tiger" if i % 2 else "person")
    out = tmp_path / "grid.png"
    rc = main(["preview", "--data", str(coco128_seg / "coco128-seg.yaml"), "--bank", str(bank),
               "--out", str(out), "--n", "4", "--seed", "0", "--tile", "128", "--paste-n", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file()


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_preview_reads_coco_json_and_voc_folders(fmt, harvested_bank, shared_data, tmp_path, capsys):
    """The formats `bank harvest` reads: every object of the chosen images is drawn (one full-image mask each,
    its box the mask's extent), and the grid is written."""
    import json

    from PIL import Image

    from genval_aug.cli.preview import _mask_samples

    root = shared_data / "labelme_voc_examples"
    if fmt == "coco":
        data = root / "data_dataset_coco" / "annotations.json"
        expected = sum(not a.get("iscrowd") for a in json.loads(data.read_text())["annotations"])
    else:
        data = root / "data_dataset_voc"
        expected = sum(len(set(np.unique(np.array(Image.open(p)))) - {0, 255})
                       for p in (data / "SegmentationObject").glob("*.png"))
    names, samples = _mask_samples(str(data), "train", 10, np.random.default_rng(0))
    assert len(samples) == 3 and names[15] == "person"
    objects = 0
    for _, img, t in samples:
        assert t.masks.shape == (len(t.classes), *img.shape[:2])
        for m, box in zip(t.masks, t.boxes, strict=True):
            ys, xs = np.nonzero(m)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        objects += len(t.classes)
    assert objects == expected > 0

    out = tmp_path / "grid.png"
    rc = main(["preview", "--data", str(data), "--bank", str(harvested_bank), "--out", str(out), "--n", "2",
               "--with-original", "--tile", "160"])
    assert rc == 0 and "4 tiles" in capsys.readouterr().out and cv2.imread(str(out)) is not None
