"""``genval-aug bank build``: build or finish a bank from a YAML config (issue 9; torchrun-aware, issue 12).

Wiring: ``genval_aug.cli.bank`` calls :func:`add_bank_commands` with its sub-parsers.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_config_arguments(p: argparse.ArgumentParser, *, device_default: str) -> None:
    """``--config`` / ``--bank`` / ``--device``: what every command driven by a build YAML takes."""
    p.add_argument("--config", required=True, help="build YAML: classes and targets, source, validator "
                   "(see examples/build_lvis_rare.yaml)")
    p.add_argument("--bank", default=None, help="bank to fill (default: output.bank of the config)")
    p.add_argument("--device", default=None, help=f"device for the models (default: {device_default})")


def add_bank_commands(bank_sub: argparse._SubParsersAction) -> None:
    p = bank_sub.add_parser(
        "build", help="build a bank from a YAML config (resumable; a finished config does nothing)",
        description="Prompt agent -> generator -> pre-filters -> validator -> bank, stages overlapped. "
                    "Under torchrun/accelerate each rank builds its share into a shard bank.")
    add_config_arguments(p, device_default="cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the per-class deficits and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group("scale-out (torchrun / accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK)")
    g.add_argument("--rank", type=int, default=None, help="build only this rank's share, without a rendezvous "
                   "(re-run a crashed rank alone); needs --world-size")
    g.add_argument("--world-size", type=int, default=None, help="number of ranks the build is split into")
    g.add_argument("--no-merge", action="store_true", help="leave the shard banks unmerged")
    g.add_argument("--merge-shards", action="store_true",
                   help="only merge <bank>.shards/rank-*-of-WWW.lmdb into the output bank (dedup by id) and "
                        "exit; with shards of several world sizes on disk it refuses unless --world-size is given")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from genval_aug.build import BankBuilder, load_config
    from genval_aug.build.distributed import DistInfo, build_distributed, merge_shards, shard_path
    from genval_aug.errors import ConfigError

    cfg = load_config(args.config)
    if args.no_progress:
        cfg.pipeline.progress = False
    bank = args.bank or cfg.output.bank
    if args.dry_run:
        deficits = BankBuilder(cfg, bank=bank).deficits()
        missing = {k: v for k, v in deficits.items() if v > 0}
        print(f"{len(missing)} of {len(deficits)} classes below target, {sum(missing.values())} instances missing")
        for k, v in sorted(missing.items(), key=lambda kv: -kv[1])[:20]:
            print(f"  {k}: {v}")
        return 0
    if args.merge_shards:
        out = merge_shards(cfg, bank, args.world_size)
        print(f"merged shards into {bank}: {out['added']} added, {out['duplicates']} duplicates")
        return 0
    if (args.rank is None) != (args.world_size is None):
        raise ConfigError("--rank and --world-size go together")
    if args.rank is not None:
        dist = DistInfo(rank=args.rank, world_size=args.world_size, local_rank=0, coordinated=False)
        if not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} is outside --world-size {args.world_size}")
    else:
        dist = DistInfo.from_env()
    report = build_distributed(cfg, bank=bank, device=args.device, merge=not args.no_merge, dist=dist)
    if dist.rank == 0 or not dist.coordinated:
        if dist.distributed and not dist.coordinated:
            print(f"rank {dist.rank}/{dist.world_size}: share built into {shard_path(bank, dist.rank, dist.world_size)}; "
                  f"when every rank is done: genval-aug bank build --config {args.config} --merge-shards")
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if not report.stopped else 130


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m genval_aug.cli.bank_build`
    parser = argparse.ArgumentParser(prog="genval-aug bank")
    add_bank_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
