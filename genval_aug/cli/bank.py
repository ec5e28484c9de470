"""``genval-aug bank ...``: harvest, inspect and maintain instance banks.

Other command modules add subcommands to the ``bank`` group without editing this file: a module
``genval_aug.cli.bank_<name>`` (or one listed in :data:`BANK_COMMAND_MODULES`) that defines
``add_bank_commands(bank_subparsers)`` is imported and called by :func:`register`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections import Counter
from pathlib import Path

from genval_aug.cli import import_command_module
from genval_aug.errors import BankError, ConfigError

#: extra modules (``genval_aug.cli.<name>``) that add ``bank`` subcommands; ``bank_*`` modules are found too
BANK_COMMAND_MODULES: list[str] = []


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------- registration
def register(subparsers) -> argparse.ArgumentParser:
    bank = subparsers.add_parser("bank", help="harvest, inspect and maintain instance banks",
                                 description="Harvest, inspect and maintain LMDB instance banks.")
    sub = bank.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    bank.set_defaults(func=lambda args: (bank.print_help(), 1)[1])
    add_bank_commands(sub)
    for name in _extension_modules():
        hook = getattr(import_command_module(name), "add_bank_commands", None)
        if hook is not None:
            hook(sub)
    return bank


def _extension_modules() -> list[str]:
    names = list(BANK_COMMAND_MODULES)
    pkg = importlib.import_module("genval_aug.cli")
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("bank_") and info.name not in names:
            names.append(info.name)
    return names


def add_bank_commands(sub) -> None:
    """Add this module's subcommands (harvest, stats, show, verify, merge, export, import) to ``sub``."""
    _add_harvest(sub)
    _add_stats(sub)
    _add_show(sub)
    p = sub.add_parser("verify", help="check every record decodes and the indexes agree",
                       description="Check every record decodes, the category index is consistent and counts match.")
    p.add_argument("bank", help="bank directory")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (faster)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("merge", help="merge banks (e.g. shards) into one, deduplicated",
                       description="Copy the records of INPUT banks into OUT (created if missing), deduplicated "
                                   "by content id; size priors are pooled, rejection counts summed.")
    p.add_argument("--out", required=True, help="output bank directory")
    p.add_argument("inputs", nargs="+", help="input bank directories")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("export", help="write a bank as a folder of RGBA PNGs + manifest.json",
                       description="Write every instance as <category>/<id>.png plus manifest.json.")
    p.add_argument("bank", help="bank directory")
    p.add_argument("out_dir", help="output folder")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="add a folder of RGBA PNGs (export layout or per-class folders)",
                       description="Add RGBA PNG/WebP cut-outs to a bank: a folder written by 'bank export' "
                                   "(manifest.json), per-class sub-folders, or a flat folder with --category.")
    p.add_argument("folder", help="folder to import")
    p.add_argument("--out", required=True, help="bank directory (created if missing)")
    p.add_argument("--category", help="category of every file in a flat folder")
    p.add_argument("--source-kind", default="import", help="provenance kind stored with each instance (default: import)")
    p.set_defaults(func=cmd_import)


