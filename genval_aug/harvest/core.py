"""The harvest driver: annotations of a labeled dataset -> RGBA instances in a bank.

Format readers (``yolo_seg``, ``coco``, ``voc``, ``boxes``) turn a dataset into :class:`SourceImage` s,
each holding :class:`Annotation` s with one geometry (polygons, a mask, or a box for GrabCut) and the
:class:`~genval_aug.datasets.LabelIssue` s found while reading. :class:`Harvester` turns every
annotation into an RGBA crop (alpha = mask, a small margin), applies the cheap quality pre-filters of
:mod:`genval_aug.quality`, writes the survivors with provenance and counts everything else by reason:

``annotations == kept + duplicates + sum(rejected) + sum(bad_input) + sum(skipped)``
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from genval_aug.bank.priors import pool_priors
from genval_aug.bank.record import build_meta, content_id, encode_rgba
from genval_aug.datasets import ImageError, LabelIssue, read_rgb
from genval_aug.errors import ConfigError
from genval_aug.harvest import masks as M
from genval_aug.quality import QualityRules, alpha_stats, check_instance, largest_component

log = logging.getLogger(__name__)

#: harvest defaults: stricter than the bare QualityRules (real crops below 32x32 px paste badly)
DEFAULT_RULES = QualityRules(min_area=32 * 32, min_side=16, coverage=(0.05, 0.95), min_largest_fraction=0.8,
                             max_aspect=8.0, reject_border=False)
MAX_ISSUES_KEPT = 1000


@dataclass
class Annotation:
    """One object of an image. Exactly one geometry is set: ``polygons`` (pixel (K, 2) arrays, union of
    parts), ``mask`` (uint8/bool array placed at ``mask_offset``), or ``box`` (x1, y1, x2, y2; GrabCut)."""

    category_id: int
    category: str
    ref: dict[str, Any]  # provenance of the annotation inside its file: {"line": 3} / {"annotation": 17}
    polygons: list[np.ndarray] | None = None
    mask: np.ndarray | None = None
    mask_offset: tuple[int, int] = (0, 0)
    box: np.ndarray | None = None
    normalized: bool = False  # polygons / box are in [0, 1] image units (YOLO): scaled once the image is read


@dataclass
class SourceImage:
    """An image with its annotations and the issues its labels had (each line issue = one lost object)."""

    path: Path
    rel: str  # path relative to the dataset root, stored as provenance
    annotations: list[Annotation]
    issues: list[LabelIssue] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"labels": "labels/x.txt"}
    image: np.ndarray | None = None  # pre-decoded RGB (readers that already decoded it)
    skipped: Counter = field(default_factory=Counter)  # objects left out by an option (e.g. box lines)
    expected_size: tuple[int, int] | None = None  # (W, H) the annotations were made for, when known


class HarvestSource(Protocol):
    """What a format reader provides to the driver."""

    name: str  # dataset name stored in provenance
    format: str  # "yolo-seg", "yolo-det", "coco", "voc"
    names: dict[int, str]

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[SourceImage]: ...
    def file_issues(self) -> list[LabelIssue]: ...


@dataclass
class HarvestConfig:
    """Harvest options. ``rules`` are the quality pre-filters (``None`` in a field disables that rule)."""

    rules: QualityRules = DEFAULT_RULES
    reject_truncated: bool = True  # objects touching the image border are cut off: reject ("truncated")
    border_px: int = 1  # "touching" = the mask comes within this many pixels of the image edge
    margin: float = 0.05  # crop margin as a fraction of the object's longer side ...
    min_margin_px: int = 2  # ... and at least this many pixels
    keep_largest: bool = False  # keep only the largest connected component of each mask
    soft_edges: bool = False  # polygon alpha = pixel coverage (4x4 supersampled) instead of 0/255
    classes: Sequence[str | int] | None = None  # only these class names or ids
    convert_images: bool = False  # convert grayscale/16-bit/CMYK images instead of skipping them
    grabcut_iterations: int = 4
    grabcut_max_side: int = 160
    grabcut_context: float = 0.3
    grabcut_seed: float = 0.5  # sure-foreground ellipse at the box centre, fraction of the box size
    store_rejected: bool = False  # keep rejected crops in the bank's audit table
    max_images: int | None = None
    workers: int = 0  # > 1: decode and cut out in this many spawned processes (the bank is written here)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = asdict(self.rules)
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d


@dataclass
class HarvestReport:
    """Counts of one harvest. Every annotation ends in exactly one of kept, duplicates, rejected
    (first failing rule), bad_input (reason of the line/image) or skipped (class filter, crowd, ...)."""

    dataset: str = ""
    format: str = ""
    images: int = 0
    annotations: int = 0
    kept: int = 0
    duplicates: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejected_any: Counter = field(default_factory=Counter)  # every failing rule, an instance may count twice
    bad_input: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    file_issues: Counter = field(default_factory=Counter)  # files without objects lost (orphan labels, ...)
    per_class: dict[str, Counter] = field(default_factory=dict)  # class -> {"passed": n, "rejected": n, ...}
    issues: list[LabelIssue] = field(default_factory=list)
    issues_total: int = 0
    size_priors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add_issue(self, issue: LabelIssue) -> None:
        self.issues_total += 1
        if len(self.issues) < MAX_ISSUES_KEPT:
            self.issues.append(issue)
        if self.issues_total <= 20:
            log.info("skipped %s", issue)

    def note_issue(self, issue: LabelIssue) -> None:
        """Record an issue without logging (per-image partial reports; :meth:`merge` logs)."""
        self.issues_total += 1
        if len(self.issues) < MAX_ISSUES_KEPT:
            self.issues.append(issue)

    def merge(self, part: HarvestReport) -> None:
        """Add a per-image partial report to this one."""
        self.images += part.images
        self.annotations += part.annotations
        self.duplicates += part.duplicates
        for name in ("rejected", "rejected_any", "bad_input", "skipped", "file_issues"):
            getattr(self, name).update(getattr(part, name))
        for cls, c in part.per_class.items():
            self._cls(cls).update(c)
        for issue in part.issues:
            self.add_issue(issue)
        self.issues_total += part.issues_total - len(part.issues)

    def _cls(self, name: str) -> Counter:
        return self.per_class.setdefault(name, Counter())

    @property
    def not_kept(self) -> int:
        return (self.duplicates + sum(self.rejected.values()) + sum(self.bad_input.values())
                + sum(self.skipped.values()))

    def check(self) -> None:
        """Assert the bookkeeping identity (every annotation accounted for exactly once)."""
        if self.kept + self.not_kept != self.annotations:
            raise AssertionError(f"harvest bookkeeping: {self.kept} kept + {self.not_kept} not kept "
                                 f"!= {self.annotations} annotations")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "format": self.format, "images": self.images,
            "annotations": self.annotations, "kept": self.kept, "duplicates": self.duplicates,
            "rejected": dict(self.rejected), "rejected_any": dict(self.rejected_any),
            "bad_input": dict(self.bad_input), "skipped": dict(self.skipped),
            "file_issues": dict(self.file_issues),
            "per_class": {k: dict(v) for k, v in sorted(self.per_class.items())},
            "issues": [str(i) for i in self.issues[:200]], "issues_total": self.issues_total,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """Human-readable multi-line summary (what the CLI prints)."""

        def fmt(c: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in c.most_common())

        lines = [f"{self.dataset} ({self.format}): {self.images} images, {self.annotations} annotations "
                 f"-> {self.kept} instances kept"]
        if self.rejected:
            lines.append(f"  rejected by quality filters: {sum(self.rejected.values())} ({fmt(self.rejected)})")
        if self.bad_input:
            lines.append(f"  skipped bad input: {sum(self.bad_input.values())} ({fmt(self.bad_input)})")
        if self.skipped:
            lines.append(f"  skipped by options: {sum(self.skipped.values())} ({fmt(self.skipped)})")
        if self.duplicates:
            lines.append(f"  duplicates (already in the bank): {self.duplicates}")
        if self.file_issues:
            lines.append(f"  file problems: {fmt(self.file_issues)}")
        for issue in self.issues[:10]:
            lines.append(f"    {issue}")
        if self.issues_total > 10:
            lines.append(f"    ... {self.issues_total - 10} more input problems")
        if self.seconds:
            lines.append(f"  {self.seconds:.1f} s, {self.annotations / max(self.seconds, 1e-9):.0f} annotations/s")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ size priors
class _SizeStats:
    """Running per-class sums of relative sqrt-area and aspect ratio (w / h)."""

    def __init__(self) -> None:
        self.acc: dict[str, np.ndarray] = {}

    def add(self, category: str, area: int, w: int, h: int, img_w: int, img_h: int) -> None:
        rel = math.sqrt(area / float(img_w * img_h))
        asp = w / float(h)
        a = self.acc.setdefault(category, np.zeros(5))
        a += (1.0, rel, rel * rel, asp, asp * asp)

    def merge(self, other: _SizeStats) -> None:
        for name, a in other.acc.items():
            self.acc.setdefault(name, np.zeros(5))
            self.acc[name] += a

    def priors(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (n, s, ss, sa, ssa) in self.acc.items():
            m, ma = s / n, sa / n
            out[name] = {
                "n": int(n),
                "rel_sqrt_area_mean": float(m), "rel_sqrt_area_std": float(math.sqrt(max(ss / n - m * m, 0.0))),
                "aspect_mean": float(ma), "aspect_std": float(math.sqrt(max(ssa / n - ma * ma, 0.0))),
            }
        return out


def update_prior(current: dict[str, float] | None, new: dict[str, float],
                 replaced: dict[str, float] | None = None) -> dict[str, float]:
    """Pool ``new`` into the bank's ``current`` prior (n-weighted), after taking out ``replaced`` (this
    dataset's contribution from an earlier harvest), so re-harvesting a dataset does not count it twice."""
    if not current:
        return pool_priors([new]) or new
    return pool_priors([current, new], remove=[replaced] if replaced else []) or new


