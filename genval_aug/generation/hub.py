"""Locate weight files: local paths, local directories or Hugging Face hub repos; safetensors only.

A missing file raises :class:`WeightsNotFoundError` naming the repo/directory and the file at once (with
``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` the hub is not contacted, so there is no retry delay).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import GenValAugError
from .models.transparent_vae import WeightsError

logger = logging.getLogger(__name__)


class WeightsNotFoundError(GenValAugError, FileNotFoundError):
    """A weight file could not be found locally or on the hub."""


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        import os

        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_weight_file(
    repo_or_dir: str | Path | None,
    filename: str | Path,
    *,
    local_files_only: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Path of ``filename``: itself if it is an existing file, else inside ``repo_or_dir`` (a directory or a hub
    repo id, downloaded or taken from the cache)."""
    fname = str(filename)
    if not fname.endswith(".safetensors"):
        raise WeightsError(f"{fname}: only .safetensors weight files are accepted (no pickle formats)")
    p = Path(fname).expanduser()
    if p.is_file():
        return p
    if repo_or_dir is None:
        raise WeightsNotFoundError(f"{fname}: weight file not found (no repo or directory given)")
    d = Path(str(repo_or_dir)).expanduser()
    if d.is_dir():
        q = d / fname
        if not q.is_file():
            raise WeightsNotFoundError(f"{q}: weight file not found in local directory {d}")
        return q
    if d.exists() or str(repo_or_dir).startswith((".", "/", "~")) or str(repo_or_dir).count("/") != 1:
        raise WeightsNotFoundError(
            f"{repo_or_dir}: is neither a local directory nor a hub repo id (owner/name); cannot find {fname}"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                str(repo_or_dir),
                fname,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=local_files_only,
            )
        )
    except Exception as e:  # LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, HTTP errors
        why = (
            "not in the local cache (offline: HF_HUB_OFFLINE=1)"
            if _offline()
            else "not in the local cache (local_files_only=True)"
            if local_files_only
            else f"download failed: {type(e).__name__}: {e}"
        )
        raise WeightsNotFoundError(
            f"{fname} from hub repo {repo_or_dir}: {why}. Download it ahead of time "
            f"(huggingface-cli download {repo_or_dir} {fname}) or pass a local directory/file."
        ) from e