# ----------------------------------------------------------------------------------------- harvest
def _add_harvest(sub) -> None:
    from genval_aug.harvest.core import DEFAULT_RULES, HarvestConfig
    from genval_aug.harvest.formats import FORMATS

    d, r = HarvestConfig(), DEFAULT_RULES
    p = sub.add_parser(
        "harvest", help="cut instances out of a labeled dataset into a bank",
        description="Cut every annotated object of a dataset out as an RGBA crop (alpha = mask) and add the "
                    "ones passing cheap quality pre-filters to a bank. Formats: Ultralytics YOLO-seg (dataset "
                    "yaml or folder), COCO json (polygons/RLE; iscrowd skipped), VOC instance PNGs, and box-only "
                    "YOLO detection (GrabCut masks, source kind harvest-grabcut). Bad input is reported with "
                    "file and line, counted and skipped.",
        formatter_class=_DefaultsFormatter)
    p.add_argument("--data", required=True, help="dataset yaml, dataset folder, COCO json or VOC folder")
    p.add_argument("--out", required=True, help="bank directory (created if missing)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="dataset format")
    p.add_argument("--split", default=None, help="YOLO split (train/val/test/all; default train) or VOC ImageSets list")
    p.add_argument("--names", default=None,
                   help="class names table (.yaml/.txt/.csv/.json, e.g. coco_categories.json, lvis_v1_categories.json)")
    p.add_argument("--images-dir", default=None, help="COCO: folder that file_name is relative to")
    p.add_argument("--classes", default=None, help="comma-separated class names or ids to harvest (default: all)")
    g = p.add_argument_group("quality pre-filters (0 or a negative value disables a threshold)")
    g.add_argument("--min-area", type=int, default=r.min_area, help="minimum mask area in pixels")
    g.add_argument("--min-side", type=int, default=r.min_side, help="minimum mask bounding-box side in pixels")
    g.add_argument("--coverage", type=float, nargs=2, default=list(r.coverage), metavar=("LO", "HI"),
                   help="allowed alpha coverage of the crop (X-Paste's rule)")
    g.add_argument("--min-largest-fraction", type=float, default=r.min_largest_fraction,
                   help="reject masks whose largest connected component holds less than this fraction")
    g.add_argument("--max-aspect", type=float, default=r.max_aspect, help="maximum bbox aspect ratio (long/short)")
    g.add_argument("--keep-truncated", action="store_true", help="keep objects touching the image border")
    g.add_argument("--border-px", type=int, default=d.border_px, help="distance to the image edge that counts as touching")
    g.add_argument("--keep-largest", action="store_true", help="keep only the largest component of each mask")
    o = p.add_argument_group("crops and input")
    o.add_argument("--margin", type=float, default=d.margin, help="crop margin, fraction of the object's longer side")
    o.add_argument("--soft-edges", action="store_true", help="anti-aliased polygon alpha (pixel coverage)")
    o.add_argument("--convert-images", action="store_true",
                   help="convert grayscale/16-bit/CMYK images to 8-bit RGB instead of skipping them")
    o.add_argument("--boxes", choices=("skip", "grabcut"), default="skip",
                   help="box-only lines inside a YOLO-seg dataset: skip them or cut them out with GrabCut")
    o.add_argument("--store-rejected", action="store_true", help="keep rejected crops in the bank's audit table")
    o.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    o.add_argument("--workers", type=int, default=0,
                   help="decode and cut out in N processes (the bank is written by this one); 0 = in process")
    o.add_argument("--report", default=None, help="also write the full harvest report as JSON here")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_harvest)


def _opt(v):
    return None if v is None or v <= 0 else v


def cmd_harvest(args) -> int:
    from genval_aug.bank import BankWriter
    from genval_aug.datasets import load_names
    from genval_aug.harvest.core import HarvestConfig, Harvester
    from genval_aug.harvest.formats import open_source
    from genval_aug.quality import QualityRules

    lo, hi = args.coverage
    if not 0 <= lo <= hi <= 1:
        raise ConfigError(f"--coverage must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")
    rules = QualityRules(min_area=_opt(args.min_area), min_side=_opt(args.min_side),
                         coverage=None if (lo, hi) == (0, 1) else (lo, hi),
                         min_largest_fraction=_opt(args.min_largest_fraction), max_aspect=_opt(args.max_aspect),
                         reject_border=False)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    cfg = HarvestConfig(rules=rules, reject_truncated=not args.keep_truncated, border_px=args.border_px,
                        margin=args.margin, keep_largest=args.keep_largest, soft_edges=args.soft_edges,
                        classes=classes, convert_images=args.convert_images, store_rejected=args.store_rejected,
                        max_images=args.max_images, workers=args.workers)
    names = load_names(args.names) if args.names else None
    source = open_source(args.data, format=args.format, split=args.split, names=names,
                         images_dir=args.images_dir, box_lines=args.boxes)
    progress = False if args.no_progress else _tqdm_progress(source)
    with BankWriter(args.out) as w:
        report = Harvester(cfg).run(source, w, progress=progress)
    print(report.summary())
    print(f"bank {args.out}: {_bank_total(args.out)} instances")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def _tqdm_progress(source):
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, total=len(source), unit="img", desc=f"harvest {source.name}", disable=None,
                           file=sys.stderr)


