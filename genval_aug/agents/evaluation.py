"""Labeled validation sets and validator metrics (precision, recall, invalid rate among kept).

``labels.csv`` columns: ``image`` (file name relative to the images directory), ``category``, ``keep``
(1/0, true/false, yes/no, keep/reject), optional ``definition`` and optional per-criterion labels named as
:data:`~genval_aug.agents.validation_agent.CRITERIA` (blank = unknown). Images are RGBA PNG/WebP files.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genval_aug.agents.validation_agent import CRITERIA, Verdict
from genval_aug.errors import DatasetError

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "y", "keep", "pass", "meet", "t"}
_FALSE = {"0", "false", "no", "n", "reject", "fail", "filter", "f"}


def parse_bool(value: str | None, *, where: str) -> bool | None:
    s = (value or "").strip().lower()
    if not s:
        return None
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise DatasetError(f"{where}: expected a yes/no value, got {value!r}")


@dataclass
class LabeledInstance:
    image: Path
    category: str
    keep: bool
    criteria: dict[str, bool] = field(default_factory=dict)
    definition: str | None = None

    def load_rgba(self) -> np.ndarray:
        buf = np.fromfile(str(self.image), dtype=np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
        if img is None:
            raise DatasetError(f"{self.image}: cannot decode image")
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
        if img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
        if img.dtype != np.uint8:
            img = (img / 257).astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)


def load_labels(labels_csv: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[LabeledInstance]:
    """Read ``labels.csv``; images are looked up in ``images_dir`` (default: the CSV's directory).
    Rows with a missing image or a bad value are skipped and counted (logged once)."""
    path = Path(labels_csv)
    root = Path(images_dir) if images_dir is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) must not rename column 1
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DatasetError(f"{path}: cannot read labels: {e}") from e
    if not rows:
        raise DatasetError(f"{path}: no rows")
    cols = set(rows[0])
    img_col = "image" if "image" in cols else "file" if "file" in cols else None
    for need, have in (("image (or file)", img_col), ("category", "category" in cols), ("keep", "keep" in cols)):
        if not have:
            raise DatasetError(f"{path}: missing column {need!r} (have {sorted(cols)})")
    out: list[LabeledInstance] = []
    skipped: list[str] = []
    for n, row in enumerate(rows, start=2):
        where = f"{path}:{n}"
        try:
            img = root / (row.get(img_col) or "").strip()
            if not img.is_file():
                raise DatasetError(f"{where}: image {img} not found")
            keep = parse_bool(row["keep"], where=f"{where} column 'keep'")
            if keep is None:
                raise DatasetError(f"{where}: column 'keep' is empty")
            crit = {}
            for c in CRITERIA:
                if c in row:
                    v = parse_bool(row[c], where=f"{where} column {c!r}")
                    if v is not None:
                        crit[c] = v
            if keep and crit and not all(crit.values()):
                raise DatasetError(f"{where}: keep=1 but a criterion is labeled as failing")
            cat = (row.get("category") or "").strip()
            if not cat:
                raise DatasetError(f"{where}: empty category")
            out.append(LabeledInstance(img, cat, keep, crit, (row.get("definition") or "").strip() or None))
        except DatasetError as e:
            skipped.append(str(e))
    if skipped:
        logger.warning("%s: skipped %d of %d rows; first: %s", path, len(skipped), len(rows), skipped[0])
    if not out:
        raise DatasetError(f"{path}: no usable rows ({skipped[0] if skipped else 'empty'})")
    return out


def _pr(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else (0.0 if p == 0 or r == 0 else None)
    return {"precision": p, "recall": r, "f1": f1}


def evaluate(verdicts: list[Verdict], labels: list[LabeledInstance]) -> dict[str, Any]:
    """Keep/reject metrics (positive = "valid, keep") and per-criterion metrics.

    ``invalid_rate_among_kept`` = share of kept instances a human labeled as reject (1 - precision);
    per criterion, the share of kept instances labeled as failing that criterion.
    Invalid model replies and pre-filter rejections count as rejects.
    """
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts for {len(labels)} labels")
    pred = np.array([v.keep for v in verdicts], bool)
    gold = np.array([lab.keep for lab in labels], bool)
    tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
    fn, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
    kept = int(pred.sum())
    res: dict[str, Any] = {
        "n": len(labels), "kept": kept, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        **_pr(tp, fp, fn),
        "accuracy": (tp + tn) / len(labels) if labels else None,
        "invalid_rate_among_kept": fp / kept if kept else None,
        "prefiltered": sum(v.status == "prefilter" for v in verdicts),
        "invalid_replies": sum(v.status == "invalid" for v in verdicts),
        "criteria": {},
    }
    for c in CRITERIA:
        # positive = "criterion passes"; only instances with a label for c and a judged verdict
        pairs = [(v.criteria[c], lab.criteria[c]) for v, lab in zip(verdicts, labels, strict=True)
                 if c in lab.criteria and v.status == "judged" and c in v.criteria]
        kept_known = [lab.criteria[c] for v, lab in zip(verdicts, labels, strict=True) if v.keep and c in lab.criteria]
        ctp = sum(p and g for p, g in pairs)
        cfp = sum(p and not g for p, g in pairs)
        cfn = sum(g and not p for p, g in pairs)
        res["criteria"][c] = {
            "n": len(pairs), **_pr(ctp, cfp, cfn),
            "fail_rate_predicted": (sum(not p for p, _ in pairs) / len(pairs)) if pairs else None,
            "invalid_rate_among_kept": (sum(not g for g in kept_known) / len(kept_known)) if kept_known else None,
        }
    return res


def format_metrics(m: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    def f(x):
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = [f"instances {m['n']}  kept {m['kept']}  pre-filtered {m['prefiltered']}  invalid replies "
             f"{m['invalid_replies']}",
             f"{'':22}{'precision':>10}{'recall':>10}{'f1':>8}{'invalid@kept':>14}{'n':>6}",
             f"{'keep (overall)':22}{f(m['precision']):>10}{f(m['recall']):>10}{f(m['f1']):>8}"
             f"{f(m['invalid_rate_among_kept']):>14}{m['n']:>6}"]
    for c, cm in m["criteria"].items():
        lines.append(f"{c:22}{f(cm['precision']):>10}{f(cm['recall']):>10}{f(cm['f1']):>8}"
                     f"{f(cm['invalid_rate_among_kept']):>14}{cm['n']:>6}")
    return "\n".join(lines)
