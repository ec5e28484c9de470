"""``genval-aug worker``: top a bank up in the foreground until Ctrl-C / SIGTERM (issue 9)."""
from __future__ import annotations

import argparse
import json
import signal

from genval_aug.cli.bank_build import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="background top-up worker: fill classes below target while training reads the bank",
        description="Runs until SIGTERM/SIGINT (clean stop after the current batch; a second signal interrupts at once). Status goes to the bank "
                    "(`genval-aug bank stats`). From Python use genval_aug.build.start_worker (spawned process).")
    add_config_arguments(p, device_default="the models' own; e.g. cuda:1 keeps them off the training GPU")
    p.add_argument("--draws-dir", default=None, help="where readers report draw counts (default <bank>.draws/)")
    p.add_argument("--poll", type=float, default=None, help="seconds between checks when all targets are met")
    p.add_argument("--once", action="store_true", help="exit when every target is met instead of waiting")
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    from genval_aug.build.worker import _Stop, run_worker

    stop = _Stop()
    old = {s: signal.signal(s, stop.handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = run_worker(args.config, args.bank, stop=stop, device=args.device, draws_dir=args.draws_dir,
                            exit_when_done=args.once, poll_interval=args.poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    keys = ("state", "total_added", "total_rejected", "classes_below_target", "missing")
    print(json.dumps({k: status.get(k) for k in keys}))
    return 0
