"""Bank maintenance: verify, merge shards, export to / import from folders of RGBA PNGs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genval_aug.bank.priors import pool_priors
from genval_aug.bank.record import check_image, loads
from genval_aug.bank.store import BankWriter, InstanceBank, NewerSchemaError
from genval_aug.errors import BadInstanceError, BadRecordError, BankError

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    path: str
    records: int = 0
    categories: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        head = f"{self.path}: {self.records} records in {self.categories} categories"
        if self.ok:
            return head + ": OK"
        return head + f": {len(self.errors)} problem(s)\n  " + "\n  ".join(self.errors[:50])


def verify(bank: InstanceBank | str | os.PathLike, *, decode: bool = True) -> VerifyReport:
    """Check every record decodes (to the pixels its content id was hashed from), the category index is
    consistent and the counts match. ``decode=False`` checks only metadata, index and counts.

    Every problem is reported (naming the record, field or category); a corrupt record or stats entry
    does not stop the check.
    """
    bank = bank if isinstance(bank, InstanceBank) else InstanceBank(bank)
    report = VerifyReport(bank.path)
    try:
        version = bank.schema_version()
        if version == 0:
            report.errors.append("missing schema record")
    except BadRecordError as e:
        report.errors.append(str(e))
    except NewerSchemaError as e:
        report.errors.append(str(e))  # its records may have another format: nothing more to check
        return report
    try:
        stats = bank.stats(refresh=True)
        if not isinstance(stats.get("categories"), dict) or not isinstance(stats.get("total"), int):
            raise BadRecordError(f"{bank.path} stats: no 'categories' table or integer 'total'")
    except (BadRecordError, AttributeError) as e:
        report.errors.append(str(e) if isinstance(e, BadRecordError) else f"{bank.path} stats: not a JSON object")
        stats = {"total": None, "categories": {}}
    categories = {}
    for name, c in stats["categories"].items():
        if not isinstance(c, dict) or not isinstance(c.get("count"), int) or not isinstance(c.get("id"), int):
            report.errors.append(f"category {name!r}: stats entry {c!r} lacks an integer 'count' and 'id'")
            continue
        categories[name] = c
    by_id: dict[int, list[str]] = {}
    for name, c in categories.items():
        by_id.setdefault(c["id"], []).append(name)
    for cid, names in sorted(by_id.items()):
        if len(names) > 1:
            report.errors.append(f"categories {', '.join(map(repr, sorted(names)))} share category id {cid}")

    def scan(txn, dbs):
        records = {k.decode(): v for k, v in txn.cursor(db=dbs["records"])}
        images = {k.decode() for k in txn.cursor(db=dbs["images"]).iternext(keys=True, values=False)}
        index = [(k, v.decode()) for k, v in txn.cursor(db=dbs["index"])]
        return records, images, index

    records, images, index = bank._read(scan)
    report.records = len(records)
    report.categories = len(stats["categories"])
    per_cat: Counter[str] = Counter()
    for rid, raw in records.items():
        try:
            meta = _checked_meta(rid, raw)
        except BadRecordError as e:
            report.errors.append(str(e))
            continue
        category = meta["category"]
        per_cat[category] += 1
        if meta.get("id") != rid:
            report.errors.append(f"record {rid}: metadata id is {meta.get('id')!r}")
        if bank.id_at(category, meta["seq"]) != rid:
            report.errors.append(f"record {rid}: index entry {category}/{meta['seq']} does not point to it")
        c = categories.get(category)
        if c is not None and meta["category_id"] != c["id"]:
            report.errors.append(f"record {rid}: category_id {meta['category_id']} but the bank's id of "
                                 f"{category!r} is {c['id']}")
        if category not in stats["categories"]:
            report.errors.append(f"record {rid}: category {category!r} is missing from the bank stats")
        if rid not in images:
            report.errors.append(f"record {rid}: image missing")
        elif decode:
            try:
                check_image(rid, category, bank.get_raw(rid)[1], shape=(meta["height"], meta["width"]))
            except BadRecordError as e:
                report.errors.append(str(e))
    for rid in images - records.keys():
        report.errors.append(f"image {rid}: no metadata record")
    for key, rid in index:
        if rid not in records:
            report.errors.append(f"index {key!r} points to missing record {rid}")
    per_index = Counter(k[:-5].decode("utf-8", "replace") for k, _ in index)  # key = name \0 seq(4 bytes)
    for name, c in categories.items():
        if c["count"] != per_cat.get(name, 0):
            report.errors.append(f"category {name!r}: stats count {c['count']} != {per_cat.get(name, 0)} records")
        n_index = per_index.get(name, 0)
        if n_index != c["count"]:
            report.errors.append(f"category {name!r}: {n_index} index entries, stats count {c['count']}")
    if stats["total"] is not None and stats["total"] != len(records):
        report.errors.append(f"stats total {stats['total']} != {len(records)} records")
    return report


def _checked_meta(rid: str, raw: bytes | dict[str, Any]) -> dict[str, Any]:
    """A record's metadata (raw JSON or parsed) with the fields the bank relies on type-checked;
    ``BadRecordError`` naming the field."""
    meta = loads(raw, what=f"record {rid}") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if not isinstance(meta, dict):
        raise BadRecordError(f"record {rid}: metadata is a JSON {type(meta).__name__}, not an object")
    category = meta.get("category")
    if not isinstance(category, str) or not category:
        raise BadRecordError(f"record {rid}: field 'category' is {category!r}, not a category name")
    for name, lo in (("seq", 0), ("height", 1), ("width", 1), ("category_id", None)):
        v = meta.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and not lo <= v < 1 << 32):
            raise BadRecordError(f"record {rid}: field {name!r} is {v!r}, not a valid integer")
    return meta


def bank_identity(bank: InstanceBank) -> str:
    """A name for ``bank`` that survives copying it: its creation uuid, or for banks made before uuids
    existed a hash of its sorted record ids and its stats."""
    uid = bank.uuid()
    if uid:
        return uid
    h = hashlib.sha256()
    for rid in sorted(bank.ids()):
        h.update(rid.encode() + b"\n")
    h.update(json.dumps(bank.stats(refresh=True), sort_keys=True).encode())
    return "content-" + h.hexdigest()[:32]


def merge(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, batch_size: int = 256,
          check: bool = True) -> dict[str, Any]:
    """Combine shard banks into ``out`` (created if missing), deduplicating by record id.

    Records are copied byte for byte once checked as :func:`verify` does (metadata fields, image decodes to the
    metadata's size and to the pixels its content id was hashed from), so a merge never spreads corruption:
    a corrupt input record is skipped, counted in ``skipped`` and its error listed in ``errors`` (logged once per
    input). ``check=False`` copies without decoding (only for inputs just verified). Size priors are pooled with
    the output's own; rejection counts are added. The output keeps what each input contributed (status ``merge/<identity>``, see
    :func:`bank_identity`), so merging the same input (or a copy, or a grown version of it) again replaces
    its earlier contribution instead of counting it twice.
    """
    out_path = Path(out).resolve()
    added = dup = 0
    errors: list[str] = []
    with BankWriter(out_path, batch_size=batch_size) as w:
        target = InstanceBank(out_path)
        priors: dict[str, dict[str, float] | None] = {}  # output priors changed by this merge
        reasons: Counter[str] = Counter()  # change of the output's rejection counts
        statuses: dict[str, dict[str, Any]] = {}
        for src in inputs:
            bank = InstanceBank(src)
            if Path(bank.path) == out_path:
                raise BankError(f"cannot merge {src} into itself")
            stats = bank.stats(refresh=True)
            ident = bank_identity(bank)
            key = f"merge/{ident}"
            previous = statuses.get(key) or target.get_status(key) or {}
            contributed = {name: p for name in stats["categories"] if (p := bank.size_prior(name))}
            old_priors = previous.get("size_priors", {})
            for name in set(contributed) | set(old_priors):
                current = priors[name] if name in priors else target.size_prior(name)
                old = old_priors.get(name)
                adds = [p for p in (current, contributed.get(name)) if p]
                priors[name] = pool_priors(adds, remove=[old] if old else []) if adds else None
            new_reasons = {k: int(v) for k, v in stats.get("rejections", {}).items()}
            old_reasons = previous.get("rejections", {})
            for k in set(new_reasons) | set(old_reasons):
                reasons[k] += new_reasons.get(k, 0) - int(old_reasons.get(k, 0))
            bad: list[str] = []
            for rid in bank.ids():
                try:
                    meta, image = bank.get_raw(rid)
                    if not isinstance(meta, dict) or meta.get("id") != rid:
                        raise BadRecordError(f"record {rid}: metadata is not an object with this id")
                    if check:
                        _checked_meta(rid, meta)
                        check_image(rid, meta["category"], image, shape=(meta["height"], meta["width"]))
                    w.add_encoded(meta, image)
                except BadRecordError as e:  # a corrupt input record must not stop the merge halfway
                    bad.append(f"{bank.path}: {e}")
            if bad:
                log.warning("merge into %s: skipped %d corrupt record(s) of %s, e.g. %s", out_path, len(bad),
                            bank.path, bad[0])
                errors += bad
            statuses[key] = {"input": bank.path, "identity": ident, "records": int(stats["total"]),
                             "size_priors": contributed, "rejections": new_reasons}
            bank.close()
        w.flush()
        added, dup = w.added, w.duplicates
        for name, p in priors.items():
            if p is None:
                log.warning("merge into %s: nothing is left of the size prior of %r after replacing an "
                            "input's share; the stored prior is left unchanged", out_path, name)
                continue
            w.set_size_prior(name, p)
        delta = {k: v for k, v in reasons.items() if v}
        if delta:
            w.record_rejections(delta)
        for key, status in statuses.items():
            w.set_status(key, status, commit=False)
        w.flush()  # priors, rejection counts and the bookkeeping commit in one transaction
    return {"added": added, "duplicates": dup, "skipped": len(errors), "errors": errors}


def export_folder(bank: InstanceBank | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write every instance as ``<category>/<id>.png`` plus ``manifest.json`` (metadata list)."""
    bank = bank if isinstance(bank, InstanceBank) else InstanceBank(bank)
    out = Path(out_dir)
    _export_dir(out)
    manifest = []
    for rid in bank.ids():
        inst = bank.get(rid)
        rel = Path(_safe_name(inst.category)) / f"{rid}.png"
        _export_dir(out / rel.parent)
        if not cv2.imwrite(str(out / rel), cv2.cvtColor(inst.rgba, cv2.COLOR_RGBA2BGRA)):
            raise BankError(f"could not write {out / rel}")
        manifest.append({**inst.meta, "file": rel.as_posix()})
    priors = {name: p for name in bank.category_ids() if (p := bank.size_prior(name))}
    (out / "manifest.json").write_text(json.dumps({"bank": bank.path, "instances": manifest, "size_priors": priors},
                                                  indent=1))
    return out


