"""`make demo` end to end: the real-data path and the packaged-data fallback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *args: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "genval_aug.demo", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_on_coco128(tmp_path, coco128_seg):
    out = run_demo(tmp_path, "--images", "16", "--epochs", "1", "--imgsz", "128",
                   env_extra={"GENVAL_AUG_SHARED_DATA": str(coco128_seg.parent)})
    assert "coco128-seg (real COCO images and polygons)" in out
    assert "-> 372 instances kept" in out
    for name in ("contact_sheet.png", "augmented_grid.png"):
        img = cv2.imread(str(tmp_path / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert list((tmp_path / "yolo").glob("train_batch*.jpg")), "YOLO wrote no train_batch pictures"
    assert (tmp_path / "yolo" / "weights" / "last.pt").is_file()
    assert "0 paste errors" in out and "finite: True" in out


def test_demo_without_shared_data_uses_packaged_data(tmp_path):
    out = run_demo(tmp_path, "--skip-train", env_extra={"GENVAL_AUG_SHARED_DATA": str(tmp_path / "absent")})
    assert "using data shipped inside installed packages" in out
    assert "48 quality-filtered RGBA instances in 4 classes" in out
    assert cv2.imread(str(tmp_path / "augmented_grid.png")) is not None
