"""The ``genval-aug`` command line.

Each command group lives in its own module under ``genval_aug.cli`` and exposes
``register(subparsers)``; the module list below is the only place that names them.
Handlers return an exit code; a ``GenValAugError`` becomes a one-line reason and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from genval_aug import __version__
from genval_aug.errors import GenValAugError

COMMAND_MODULES = ["bank", "preview", "yolo", "agents", "worker"]


def import_command_module(name: str):
    """``genval_aug.cli.<name>``, or None when that module is absent (a command group not installed yet)."""
    try:
        return importlib.import_module(f"genval_aug.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"genval_aug.cli.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genval-aug",
        description="Gen-n-Val instance banks and copy-paste augmentation for YOLO, torchvision and albumentations.")
    parser.add_argument("--version", action="version", version=f"genval-aug {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = import_command_module(name)
        if mod is not None:
            mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args, extra) if getattr(args, "accepts_extra", False) else args.func(args) or 0)
    except GenValAugError as e:
        print(f"genval-aug: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genval-aug: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
