"""Test configuration: everything offline, nothing written outside temp dirs.

The environment variables are set before any test module imports ultralytics,
transformers, diffusers, textgrad or albumentations (see shared/docs/install-and-offline.md).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="genval-aug-tests-"))
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_CONFIG_DIR": str(_TMP / "yolo"),
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "TEXTGRAD_LOG_DIR": str(_TMP / "textgrad-logs"),
    "MPLCONFIGDIR": str(_TMP / "mpl"),
    "XDG_CACHE_HOME": str(_TMP / "xdg-cache"),
    "HF_HOME": str(_TMP / "hf-home"),
    "GENVAL_AUG_CACHE": str(_TMP / "genval-cache"),
}
os.environ.update(_OFFLINE_ENV)
for _k in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
    os.environ.pop(_k, None)


def _install_yolo_font() -> None:
    """Ultralytics HEAD-requests Arial.ttf even with plots=False; give it a local font."""
    font_dir = Path(_OFFLINE_ENV["YOLO_CONFIG_DIR"]) / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # matplotlib is an ultralytics dependency; tolerate its absence
        return
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (font_dir / name).exists():
            shutil.copy(src, font_dir / name)


_install_yolo_font()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", SHARED_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only). Tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set GENVAL_AUG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco128_seg(shared_data: Path) -> Path:
    p = shared_data / "coco128-seg"
    if not (p / "coco128-seg.yaml").is_file():
        pytest.skip(f"coco128-seg not found under {shared_data}")
    return p


@pytest.fixture(scope="session")
def rgba_objects(shared_data: Path) -> Path:
    p = shared_data / "rgba_objects"
    if not p.is_dir():
        pytest.skip(f"rgba_objects not found under {shared_data}")
    return p


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    shutil.rmtree(_TMP, ignore_errors=True)
