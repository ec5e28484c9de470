"""Built-in instance sources: ``layerdiffusion``, ``harvest``, ``folder`` and ``shapes``.

Each is a thin adapter from work units to :class:`~genval_aug.build.registry.Candidate`; the
heavy modules (diffusers, the harvesters) are imported only when the source is built.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from genval_aug.build.registry import Candidate, WorkUnit, register_source
from genval_aug.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["FolderSource", "GeneratorSource", "HarvestSource", "ShapesSource"]


# ----------------------------------------------------------------------------- generators (prompt -> RGBA)


class GeneratorSource:
    """Wraps any ``InstanceGenerator`` (``generate(prompts, seeds, negative_prompt)``)."""

    needs_prompts = True

    def __init__(self, generator: Any, negative_prompt: str | None = None, name: str | None = None):
        self.generator = generator
        self.negative_prompt = negative_prompt
        self.name = name or getattr(generator, "name", type(generator).__name__)

    def capacity(self, cls) -> int | None:  # noqa: ARG002
        return None

    def produce(self, units: list[WorkUnit]) -> list[Candidate]:
        prompts = [u.prompt or u.category for u in units]
        seeds = [u.seed for u in units]
        try:
            outs = self.generator.generate(prompts, seeds, negative_prompt=self.negative_prompt)
        except Exception as e:  # one failing batch must not end a long build: retry unit by unit
            if len(units) == 1:
                log.warning("generator %s failed on %s: %s", self.name, units[0].key, e)
                return [Candidate(units[0], None, error=f"generation_error: {type(e).__name__}")]
            return [c for u in units for c in self.produce([u])]
        if len(outs) != len(units):
            raise RuntimeError(f"generator {self.name} returned {len(outs)} instances for {len(units)} prompts")
        cands = []
        for u, g in zip(units, outs, strict=True):
            prov = dict(getattr(g, "provenance", None) or {})
            prov.setdefault("kind", self.name)
            prov.update(prompt=getattr(g, "prompt", u.prompt), seed=int(getattr(g, "seed", u.seed)))
            cands.append(Candidate(u, np.asarray(g.rgba), source=prov))
        return cands

    def close(self) -> None:
        close = getattr(self.generator, "close", None)
        if callable(close):
            close()


@register_source("layerdiffusion")
def _layerdiffusion(spec, config, device=None):  # noqa: ARG001
    try:
        from genval_aug.generation import LayerDiffusionGenerator
    except ImportError as e:
        raise ConfigError(f"source.kind: 'layerdiffusion' needs genval_aug.generation and the [gen] extra: {e}") from e
    params = dict(spec.params)
    negative = params.pop("negative_prompt", None)
    gen_kwargs = params.pop("generate", {}) or {}
    if device is not None:
        params["device"] = device
    params.setdefault("batch_size", spec.batch_size)
    if "base_model" not in params:
        raise ConfigError("source.params.base_model: missing (a diffusers model id or local path)")
    gen = LayerDiffusionGenerator.from_pretrained(params.pop("base_model"), **params)
    for k, v in gen_kwargs.items():      # e.g. num_inference_steps, guidance_scale, height, width
        if not hasattr(gen, k):
            raise ConfigError(f"source.params.generate.{k}: LayerDiffusionGenerator has no attribute {k!r}")
        setattr(gen, k, v)
    return GeneratorSource(gen, negative_prompt=negative, name="layerdiffusion")


# ----------------------------------------------------------------------------- shapes (deterministic renderer)


def _stable_int(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


class ShapesSource:
    """Deterministic renderer of simple anti-aliased RGBA shapes, one shape family per class.

    A real (if simple) plug-in source for smoke tests, demos and pipeline benchmarks without a GPU:
    the instance depends only on (category, seed), so ids are reproducible across runs, processes and
    ranks. ``bad_fraction`` of the units come out deliberately flawed (cut by the image border or
    tiny) so the pre-filters have something to reject.
    """

    needs_prompts = False
    name = "shapes"

    def __init__(self, size: int = 64, bad_fraction: float = 0.0, delay: float = 0.0):
        if size < 16:
            raise ConfigError(f"source.params.size: expected >= 16, got {size}")
        if not 0.0 <= bad_fraction <= 1.0:
            raise ConfigError(f"source.params.bad_fraction: expected 0..1, got {bad_fraction}")
        self.size = int(size)
        self.bad_fraction = float(bad_fraction)
        self.delay = float(delay)           # seconds per instance, to emulate a slow generator

    def capacity(self, cls) -> int | None:  # noqa: ARG002
        return None

    def render(self, category: str, seed: int) -> tuple[np.ndarray, bool]:
        rng = np.random.default_rng(_stable_int("shapes", category, seed))
        s = self.size
        ss = 4 * s                                     # supersample for a soft edge
        family = _stable_int("family", category) % 4
        bad = bool(rng.random() < self.bad_fraction)
        mask = np.zeros((ss, ss), np.uint8)
        r = rng.uniform(0.22, 0.38) * ss
        cx, cy = (ss / 2 + rng.uniform(-0.06, 0.06) * ss for _ in range(2))
        if bad:
            if rng.random() < 0.5:
                cx = ss * 0.98                         # cut by the border
            else:
                r = ss * 0.02                          # tiny
        if family == 0:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.5, 1.0))),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif family == 1:
            box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.4, 1.0)), float(rng.uniform(0, 90))))
            cv2.fillPoly(mask, [box.astype(np.int32)], 255, cv2.LINE_AA)
        else:
            k = 3 if family == 2 else int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k)) if family == 3 else np.arange(k) * 2 * np.pi / k
            rad = r * (rng.uniform(0.6, 1.0, k) if family == 3 else 1.0)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        alpha = cv2.resize(mask, (s, s), interpolation=cv2.INTER_AREA)
        base = rng.integers(40, 216, 3).astype(np.float32)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        shade = (0.75 + 0.5 * (0.6 * xx + 0.4 * yy))[..., None]
        noise = rng.normal(0.0, 6.0, (s, s, 3)).astype(np.float32)
        rgb = np.clip(base * shade + noise, 0, 255).astype(np.uint8)
        return np.dstack([rgb, alpha]), bad

    def produce(self, units: list[WorkUnit]) -> list[Candidate]:
        if self.delay:
            import time

            time.sleep(self.delay * len(units))
        out = []
        for u in units:
            rgba, bad = self.render(u.category, u.seed)
            out.append(Candidate(u, rgba, source={"kind": "shapes", "seed": int(u.seed), "flawed": bad}))
        return out


@register_source("shapes")
def _shapes(spec, config, device=None):  # noqa: ARG001
    return ShapesSource(**spec.params)


# ----------------------------------------------------------------------------- folder import


class FolderSource:
    """RGBA images from ``<root>/<category>/<pattern>`` (default ``*.png``), one unit per file.

    Units are named by the file's path relative to the class folder (:meth:`unit_names`); the build
    pipeline numbers them by first appearance and stores that numbering in the bank, so files added
    later, wherever they sort, become new units and a re-run or the top-up worker imports exactly them.
    The folder is listed again on every call (a long-lived worker sees new files). A unit without a
    name (direct use outside the pipeline) is the ``index``-th file in sorted order.
    Images without alpha get an opaque alpha (the pre-filters then reject them as full-frame).
    """

    needs_prompts = False
    name = "folder"

    def __init__(self, root: str | Path, pattern: str = "*.png"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"source.params.root: folder {self.root} not found")
        self.pattern = pattern

    def files(self, category: str) -> list[Path]:
        d = self.root / category
        return sorted(p for p in d.glob(self.pattern) if p.is_file()) if d.is_dir() else []

    def unit_names(self, cls) -> list[str]:
        d = self.root / cls.name
        return [p.relative_to(d).as_posix() for p in self.files(cls.name)]

    def unit_name_of(self, category: str, source: dict[str, Any]) -> str | None:
        """Name of the file a record came from (its ``source.path``), for banks built before numberings."""
        path = source.get("path")
        if not isinstance(path, str):
            return None
        p = Path(path)
        try:
            return p.relative_to(self.root / category).as_posix()
        except ValueError:   # the folder moved since: the path below the class folder's name
            parts = p.parts
            return "/".join(parts[parts.index(category) + 1:]) if category in parts[:-1] else p.name

    def capacity(self, cls) -> int | None:
        return len(self.files(cls.name))

    def produce(self, units: list[WorkUnit]) -> list[Candidate]:
        out = []
        listing: dict[str, list[Path]] = {}
        for u in units:
            if u.name is not None:
                path = self.root / u.category / u.name
                if not u.name or not path.is_file():
                    out.append(Candidate(u, None, error="folder_file_missing"))
                    continue
            else:
                files = listing.setdefault(u.category, self.files(u.category))
                if u.index >= len(files):
                    out.append(Candidate(u, None, error="folder_index_out_of_range"))
                    continue
                path = files[u.index]
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 3 or img.shape[2] not in (3, 4):
                log.warning("folder source: %s is not a colour image; skipped", path)
                out.append(Candidate(u, None, error="unreadable_image"))
                continue
            if img.shape[2] == 3:
                img = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
            rgba = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
            out.append(Candidate(u, rgba, source={"kind": "folder", "path": str(path)}))
        return out


@register_source("folder")
def _folder(spec, config, device=None):  # noqa: ARG001
    if "root" not in spec.params:
        raise ConfigError("source.params.root: missing (a folder with one sub-folder per class)")
    return FolderSource(**spec.params)


# ----------------------------------------------------------------------------- harvest (labeled datasets)


class _Spill:
    """Duck-typed BankWriter for the harvester: kept crops go to a scratch LMDB bank on disk, and only
    their record ids stay in memory, per class in dataset order (the harvester drops duplicates)."""

    def __init__(self, writer: Any):
        self._w = writer
        self.codec = writer.codec
        self.order: dict[str, list[str]] = {}

    @property
    def added(self) -> int:
        return self._w.added

    @property
    def duplicates(self) -> int:
        return self._w.duplicates

    def add(self, rgba, *, category, category_id=None, source=None, verdict=None):  # noqa: ARG002
        rid = self._w.add(rgba, category=category, category_id=category_id, source=source)
        self.order.setdefault(category, []).append(rid)
        return rid

    def add_encoded(self, meta, image):   # harvest workers encode the records themselves
        rid = self._w.add_encoded(meta, image)
        self.order.setdefault(meta["category"], []).append(rid)
        return rid

    def flush(self):
        self._w.flush()

    def add_rejected(self, *a, **k):
        pass

    def record_rejections(self, reasons):
        pass

    def set_size_prior(self, category, prior):
        pass

    def set_status(self, name, status):
        pass


class HarvestSource:
    """Real instances cut out of a labeled dataset (YOLO-seg, COCO, VOC, YOLO boxes via GrabCut).

    Unit ``i`` of a class is its ``i``-th kept instance in dataset order. Class names must match the
    dataset's (``classes.names`` or the category table). Bounded memory: only the classes the build
    asks for (:meth:`prepare`, called by the pipeline with the classes below target) are cut out, in
    one pass of :class:`genval_aug.harvest.core.Harvester` over the dataset per call with new classes;
    the kept crops are spilled to a scratch bank under ``spill_dir`` (default: a temporary folder,
    removed by :meth:`close`) and read back per unit, so memory holds record ids, not pixels.
    """

    needs_prompts = False
    name = "harvest"

    def __init__(self, data: str | Path, format: str = "auto", split: str | None = None,
                 spill_dir: str | Path | None = None, **harvest_options: Any):
        try:
            from genval_aug.harvest.core import HarvestConfig, Harvester
            from genval_aug.harvest.formats import open_source
        except ImportError as e:
            raise ConfigError(f"source.kind: 'harvest' needs genval_aug.harvest: {e}") from e
        self.data = str(data)
        try:
            self._hcfg = HarvestConfig(**harvest_options)
        except TypeError as e:
            raise ConfigError(f"source.params: {e}") from e
        self._source = open_source(self.data, format=format, split=split)
        if self._hcfg.classes is not None:   # an unknown class in the option fails now, naming it
            Harvester(self._hcfg)._class_filter(self._source)
        self._spill_parent = str(spill_dir) if spill_dir is not None else None
        self._spill_path: str | None = None
        self._cleanup: Any = None
        self._bank: Any = None
        self._order: dict[str, list[str]] = {}     # class -> record ids of its kept crops, dataset order
        self._done: set[str] = set()               # classes harvested already (kept crops or none)
        self.report = None                         # the latest pass's HarvestReport

    def _class_ids(self, names: set[str]) -> list[int]:
        """Dataset class ids of ``names`` (nameless YOLO datasets: the names are the ids), narrowed to the
        ``classes`` harvest option when it is given."""
        known = self._source.names
        ids = [i for i, n in known.items() if n in names] if known else [int(n) for n in names if n.isdigit()]
        user = self._hcfg.classes
        if user is not None:
            allowed = {str(c) for c in user}
            ids = [i for i in ids if str(i) in allowed or known.get(i) in allowed]
        return sorted(ids)

    def _spill_dir(self) -> str:
        if self._spill_path is None:
            import shutil
            import tempfile
            import weakref

            if self._spill_parent is not None:
                Path(self._spill_parent).mkdir(parents=True, exist_ok=True)
            root = tempfile.mkdtemp(prefix="genval-harvest-spill-", dir=self._spill_parent)
            self._spill_path = str(Path(root) / "crops.lmdb")
            self._cleanup = weakref.finalize(self, shutil.rmtree, root, True)
        return self._spill_path

    def prepare(self, classes) -> None:
        """Cut out the kept instances of ``classes`` (ClassSpecs or names) not harvested yet, in one pass."""
        import dataclasses

        from genval_aug.bank import BankWriter, InstanceBank
        from genval_aug.harvest.core import Harvester

        names = {getattr(c, "name", c) for c in classes} - self._done
        if not names:
            return
        ids = self._class_ids(names)
        if not ids:
            self._done |= names
            return
        path = self._spill_dir()
        if self._bank is not None:
            self._bank.close()
            self._bank = None
        writer = BankWriter(path, batch_size=32)   # pending crops are held until a commit
        spill = _Spill(writer)
        try:
            self.report = Harvester(dataclasses.replace(self._hcfg, classes=ids)).run(self._source, spill)
        finally:
            writer.close()
            self._bank = InstanceBank(path, refresh_interval=None)   # earlier classes stay readable
        for cat, rids in spill.order.items():
            self._order.setdefault(cat, []).extend(rids)
        self._done |= names                        # only after a complete pass (a failed one is redone)
        log.info("harvest source %s: %d instances of %d classes (spilled to %s)", self.data,
                 sum(len(spill.order.get(n, ())) for n in names), len(names), path)

    def capacity(self, cls) -> int | None:
        self.prepare([cls])
        return len(self._order.get(cls.name, ()))

    def produce(self, units: list[WorkUnit]) -> list[Candidate]:
        self.prepare(sorted({u.category for u in units}))
        out = []
        for u in units:
            rids = self._order.get(u.category, [])
            if u.index >= len(rids):
                out.append(Candidate(u, None, error="harvest_index_out_of_range"))
                continue
            inst = self._bank.get(rids[u.index])
            prov = dict(inst.meta.get("source") or {})
            prov.setdefault("kind", "harvest")
            out.append(Candidate(u, inst.rgba, source=prov))
        return out

    def close(self) -> None:
        """Remove the scratch bank."""
        if self._bank is not None:
            self._bank.close()
            self._bank = None
        if self._cleanup is not None:
            self._cleanup()
        self._spill_path = None
        self._order.clear()
        self._done.clear()


@register_source("harvest")
def _harvest(spec, config, device=None):  # noqa: ARG001
    if "data" not in spec.params:
        raise ConfigError("source.params.data: missing (a YOLO-seg yaml/folder, COCO json or VOC root)")
    return HarvestSource(**spec.params)
