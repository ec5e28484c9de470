"""Building instance banks: config, pluggable sources, the overlapped pipeline and the top-up worker."""
from __future__ import annotations

from genval_aug.build.config import BuildConfig, ClassSpec, ComponentSpec, load_config, parse_config
from genval_aug.build.pipeline import BankBuilder, BuildReport, build_bank
from genval_aug.build.registry import (
    Candidate,
    InstanceSource,
    WorkUnit,
    register_prompt_maker,
    register_source,
    register_validator,
)
from genval_aug.build.worker import WorkerHandle, run_worker, start_worker

__all__ = [
    "BankBuilder",
    "BuildConfig",
    "BuildReport",
    "Candidate",
    "ClassSpec",
    "ComponentSpec",
    "InstanceSource",
    "WorkUnit",
    "build_bank",
    "load_config",
    "parse_config",
    "register_prompt_maker",
    "register_source",
    "register_validator",
    "run_worker",
    "start_worker",
    "WorkerHandle",
]