def _export_dir(path: Path) -> None:
    """Create an export folder (and its parents); ``BankError`` naming it when that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BankError(f"cannot create export folder {path}: {e.strerror or e}") from None


def _safe_name(name: str) -> str:
    """A folder name for a category: never a path separator, never ``.``/``..`` (export stays in its folder)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip()
    safe = "_" + safe if not safe.strip(".") else safe
    if len(safe.encode("utf-8")) > 120:  # file systems allow 255 bytes; a bank category may have 505
        short = safe.encode("utf-8")[:100].decode("utf-8", "ignore")
        safe = f"{short}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:12]}"
    return safe


def read_rgba_file(path: str | os.PathLike) -> np.ndarray:
    """Read an RGBA image file as HxWx4 uint8 RGB order; clear errors for other kinds."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise BadInstanceError(f"{path}: not a readable image")
    if arr.dtype != np.uint8:
        raise BadInstanceError(f"{path}: {arr.dtype} image; only 8-bit RGBA is accepted")
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise BadInstanceError(f"{path}: has no alpha channel (shape {arr.shape}); an RGBA cut-out is required")
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)


def import_folder(out: str | os.PathLike, folder: str | os.PathLike, *, source_kind: str = "import",
                  category: str | None = None) -> dict[str, Any]:
    """Add a folder of RGBA PNGs to a bank.

    With ``manifest.json`` (as written by :func:`export_folder`) categories and provenance come from it;
    otherwise each sub-folder is a category (or ``category`` names the one category of a flat folder).
    Bad files are skipped and reported.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"import folder {folder} does not exist")
    items: list[tuple[Path, str, dict[str, Any] | None, dict[str, Any] | None, int | None]] = []
    priors: dict[str, Any] = {}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text())
            entries = doc["instances"]
            priors = doc.get("size_priors") or {}
            if not isinstance(priors, dict):
                raise TypeError("'size_priors' is not an object")
            if not isinstance(entries, list):
                raise TypeError("'instances' is not a list")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BankError(f"{manifest}: not a genval_aug manifest ({e})") from None
        for i, m in enumerate(entries):
            if not isinstance(m, dict):
                raise BankError(f"{manifest}: instance {i} is a JSON {type(m).__name__}, not an object")
            try:
                items.append((folder / str(m["file"]), m["category"], m.get("source"), m.get("verdict"),
                              m.get("category_id")))
            except KeyError as e:
                raise BankError(f"{manifest}: instance {i} lacks field {e}") from None
    else:
        exts = {".png", ".webp"}
        if category is not None:
            items = [(p, category, None, None, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in exts]
        else:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                items += [(p, sub.name, None, None, None) for p in sorted(sub.iterdir()) if p.suffix.lower() in exts]
        if not items:
            raise BankError(f"{folder}: no manifest.json, and no per-class sub-folders of .png/.webp files")
    added, skipped = 0, []
    with BankWriter(out) as w:
        before = w.added
        for path, cat, source, verdict, cid in items:
            try:
                rgba = read_rgba_file(path)
                w.add(rgba, category=cat, category_id=cid,
                      source=source or {"kind": source_kind, "file": str(path)}, verdict=verdict)
            except BadInstanceError as e:
                msg = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
                skipped.append(msg)
                log.warning("import: skipping %s", msg)
        w.flush()
        target = InstanceBank(out)
        for name, prior in priors.items():  # the exported bank's paste-time scales; never overwrite the bank's own
            try:
                if isinstance(prior, dict) and target.size_prior(name) is None:
                    w.set_size_prior(name, prior)
            except (BadInstanceError, TypeError, AttributeError) as e:
                log.warning("import: ignoring the size prior of %r from %s (%s)", name, manifest, e)
        w.flush()
        added = w.added - before
    return {"added": added, "skipped": len(skipped), "errors": skipped}