# ------------------------------------------------------------------------------------------ driver
@dataclass
class ImageOutcome:
    """What processing one image produced; applied to the bank and the report in the main process."""

    report: HarvestReport
    sizes: _SizeStats
    # (record id, rgba, category, category id, provenance) of instances that passed the filters; worker
    # processes send (record id, None, category, category id, (metadata, encoded image)) instead
    passed: list[tuple[str, np.ndarray | None, str, int, Any]] = field(default_factory=list)
    # (rgba, category, provenance, reasons) of rejected crops, only with store_rejected
    rejected: list[tuple[np.ndarray, str, dict[str, Any], list[str]]] = field(default_factory=list)


_WORKER: dict[str, Any] = {}


def _init_worker(harvester: Harvester, wanted, name: str, fmt: str, codec: str | None) -> None:
    import cv2

    cv2.setNumThreads(1)
    _WORKER.update(harvester=harvester, wanted=wanted, name=name, format=fmt, codec=codec)


def _work(sample: SourceImage) -> ImageOutcome:
    """Worker: cut out one image and, when the codec is known, encode the bank records here too so
    the writing process only commits bytes (``BankWriter.add_encoded``)."""
    w = _WORKER
    out = w["harvester"].process_image(sample, w["wanted"], w["name"], w["format"])
    if w["codec"]:
        out.passed = [(rid, None, cat, cid, (build_meta(rid, rgba, category=cat, category_id=cid, codec=w["codec"],
                                                        source=prov, verdict=None), encode_rgba(rgba, w["codec"])))
                      for rid, rgba, cat, cid, prov in out.passed]
    return out