def _bank_total(path) -> int:
    from genval_aug.bank import InstanceBank

    return InstanceBank(path).count()


# ----------------------------------------------------------------------------------------- stats
def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="instances per class and source, rejection reasons, verdicts",
                       description="Print a table of instances per class and source kind with size priors, "
                                   "the rejection reasons recorded in the bank, verdict counts and harvest reports.")
    p.add_argument("bank", help="bank directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--top", type=int, default=None, help="show only the N largest classes")
    p.set_defaults(func=cmd_stats)


def bank_summary(bank) -> dict:
    """Everything ``bank stats`` prints, as a dict."""
    stats = bank.stats(refresh=True)
    verdicts: Counter = Counter()
    scores: list[float] = []
    bad: list[str] = []  # records whose metadata does not parse: counted here, `bank verify` names them
    for meta in bank.scan_meta(bad=bad):
        if not isinstance(meta, dict):
            bad.append("metadata is not an object")
            continue
        v = meta.get("verdict")
        if not isinstance(v, dict):
            verdicts["none"] += 1
        else:
            verdicts["keep" if v.get("keep", True) else "reject"] += 1
        if isinstance(meta.get("score"), (int, float)):  # a corrupt record's score is left out, not fatal
            scores.append(float(meta["score"]))
    classes = {}
    for name, c in sorted(stats["categories"].items(), key=lambda kv: (-kv[1]["count"], kv[0])):
        classes[name] = {"id": c["id"], "count": c["count"], "sources": dict(c.get("sources", {})),
                         "size_prior": bank.size_prior(name)}
    return {
        "path": bank.path, "total": stats["total"], "classes": classes, "sources": dict(stats.get("sources", {})),
        "rejections": dict(stats.get("rejections", {})), "rejected_audit": stats.get("rejected", 0),
        "verdicts": dict(verdicts), "mean_score": (sum(scores) / len(scores)) if scores else None,
        "corrupt_records": len(bad),
        "harvests": bank.statuses("harvest/"),
        "builds": {**bank.statuses("build:"), **bank.statuses("worker")},   # bank build / top-up worker
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def cmd_stats(args) -> int:
    from genval_aug.bank import InstanceBank

    bank = InstanceBank(args.bank)
    s = bank_summary(bank)
    if args.json:
        print(json.dumps(s, indent=1, sort_keys=True))
        return 0
    kinds = sorted(s["sources"])
    rows = []
    for name, c in list(s["classes"].items())[: args.top]:
        p = c["size_prior"] or {}
        size = f"{p['rel_sqrt_area_mean']:.3f}±{p['rel_sqrt_area_std']:.3f}" if "rel_sqrt_area_mean" in p else "-"
        asp = f"{p['aspect_mean']:.2f}±{p['aspect_std']:.2f}" if "aspect_mean" in p else "-"
        rows.append([name, c["id"], c["count"], *[c["sources"].get(k, 0) for k in kinds], size, asp])
    print(f"{s['path']}: {s['total']} instances in {len(s['classes'])} classes")
    if s["corrupt_records"]:
        print(f"WARNING: {s['corrupt_records']} record(s) with unreadable metadata left out of the verdict counts; "
              f"`genval-aug bank verify {s['path']}` names them")
    if rows:
        print(_table(rows, ["class", "id", "count", *kinds, "rel size", "aspect w/h"]))
    if args.top is not None and len(s["classes"]) > args.top:
        print(f"... {len(s['classes']) - args.top} more classes")
    print("sources: " + (", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items())) or "none"))
    rej = Counter(s["rejections"])
    print("rejections: " + (", ".join(f"{k} {v}" for k, v in rej.most_common()) or "none recorded")
          + (f" ({s['rejected_audit']} kept for audit)" if s["rejected_audit"] else ""))
    v = s["verdicts"]
    line = f"verdicts: keep {v.get('keep', 0)}, reject {v.get('reject', 0)}, none {v.get('none', 0)}"
    if s["mean_score"] is not None:
        line += f", mean score {s['mean_score']:.3f}"
    print(line)
    for name, h in s["harvests"].items():
        print(f"{name}: {h.get('annotations', 0)} annotations in {h.get('images', 0)} images -> "
              f"{h.get('kept', 0)} kept, {h.get('duplicates', 0)} already in the bank, "
              f"{sum(h.get('rejected', {}).values())} rejected, "
              f"{sum(h.get('bad_input', {}).values())} bad input, {sum(h.get('skipped', {}).values())} skipped")
    for name, b in s["builds"].items():
        deficit = ", ".join(f"{k} {v}" for k, v in list((b.get("deficit") or {}).items())[:5])
        print(f"{name}: {b.get('worker_state', b.get('state', '?'))} (pid {b.get('pid')}, {b.get('updated')}): "
              f"+{b.get('total_added', b.get('added', 0))} added, {b.get('total_rejected', b.get('rejected', 0))} "
              f"rejected; {b.get('classes_below_target', 0)} classes below target, {b.get('missing', 0)} missing"
              + (f" ({deficit}{' ...' if b.get('classes_below_target', 0) > 5 else ''})" if deficit else ""))
    return 0


# ----------------------------------------------------------------------------------------- show
def _add_show(sub) -> None:
    p = sub.add_parser("show", help="write a contact sheet PNG (a row of instances per class)",
                       description="Write a contact sheet: one row per class with its name and count, then "
                                   "instances over a checkerboard (transparency visible).",
                       formatter_class=_DefaultsFormatter)
    p.add_argument("bank", help="bank directory")
    p.add_argument("--out", default="contact_sheet.png", help="PNG to write")
    p.add_argument("--per-class", type=int, default=8, help="instances per class")
    p.add_argument("--classes", default=None, help="comma-separated classes (default: all, most frequent first)")
    p.add_argument("--max-classes", type=int, default=None, help="show at most N classes")
    p.add_argument("--cell", type=int, default=96, help="thumbnail size in pixels")
    p.add_argument("--source", action="append", default=None, help="only instances of this source kind (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="which instances are drawn")
    p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
    from genval_aug.bank import InstanceBank
    from genval_aug.viz import contact_sheet

    if args.per_class < 1 or args.cell < 8:
        raise ConfigError("--per-class must be >= 1 and --cell >= 8")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    bank = InstanceBank(args.bank)
    bank.count()  # a clear error for a missing bank before any drawing
    try:
        sheet = contact_sheet(bank, args.out, per_class=args.per_class, classes=classes,
                              max_classes=args.max_classes, cell=args.cell, seed=args.seed, sources=args.source)
    except OSError as e:  # --out under a file, unwritable folder, ...
        raise ConfigError(f"--out {args.out}: {e.strerror or e}") from None
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")
    return 0


# ----------------------------------------------------------------------------------------- maintenance
def cmd_verify(args) -> int:
    from genval_aug.bank import verify

    if not (Path(args.bank) / "data.mdb").is_file():
        raise BankError(f"no instance bank at {args.bank}")
    report = verify(args.bank, decode=not args.no_decode)
    print(report)
    return 0 if report.ok else 1


def cmd_merge(args) -> int:
    from genval_aug.bank import merge

    for p in args.inputs:
        if not (Path(p) / "data.mdb").is_file():
            raise BankError(f"no instance bank at {p}")
    res = merge(args.out, args.inputs)
    print(f"merged {len(args.inputs)} bank(s) into {args.out}: {res['added']} added, {res['duplicates']} duplicates"
          + (f", {res['skipped']} corrupt input record(s) skipped (not copied):" if res["skipped"] else ""))
    for e in res["errors"][:20]:
        print(f"  {e}")
    if len(res["errors"]) > 20:
        print(f"  ... and {len(res['errors']) - 20} more (`genval-aug bank verify INPUT` lists them)")
    return 0


def cmd_export(args) -> int:
    from genval_aug.bank import InstanceBank, export_folder

    bank = InstanceBank(args.bank)
    n = bank.count()
    out = export_folder(bank, args.out_dir)
    print(f"exported {n} instances to {out}")
    return 0


def cmd_import(args) -> int:
    from genval_aug.bank import import_folder

    res = import_folder(args.out, args.folder, source_kind=args.source_kind, category=args.category)
    print(f"imported {res['added']} instances into {args.out}; {res['skipped']} file(s) skipped")
    for e in res["errors"][:10]:
        print(f"  {e}")
    return 0
