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

from genval_aug.offline import use_offline_environment  # noqa: E402 - light, imports nothing heavy

_TMP = Path(tempfile.mkdtemp(prefix="genval-aug-tests-"))
use_offline_environment(_TMP, force=True)
os.environ.update({
    "LITELLM_OFFLINE_MODE": "true",
    "XDG_CACHE_HOME": str(_TMP / "xdg-cache"),
    "HF_HOME": str(_TMP / "hf-home"),
    "GENVAL_AUG_CACHE": str(_TMP / "genval-cache"),
})
for _k in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
    os.environ.pop(_k, None)

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