class Harvester:
    """Runs one source into one :class:`~genval_aug.bank.BankWriter`."""

    def __init__(self, config: HarvestConfig | None = None):
        self.config = config or HarvestConfig()

    # -- geometry -> mask window ------------------------------------------------------------------
    def instance_mask(self, image: np.ndarray, ann: Annotation) -> tuple[np.ndarray, int, int]:
        """uint8 mask window (0..255) and its top-left (x, y) in the image, clipped to the image."""
        H, W = image.shape[:2]
        cfg = self.config
        if ann.normalized:
            scale = np.array([W, H], np.float64)
            if ann.polygons is not None:
                ann.polygons = [np.asarray(p, np.float64) * scale for p in ann.polygons]
            if ann.box is not None:
                ann.box = np.asarray(ann.box, np.float64) * np.tile(scale, 2)
            ann.normalized = False
        if ann.polygons is not None:
            x1, y1, x2, y2 = M.polygons_bbox(ann.polygons)
            x0, y0 = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
            xe, ye = min(W, int(math.ceil(x2)) + 1), min(H, int(math.ceil(y2)) + 1)
            if xe <= x0 or ye <= y0:
                return np.zeros((0, 0), np.uint8), x0, y0
            m = M.rasterize_polygons(ann.polygons, (ye - y0, xe - x0), (x0, y0), 4 if cfg.soft_edges else 1)
            return m, x0, y0
        if ann.mask is not None:
            m = ann.mask
            m = (m.astype(np.uint8) * 255) if m.dtype == bool else m.astype(np.uint8, copy=False)
            ox, oy = ann.mask_offset
            bb = M.tight_bbox(m)
            if bb is None:
                return np.zeros((0, 0), np.uint8), ox, oy
            x, y, w, h = bb
            x0, y0 = max(0, ox + x), max(0, oy + y)
            xe, ye = min(W, ox + x + w), min(H, oy + y + h)
            return m[y0 - oy:ye - oy, x0 - ox:xe - ox], x0, y0
        if ann.box is not None:
            return M.grabcut_box(image, np.asarray(ann.box, np.float64), iterations=cfg.grabcut_iterations,
                                 context=cfg.grabcut_context, max_side=cfg.grabcut_max_side,
                                 seed_fraction=cfg.grabcut_seed)
        raise ValueError(f"annotation {ann.ref} has no geometry")

    # -- main loop --------------------------------------------------------------------------------
    def run(self, source: HarvestSource, writer, *, progress: bool | Callable[[Iterable], Iterable] = False,
            report: HarvestReport | None = None) -> HarvestReport:
        """Harvest ``source`` into ``writer`` (a BankWriter). ``progress``: True for a tqdm bar."""
        cfg = self.config
        rep = report or HarvestReport(dataset=source.name, format=source.format)
        wanted = self._class_filter(source)
        sizes = _SizeStats()
        seen: set[str] = set()
        added0, dup0 = writer.added, writer.duplicates
        t0 = time.perf_counter()
        for issue in source.file_issues():
            rep.file_issues[issue.reason] += 1
            rep.add_issue(issue)
        it: Iterable[SourceImage] = source
        if progress is True:
            from tqdm.auto import tqdm

            total = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
            it = tqdm(source, total=total, unit="img", desc=f"harvest {source.name}", disable=None)
        elif callable(progress):
            it = progress(source)
        if cfg.max_images is not None:
            it = itertools.islice(it, cfg.max_images)
        if cfg.workers and cfg.workers > 1:
            codec = getattr(writer, "codec", None) if hasattr(writer, "add_encoded") else None
            outcomes = self._parallel(it, wanted, source.name, source.format, codec)
        else:
            outcomes = (self.process_image(sample, wanted, source.name, source.format) for sample in it)
        for outcome in outcomes:
            self._apply(outcome, writer, rep, sizes, seen)
        writer.flush()
        rep.kept = writer.added - added0
        rep.duplicates += writer.duplicates - dup0
        rep.size_priors = sizes.priors()
        self._write_bank_stats(source, writer, rep)
        rep.seconds = time.perf_counter() - t0
        rep.check()
        if rep.issues_total:
            parts = [f"{sum(rep.bad_input.values())} annotation(s) skipped as bad input"]
            if rep.file_issues:
                parts.append(f"{sum(rep.file_issues.values())} file problem(s)")
            log.warning("harvest %s: %s (%s); see the report", source.name, ", ".join(parts),
                        ", ".join(f"{k} {v}" for k, v in (rep.bad_input + rep.file_issues).items()))
        return rep

    def _class_filter(self, source: HarvestSource) -> set[int] | None:
        if self.config.classes is None:
            return None
        by_name = {v: k for k, v in source.names.items()}
        out: set[int] = set()
        for c in self.config.classes:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit() and c not in by_name):
                if source.names and int(c) not in source.names:
                    raise ConfigError(f"--classes: id {c} is not a class of {source.name}")
                out.add(int(c))
            elif c in by_name:
                out.add(by_name[c])
            else:
                known = ", ".join(list(by_name)[:20])
                raise ConfigError(f"--classes: {c!r} is not a class of {source.name} (classes: {known}...)")
        return out

    def _parallel(self, samples: Iterable[SourceImage], wanted, name: str, fmt: str,
                  codec: str | None) -> Iterator[ImageOutcome]:
        """Process images in ``workers`` spawned processes, in order, holding a bounded window in memory."""
        import multiprocessing as mp

        n = int(self.config.workers)
        window = 16 * n
        ctx = mp.get_context("spawn")
        with ctx.Pool(n, initializer=_init_worker, initargs=(self, wanted, name, fmt, codec)) as pool:
            it = iter(samples)
            while True:
                batch = list(itertools.islice(it, window))
                if not batch:
                    break
                yield from pool.imap(_work, batch, chunksize=2)

    def process_image(self, sample: SourceImage, wanted: set[int] | None, name: str, fmt: str) -> ImageOutcome:
        """Decode one image and cut out its annotations. Pure: touches no bank (runs in worker processes)."""
        cfg = self.config
        out = ImageOutcome(HarvestReport(dataset=name, format=fmt), _SizeStats())
        rep = out.report
        rep.images += 1
        for issue in sample.issues:
            if issue.count:
                rep.annotations += issue.count
                rep.bad_input[issue.reason] += issue.count
            else:
                rep.file_issues[issue.reason] += 1
            rep.note_issue(issue)
        for reason, n in sample.skipped.items():
            rep.annotations += n
            rep.skipped[reason] += n
        anns = []
        for ann in sample.annotations:
            rep.annotations += 1
            if wanted is not None and ann.category_id not in wanted:
                rep.skipped["class_filter"] += 1
            else:
                anns.append(ann)
        if not anns:
            return out
        image = sample.image
        if image is None:
            try:
                image = read_rgb(sample.path, convert=cfg.convert_images)
            except ImageError as e:
                self._image_failed(rep, sample, anns, e.reason, f"{e.detail}; {len(anns)} annotation(s) skipped")
                return out
        H, W = image.shape[:2]
        if sample.expected_size is not None and tuple(sample.expected_size) != (W, H):
            self._image_failed(rep, sample, anns, "size_mismatch", f"image is {W}x{H}, annotations say "
                               f"{sample.expected_size[0]}x{sample.expected_size[1]}; {len(anns)} annotation(s) skipped")
            return out
        for ann in anns:
            self._one_annotation(image, H, W, ann, sample, name, fmt, out)
        return out

    def _apply(self, out: ImageOutcome, writer, rep: HarvestReport, sizes: _SizeStats, seen: set[str]) -> None:
        """Main process: write what an image produced and add its counts."""
        rep.merge(out.report)
        sizes.merge(out.sizes)
        for rgba, category, prov, reasons in out.rejected:
            writer.add_rejected(rgba, category=category, source=prov,
                                verdict={"keep": False, "score": 0.0, "model": "harvest-prefilter",
                                         "reasons": {r: "harvest pre-filter" for r in reasons}})
        for rid, rgba, category, category_id, prov in out.passed:
            per = rep._cls(category)
            if rid in seen:
                rep.duplicates += 1
                per["duplicates"] += 1
                continue
            seen.add(rid)
            if rgba is None:  # encoded by a worker: prov is (metadata, image bytes)
                writer.add_encoded(*prov)
            else:
                writer.add(rgba, category=category, category_id=category_id, source=prov)
            per["passed"] += 1

    def _box_precheck(self, ann: Annotation, W: int, H: int, rep: HarvestReport, sizes: _SizeStats,
                      per: Counter) -> bool:
        """Box sources: size statistics from the box, and no GrabCut for boxes that must fail anyway
        (smaller than the size rules, or touching the image border). True = rejected here."""
        cfg = self.config
        if ann.normalized:
            ann.box = np.asarray(ann.box, np.float64) * np.array([W, H, W, H], np.float64)
            ann.normalized = False
        x1, y1, x2, y2 = (float(v) for v in ann.box)
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(W), x2), min(float(H), y2)
        bw, bh = x2 - x1, y2 - y1
        if bw < 1 or bh < 1:
            reason = "empty_alpha"
        else:
            sizes.add(ann.category, int(round(bw * bh)), int(round(bw)), int(round(bh)), W, H)
            b, r = cfg.border_px, cfg.rules
            reason = None
            if (r.min_area is not None and bw * bh < r.min_area) or (r.min_side is not None and min(bw, bh) < r.min_side):
                reason = "too_small"
            elif cfg.reject_truncated and (x1 < b or y1 < b or x2 > W - b or y2 > H - b):
                reason = "truncated"
        if reason is None:
            return False
        rep.rejected[reason] += 1
        rep.rejected_any[reason] += 1
        per["rejected"] += 1
        return True

    @staticmethod
    def _image_failed(rep: HarvestReport, sample: SourceImage, anns: list[Annotation], reason: str, msg: str) -> None:
        rep.bad_input[reason] += len(anns)
        rep.note_issue(LabelIssue(str(sample.path), None, reason, msg, count=len(anns)))
        for ann in anns:
            rep._cls(ann.category)["bad_input"] += 1

    def _one_annotation(self, image, H, W, ann: Annotation, sample: SourceImage, name: str, fmt: str,
                        out: ImageOutcome) -> None:
        cfg = self.config
        rep, sizes = out.report, out.sizes
        per = rep._cls(ann.category)
        if ann.box is not None and self._box_precheck(ann, W, H, rep, sizes, per):
            return
        try:
            mask, x, y = self.instance_mask(image, ann)
        except Exception as e:  # noqa: BLE001 - e.g. GrabCut on a degenerate region: count, keep going
            rep.rejected["mask_failed"] += 1
            rep.rejected_any["mask_failed"] += 1
            per["rejected"] += 1
            log.debug("mask of %s %s failed: %s", sample.rel, ann.ref, e)
            return
        bb = M.tight_bbox(mask >= cfg.rules.alpha_threshold) if mask.size else None
        if bb is None:
            rep.rejected["empty_alpha"] += 1
            rep.rejected_any["empty_alpha"] += 1
            per["rejected"] += 1
            return
        bx, by, bw, bh = bb
        area = int(np.count_nonzero(mask >= cfg.rules.alpha_threshold))
        if ann.box is None:  # box sources add the box size in _box_precheck
            sizes.add(ann.category, area, bw, bh, W, H)
        if cfg.keep_largest:
            keep = largest_component(mask >= cfg.rules.alpha_threshold)
            mask = np.where(keep, mask, 0).astype(np.uint8)
            bx, by, bw, bh = M.tight_bbox(mask >= cfg.rules.alpha_threshold)
            area = int(np.count_nonzero(mask >= cfg.rules.alpha_threshold))
        # crop the mask window to its tight box before adding the margin
        mask = mask[by:by + bh, bx:bx + bw]
        x, y = x + bx, y + by
        b = cfg.border_px
        truncated = x < b or y < b or x + bw > W - b or y + bh > H - b
        r = cfg.rules
        if not cfg.store_rejected and ((r.min_area is not None and area < r.min_area)
                                       or (r.min_side is not None and min(bw, bh) < r.min_side)):
            # "too_small" is check_instance's first rule: decide it without building the crop
            rep.rejected["too_small"] += 1
            rep.rejected_any["too_small"] += 1
            if truncated and cfg.reject_truncated:
                rep.rejected_any["truncated"] += 1
            per["rejected"] += 1
            return
        margin = max(cfg.min_margin_px, int(round(cfg.margin * max(bw, bh))))
        rgba, crop_box = M.crop_rgba(image, mask, x, y, margin)
        stats = alpha_stats(rgba, cfg.rules.alpha_threshold)
        reasons = check_instance(rgba, cfg.rules, truncated=truncated and cfg.reject_truncated, stats=stats)
        kind = "harvest-grabcut" if ann.box is not None else "harvest"
        prov = {
            "kind": kind, "dataset": name, "format": fmt, "image": sample.rel,
            **ann.ref, "category_id": ann.category_id, "bbox": [int(x), int(y), int(bw), int(bh)],
            "crop": list(map(int, crop_box)), "image_size": [int(W), int(H)], "truncated": bool(truncated),
            **sample.info,
        }
        if reasons:
            rep.rejected[reasons[0]] += 1
            rep.rejected_any.update(reasons)
            per["rejected"] += 1
            if cfg.store_rejected:
                out.rejected.append((rgba, ann.category, prov, reasons))
            return
        out.passed.append((content_id(ann.category, rgba), rgba, ann.category, ann.category_id, prov))

    def _write_bank_stats(self, source: HarvestSource, writer, rep: HarvestReport) -> None:
        from genval_aug.bank import InstanceBank

        bank = InstanceBank(writer.path) if getattr(writer, "path", None) else None
        key = f"harvest/{source.name}"
        previous: dict[str, Any] = {}
        if bank is not None:
            previous = bank.get_status(key) or {}
        # the bank keeps each dataset's latest harvest: re-harvesting replaces its share, never doubles it
        old_priors = previous.get("size_priors", {})
        for name, prior in rep.size_priors.items():
            current = bank.size_prior(name) if bank is not None else None
            writer.set_size_prior(name, update_prior(current, prior, old_priors.get(name)))
        reasons = Counter(rep.rejected)
        reasons.update(rep.bad_input)
        for k in ("iscrowd", "box_line"):
            if rep.skipped.get(k):
                reasons[k] += rep.skipped[k]
        old = previous.get("recorded_rejections", {})
        delta = {k: reasons.get(k, 0) - old.get(k, 0) for k in set(reasons) | set(old)}
        delta = {k: v for k, v in delta.items() if v}
        if delta:
            writer.record_rejections(delta)
        writer.set_status(key, {**rep.to_dict(), "recorded_rejections": dict(reasons),
                                "size_priors": rep.size_priors, "config": self.config.to_dict()})


def harvest(data: str | os.PathLike, out, *, format: str = "auto", config: HarvestConfig | None = None,
            progress: bool = False, **source_options) -> HarvestReport:
    """Harvest the dataset at ``data`` into the bank at ``out`` (path or an open BankWriter).

    ``format``: ``auto`` (by file/folder layout), ``yolo-seg``, ``yolo-det`` (boxes, GrabCut masks),
    ``coco``, ``voc``. ``source_options`` go to the format reader (e.g. ``split``, ``names``, ``images_dir``).
    """
    from genval_aug.bank import BankWriter
    from genval_aug.harvest.formats import open_source

    source = open_source(data, format=format, **source_options)
    harvester = Harvester(config)
    if isinstance(out, (str, os.PathLike)):
        with BankWriter(out) as w:
            return harvester.run(source, w, progress=progress)
    return harvester.run(source, out, progress=progress)
