"""Run the ML stack without network access (tests, CI, air-gapped machines, ``make demo``).

Call :func:`use_offline_environment` before importing ultralytics, transformers, diffusers, textgrad or
albumentations. Variables already set by the user are kept; the facts behind each one are in
``shared/docs/install-and-offline.md`` (e.g. a missing hub id otherwise fails only after ~140 s of retries).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",  # hub ids fail at once instead of after ~140 s of retries
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",  # ultralytics' DNS check, pip update check and analytics
    "YOLO_AUTOINSTALL": "0",  # no pip installs at run time
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations' version check at import
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm (via textgrad) fetches its cost map at import otherwise
}
_WRITABLE_DIRS = {  # variables that name folders tools write into; default to a temp dir, not $HOME or the CWD
    "YOLO_CONFIG_DIR": "yolo",
    "TEXTGRAD_LOG_DIR": "textgrad-logs",
    "MPLCONFIGDIR": "mpl",
}


def install_yolo_font(config_dir: str | os.PathLike) -> None:
    """Ultralytics HEAD-requests Arial.ttf even with ``plots=False``; give it matplotlib's DejaVuSans."""
    font_dir = Path(config_dir) / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:  # ultralytics depends on matplotlib; without it there is nothing to plot anyway
        return
    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (font_dir / name).exists():
            shutil.copy(src, font_dir / name)


def use_offline_environment(scratch: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Set the offline variables (``force`` overrides user values) and return the scratch folder used."""
    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="genval-aug-offline-"))
    values = dict(OFFLINE_VARIABLES)
    values.update({k: str(scratch / sub) for k, sub in _WRITABLE_DIRS.items()})
    for key, value in values.items():
        if force:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    install_yolo_font(os.environ["YOLO_CONFIG_DIR"])
    return scratch
