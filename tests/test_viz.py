"""Contact sheets and the generic tiling helpers."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genval_aug.bank import BankWriter, InstanceBank
from genval_aug.errors import ConfigError
from genval_aug.viz import CHECKER, checkerboard, contact_sheet, sheet_size, thumbnail, tile


def _disk(color, size=40, r=15):
    yy, xx = np.mgrid[0:size, 0:size]
    rgba = np.zeros((size, size, 4), np.uint8)
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r
    rgba[inside] = (*color, 255)
    return rgba


@pytest.fixture
def small_bank(tmp_path):
    path = tmp_path / "b.lmdb"
    with BankWriter(path) as w:
        for i in range(5):
            w.add(_disk((200, 20 + 10 * i, 20), r=10 + i), category="red", source={"kind": "harvest"})
        for i in range(2):
            w.add(_disk((20, 20, 200 - 10 * i), r=12 + i), category="blue", source={"kind": "import"})
    return InstanceBank(path)


def test_contact_sheet_grid_png(small_bank, tmp_path):
    out = tmp_path / "sheet.png"
    sheet = contact_sheet(small_bank, out, per_class=4, cell=48, pad=4, label_width=100, header=20)
    assert sheet.shape == (*sheet_size(2, 4, 48, 4, 100, 20), 3) == (20 + 2 * 52 + 4, 100 + 4 * 52 + 4, 3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (sheet.shape[1], sheet.shape[0]) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), sheet)
    # row 0 = "red" (most instances): 4 filled cells with checkerboard and red pixels; row 1 = "blue": 2 cells
    def cell(r, k):
        y, x = 20 + 4 + r * 52, 100 + k * 52
        return sheet[y:y + 48, x:x + 48]

    for k in range(4):
        c = cell(0, k)
        assert ((c == CHECKER[0]).all(-1)).any() and ((c == CHECKER[1]).all(-1)).any()
        assert ((c[..., 0] > 150) & (c[..., 2] < 80)).sum() > 100
    assert ((cell(1, 1)[..., 2] > 150) & (cell(1, 1)[..., 0] < 80)).sum() > 100
    assert (cell(1, 2) == 255).all() and (cell(1, 3) == 255).all()  # blue has only 2 instances


def test_contact_sheet_filters(small_bank):
    sheet = contact_sheet(small_bank, classes=["blue"], per_class=3, cell=32)
    assert sheet.shape[:2] == sheet_size(1, 3, 32)
    only_import = contact_sheet(small_bank, sources=["import"], per_class=2, cell=32, max_classes=1)
    assert only_import.shape[:2] == sheet_size(1, 2, 32)
    with pytest.raises(ConfigError, match="no instances of 'green'"):
        contact_sheet(small_bank, classes=["green"])


def test_tile_and_thumbnail():
    a = np.full((10, 20, 3), 7, np.uint8)
    b = np.full((30, 5, 3), 9, np.uint8)
    grid = tile([a, b, a], cols=2, pad=2)
    assert grid.shape == (2 * (30 + 2) + 2, 2 * (20 + 2) + 2, 3)
    assert (grid == 7).all(-1).sum() == 2 * 200 and (grid == 9).all(-1).sum() == 150
    assert checkerboard(16, 16, 8)[0, 0].tolist() == list(CHECKER[0])
    t = thumbnail(_disk((255, 0, 0)), 64)
    assert t.shape == (64, 64, 3) and t[32, 32].tolist() == [255, 0, 0]
    assert t[0, 0].tolist() in (list(CHECKER[0]), list(CHECKER[1]))
