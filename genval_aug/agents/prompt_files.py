"""Versioned system-prompt files (YAML) for the agents.

A file ``<agent>-<version>.yaml`` holds::

    agent: prompt_agent            # or validation_agent
    version: v2
    parent: v1                     # the version it was optimized from (null for a hand-written one)
    created: 2026-01-01T00:00:00Z
    optimizer_model: ...           # null for hand-written prompts
    task_model: ...
    scores: {val_before: 0.61, val_after: 0.74, ...}
    history: [...]                 # optimization steps (score, accepted or reverted)
    system: |
      the system prompt text

Shipped versions live in ``genval_aug/agents/prompts/``; optimized ones are written to a directory of your
choice (default ``$GENVAL_AUG_PROMPTS`` or ``~/.cache/genval-aug/prompts``) and searched before the shipped ones.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genval_aug.errors import ConfigError

AGENTS = ("prompt_agent", "validation_agent")
DEFAULT_VERSION = "v1"
PACKAGE_DIR = Path(__file__).resolve().parent / "prompts"
_VERSION_RE = re.compile(r"^v(\d+)$")


def user_prompt_dir() -> Path:
    root = os.environ.get("GENVAL_AUG_PROMPTS")
    return Path(root) if root else Path.home() / ".cache" / "genval-aug" / "prompts"


@dataclass
class PromptFile:
    """One versioned system prompt."""

    agent: str
    version: str
    system: str
    parent: str | None = None
    created: str | None = None
    optimizer_model: str | None = None
    task_model: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        """``<agent>-<version>``: what goes into bank records as ``prompt_version``."""
        return f"{self.agent}-{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d

    def save(self, directory: str | os.PathLike, *, exclusive: bool = False) -> Path:
        """Write ``<agent>-<version>.yaml`` in ``directory`` (complete or not at all: written to a temporary
        file first). ``exclusive=True`` raises ``FileExistsError`` instead of replacing an existing file, so two
        runs that picked the same next version never overwrite each other's prompt."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.agent}-{self.version}.yaml"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110))
            if not exclusive:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)           # atomic, and fails if the name exists
                except FileExistsError:
                    raise
                except OSError:                  # a file system without hard links: exclusive create
                    with open(path, "x", encoding="utf-8") as f:
                        f.write(tmp.read_text(encoding="utf-8"))
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptFile:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read prompt file: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a prompt file must be a YAML mapping")
        for key in ("agent", "version", "system"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ConfigError(f"{path}: field {key!r} must be a non-empty string")
        if data["agent"] not in AGENTS:
            raise ConfigError(f"{path}: field 'agent' must be one of {AGENTS}, got {data['agent']!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        extra = set(data) - known
        if extra:
            raise ConfigError(f"{path}: unknown fields {sorted(extra)}")
        if data.get("created") is not None:
            data["created"] = str(data["created"])
        return cls(**data, path=path)


def _search_dirs(prompt_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(prompt_dir)] if prompt_dir is not None else []
    return [*dirs, user_prompt_dir(), PACKAGE_DIR]


def list_versions(agent: str, prompt_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{version: path}`` over the search path (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in _search_dirs(prompt_dir):
        for p in sorted(d.glob(f"{agent}-*.yaml")) if d.is_dir() else []:
            found.setdefault(p.stem[len(agent) + 1:], p)
    return found


def _version_number(v: str) -> int:
    m = _VERSION_RE.match(v)
    return int(m.group(1)) if m else -1


def load_prompt(agent: str, version: str | os.PathLike | None = None,
                prompt_dir: str | os.PathLike | None = None) -> PromptFile:
    """Load ``agent``'s system prompt: ``version`` = None (the shipped default), ``"latest"`` (highest
    ``vN`` on the search path), a version name (``"v3"``) or a path to a YAML file."""
    if agent not in AGENTS:
        raise ConfigError(f"agent must be one of {AGENTS}, got {agent!r}")
    if version is not None and (isinstance(version, Path) or str(version).endswith((".yaml", ".yml"))):
        pf = PromptFile.load(version)
        if pf.agent != agent:
            raise ConfigError(f"{version}: prompt file is for {pf.agent!r}, not {agent!r}")
        return pf
    versions = list_versions(agent, prompt_dir)
    if version is None:
        version = DEFAULT_VERSION
    elif version == "latest":
        if not versions:
            raise ConfigError(f"no prompt files for {agent} in {[str(d) for d in _search_dirs(prompt_dir)]}")
        version = max(versions, key=_version_number)
    if version not in versions:
        raise ConfigError(f"prompt version {version!r} of {agent} not found (have {sorted(versions)}) in "
                          f"{[str(d) for d in _search_dirs(prompt_dir)]}")
    pf = PromptFile.load(versions[str(version)])
    if pf.agent != agent or pf.version != version:
        raise ConfigError(f"{pf.path}: declares {pf.agent}/{pf.version}, file name says {agent}/{version}")
    return pf


def next_version(agent: str, prompt_dir: str | os.PathLike | None = None) -> str:
    nums = [_version_number(v) for v in list_versions(agent, prompt_dir)]
    return f"v{max([0, *nums]) + 1}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
