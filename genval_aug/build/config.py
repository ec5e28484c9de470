"""Bank-build configuration: YAML -> validated dataclasses.

Every error raised here is a :class:`~genval_aug.errors.ConfigError` naming the file and the field
(``build.yaml: classes.groups.r: expected an integer >= 0, got 'many'``).

Example (see ``examples/build_lvis_rare.yaml``)::

    name: lvis-rare
    seed: 0
    output: {bank: cache/lvis_rare.lmdb}
    classes:
      table: lvis_v1_categories.json     # or `names: [dog, cat]` with `target: 100`
      groups: {r: 1000}                  # every rare class to >= 1000 instances
    prompts: {kind: template, n: 16}
    source: {kind: layerdiffusion, batch_size: 8, params: {base_model: ...}}
    validator: {kind: agent, backend: {kind: openai, model: ...}}
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genval_aug.class_map import load_category_table
from genval_aug.errors import ConfigError

__all__ = [
    "BuildConfig",
    "ClassSpec",
    "ComponentSpec",
    "OutputSpec",
    "PipelineSpec",
    "PromptSpec",
    "WorkerSpec",
    "load_config",
    "parse_config",
]

DEFAULT_TEMPLATES = (
    "a photo of a single {name}, {definition}, full view, centered, plain background",
)


@dataclass(frozen=True)
class ClassSpec:
    """One category to build: its name, id, target (minimum instance count) and prompt hints."""

    name: str
    target: int
    category_id: int | None = None
    definition: str | None = None
    synonyms: tuple[str, ...] = ()
    group: str | None = None


@dataclass
class ComponentSpec:
    """A pluggable component: registry ``kind`` (or ``"module:factory"``), batch size and free params."""

    kind: str
    batch_size: int = 4
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSpec:
    kind: str = "template"              # "template" | "agent" | registered name | "module:factory"
    n: int = 8                          # prompts per class; unit i uses prompt i % n
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    params: dict[str, Any] = field(default_factory=dict)   # e.g. backend spec, prompt_version


@dataclass
class OutputSpec:
    bank: str


@dataclass
class PipelineSpec:
    queue_size: int = 2                 # bounded queues between stages (in batches)
    overgenerate: float = 1.0           # units scheduled per round = ceil(deficit * overgenerate)
    max_units_per_round: int = 4096     # per class
    max_attempts_factor: float = 20.0   # give a class up after target * factor units
    progress: bool = True
    rank_timeout: float = 600.0         # torchrun builds: rank 0 gives up on a rank silent this many seconds


@dataclass
class WorkerSpec:
    poll_interval: float = 5.0          # seconds between checks once all targets are met
    topup_step: int = 8                 # extra instances for each of the most-drawn classes
    most_drawn_top_k: int = 0           # 0 = only fill deficits
    max_extra_per_class: int = 256      # cap of the most-drawn raise per class
    draws_dir: str | None = None        # default: <bank>.draws/


@dataclass
class BuildConfig:
    name: str
    output: OutputSpec
    classes: list[ClassSpec]
    source: ComponentSpec
    prompts: PromptSpec = field(default_factory=PromptSpec)
    validator: ComponentSpec = field(default_factory=lambda: ComponentSpec(kind="none"))
    prefilter: dict[str, Any] | None = field(default_factory=dict)   # QualityRules kwargs; None = off
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)
    worker: WorkerSpec = field(default_factory=WorkerSpec)
    seed: int = 0
    path: str | None = None             # the YAML file it came from (for messages)

    def targets(self) -> dict[str, int]:
        return {c.name: c.target for c in self.classes}

    def class_spec(self, name: str) -> ClassSpec:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing helpers


class _Ctx:
    def __init__(self, where: str, base_dir: Path):
        self.where = where
        self.base_dir = base_dir

    def fail(self, fld: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: {fld}: {msg}")

    def mapping(self, value: Any, fld: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(fld, f"expected a mapping, got {type(value).__name__}")
        return value

    def check_keys(self, d: dict[str, Any], fld: str, allowed: set[str]) -> None:
        unknown = sorted(set(d) - allowed)
        if unknown:
            prefix = f"{fld}." if fld else ""
            raise self.fail(f"{prefix}{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def int_(self, value: Any, fld: str, lo: int | None = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(fld, f"expected an integer{f' >= {lo}' if lo is not None else ''}, got {value!r}")
        if lo is not None and value < lo:
            raise self.fail(fld, f"expected an integer >= {lo}, got {value}")
        return value

    def float_(self, value: Any, fld: str, lo: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(fld, f"expected a finite number{f' >= {lo}' if lo is not None else ''}, got {value!r}")
        if lo is not None and value < lo:
            raise self.fail(fld, f"expected a number >= {lo}, got {value}")
        return float(value)

    def section(self, raw: Any, fld: str, spec: type, *, lo: dict[str, float] | None = None,
                paths: tuple[str, ...] = ()) -> Any:
        """A flat dataclass section: unknown keys rejected, each given field checked by the type of its default
        (``lo``: lower bounds, ints default to >= 0; ``paths``: optional paths), the rest keeps the defaults."""
        d = self.mapping(raw, fld)
        fields = {f.name: f for f in dataclasses.fields(spec)}
        self.check_keys(d, fld, set(fields))
        lo = lo or {}
        kw: dict[str, Any] = {}
        for name, value in d.items():
            where, default = f"{fld}.{name}", fields[name].default
            if name in paths:
                kw[name] = self.path(value, where) if value else None
            elif isinstance(default, bool):
                kw[name] = self.bool_(value, where)
            elif isinstance(default, int):
                kw[name] = self.int_(value, where, lo=int(lo.get(name, 0)))
            elif isinstance(default, float):
                kw[name] = self.float_(value, where, lo=lo.get(name))
            else:
                kw[name] = value
        return spec(**kw)

    def bool_(self, value: Any, fld: str) -> bool:
        """true/false (0 and 1 too); a string such as "no" or "false" is an error, not a truthy value."""
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise self.fail(fld, f"expected true or false, got {value!r}")

    def str_(self, value: Any, fld: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(fld, f"expected a non-empty string, got {value!r}")
        return value

    def path(self, value: Any, fld: str) -> str:
        raw = os.path.expandvars(self.str_(value, fld))
        if "$" in raw:
            raise self.fail(fld, f"unset environment variable in {value!r}")
        p = Path(raw).expanduser()
        return str(p if p.is_absolute() else self.base_dir / p)


def _component(ctx: _Ctx, raw: Any, fld: str, default_kind: str | None = None) -> ComponentSpec:
    if isinstance(raw, str):
        raw = {"kind": raw}
    d = ctx.mapping(raw, fld)
    ctx.check_keys(d, fld, {"kind", "batch_size", "params"})
    kind = d.get("kind", default_kind)
    if kind is None:
        raise ctx.fail(f"{fld}.kind", "missing (name a registered kind or 'module:factory')")
    return ComponentSpec(
        kind=ctx.str_(kind, f"{fld}.kind"),
        batch_size=ctx.int_(d.get("batch_size", 4), f"{fld}.batch_size", lo=1),
        params=dict(ctx.mapping(d.get("params"), f"{fld}.params")),
    )


def _load_table(ctx: _Ctx, path: str, fld: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ctx.fail(fld, f"category table {p} not found")
    try:
        if p.suffix.lower() == ".csv":
            with p.open(newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) must not rename column 1
                rows = list(csv.DictReader(f))
            for r in rows:
                if isinstance(r.get("synonyms"), str):
                    r["synonyms"] = [s for s in r["synonyms"].split("|") if s]
        else:
            rows = load_category_table(p)
    except ConfigError as e:
        raise ctx.fail(fld, str(e)) from e
    except (OSError, ValueError, csv.Error) as e:
        raise ctx.fail(fld, f"cannot read category table {p}: {e}") from e
    if not isinstance(rows, list) or not rows:
        raise ctx.fail(fld, f"category table {p} holds no categories (expected a list or {{'categories': [...]}})")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("name"):
            raise ctx.fail(fld, f"category table {p}: entry {i} has no 'name'")
    return rows


_CLASS_ENTRY_KEYS = {"name", "target", "category_id", "id", "definition", "def", "synonyms", "group", "frequency"}


def _int_cell(value: Any) -> Any:
    """A CSV cell such as ``"12"`` as an int; anything else unchanged (checked by ``_Ctx.int_``)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value


def _classes(ctx: _Ctx, raw: Any) -> list[ClassSpec]:
    if isinstance(raw, list):
        raw = {"names": raw}
    d = ctx.mapping(raw, "classes")
    if not d:
        raise ctx.fail("classes", "missing (give `names: [...]` or `table: <file>`)")
    ctx.check_keys(d, "classes", {"names", "table", "target", "groups", "only", "targets", "limit"})
    if ("names" in d) == ("table" in d):
        raise ctx.fail("classes", "give exactly one of `names` or `table`")
    default_target = ctx.int_(d["target"], "classes.target") if "target" in d else None
    groups = {str(k): ctx.int_(v, f"classes.groups.{k}") for k, v in ctx.mapping(d.get("groups"), "classes.groups").items()}
    overrides = {str(k): ctx.int_(v, f"classes.targets.{k}") for k, v in ctx.mapping(d.get("targets"), "classes.targets").items()}

    rows: list[dict[str, Any]]
    if "names" in d:
        names = d["names"]
        if not isinstance(names, list) or not names:
            raise ctx.fail("classes.names", "expected a non-empty list")
        rows = []
        for i, n in enumerate(names):
            if isinstance(n, dict):
                if not n.get("name"):
                    raise ctx.fail(f"classes.names[{i}]", "entry has no 'name'")
                ctx.check_keys(n, f"classes.names[{i}]", _CLASS_ENTRY_KEYS)
                rows.append(dict(n))
            else:
                rows.append({"name": ctx.str_(n, f"classes.names[{i}]")})
    else:
        rows = _load_table(ctx, ctx.path(d["table"], "classes.table"), "classes.table")
    if "only" in d:
        only = d["only"]
        if not isinstance(only, list):
            raise ctx.fail("classes.only", "expected a list of names")
        known = {str(r["name"]) for r in rows}
        missing = [n for n in only if n not in known]
        if missing:
            raise ctx.fail("classes.only", f"unknown class {missing[0]!r}")
        keep = set(only)
        rows = [r for r in rows if r["name"] in keep]

    out: list[ClassSpec] = []
    seen: set[str] = set()
    src = "names" if "names" in d else "table"
    for r in rows:
        name = str(r["name"])
        if name in seen:
            raise ctx.fail("classes", f"class {name!r} listed twice")
        seen.add(name)
        group = r.get("frequency", r.get("group"))
        if name in overrides:
            target = overrides[name]
        elif r.get("target") not in (None, ""):
            target = ctx.int_(_int_cell(r["target"]), f"classes.{src}.{name}.target")
        elif group is not None and str(group) in groups:
            target = groups[str(group)]
        elif default_target is not None:
            target = default_target
        elif groups:
            target = 0          # group not listed: nothing to build for it
        else:
            raise ctx.fail("classes.target", f"no target for class {name!r} (set `target`, `groups` or `targets`)")
        id_key = "category_id" if "category_id" in r else "id"
        cid = r.get(id_key)
        if cid is not None and str(cid).strip() != "":
            cid = ctx.int_(_int_cell(cid), f"classes.{src}.{name}.{id_key}", lo=None)
        else:
            cid = None
        syn = r.get("synonyms") or ()
        syn = (syn,) if isinstance(syn, str) else syn
        if not isinstance(syn, (list, tuple)) or not all(isinstance(x, str) for x in syn):
            raise ctx.fail(f"classes.{src}.{name}.synonyms", f"expected a list of strings, got {syn!r}")
        definition = r.get("def") or r.get("definition")
        if definition is not None and not isinstance(definition, str):
            raise ctx.fail(f"classes.{src}.{name}.definition", f"expected a string, got {definition!r}")
        out.append(ClassSpec(
            name=name,
            target=target,
            category_id=cid,
            definition=definition,
            synonyms=tuple(syn),
            group=str(group) if group is not None else None,
        ))
    unknown = sorted(set(overrides) - seen)
    if unknown:
        raise ctx.fail(f"classes.targets.{unknown[0]}", "not one of the configured classes")
    if "limit" in d:
        out = out[: ctx.int_(d["limit"], "classes.limit", lo=1)]
    if not any(c.target > 0 for c in out):
        raise ctx.fail("classes", "every class has target 0; nothing to build")
    return out


def _prefilter(ctx: _Ctx, raw: Any) -> dict[str, Any]:
    """``QualityRules`` keyword arguments, each key and type checked (``None`` turns a rule off)."""
    from genval_aug.quality import QualityRules

    d = dict(ctx.mapping(raw, "prefilter"))
    ctx.check_keys(d, "prefilter", {f.name for f in dataclasses.fields(QualityRules)})
    out: dict[str, Any] = {}
    for name, value in d.items():
        fld = f"prefilter.{name}"
        if name == "reject_border":
            out[name] = ctx.bool_(value, fld)
        elif name == "alpha_threshold":
            out[name] = ctx.int_(value, fld, lo=0)
        elif value is None:
            out[name] = None
        elif name in ("min_area", "min_side", "max_components"):
            out[name] = ctx.int_(value, fld, lo=0)
        elif name == "coverage":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ctx.fail(fld, f"expected [low, high] fractions, got {value!r}")
            out[name] = tuple(ctx.float_(v, f"{fld}[{i}]", lo=0.0) for i, v in enumerate(value))
        else:
            out[name] = ctx.float_(value, fld, lo=0.0)
    return out


def parse_config(raw: Any, *, where: str = "<config>", base_dir: str | Path = ".") -> BuildConfig:
    """Validate a parsed YAML mapping. Relative paths resolve against ``base_dir``."""
    ctx = _Ctx(where, Path(base_dir))
    d = ctx.mapping(raw, "<top level>")
    ctx.check_keys(d, "", {"name", "seed", "output", "classes", "prompts", "source", "validator",
                           "prefilter", "pipeline", "worker"})
    if "output" not in d:
        raise ctx.fail("output", "missing (need `output: {bank: path}`)")
    out_raw = d["output"] if not isinstance(d["output"], str) else {"bank": d["output"]}
    o = ctx.mapping(out_raw, "output")
    ctx.check_keys(o, "output", {"bank"})
    if "bank" not in o:
        raise ctx.fail("output.bank", "missing")
    output = OutputSpec(bank=ctx.path(o["bank"], "output.bank"))
    if "source" not in d:
        raise ctx.fail("source", "missing (e.g. `source: {kind: layerdiffusion, params: {...}}`)")

    p = ctx.mapping(d.get("prompts"), "prompts")
    ctx.check_keys(p, "prompts", {"kind", "n", "templates", "params"})
    templates = p.get("templates", list(DEFAULT_TEMPLATES))
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t for t in templates):
        raise ctx.fail("prompts.templates", "expected a non-empty list of strings")
    for i, t in enumerate(templates):
        try:
            t.format(name="x", definition="y", synonym="z")
        except (KeyError, IndexError, ValueError) as e:
            raise ctx.fail(f"prompts.templates[{i}]", f"bad placeholder {e} (use {{name}}, {{definition}}, {{synonym}})") from e
    prompts = PromptSpec(
        kind=ctx.str_(p.get("kind", "template"), "prompts.kind"),
        n=ctx.int_(p.get("n", 8), "prompts.n", lo=1),
        templates=tuple(templates),
        params=dict(ctx.mapping(p.get("params"), "prompts.params")),
    )

    pf = d.get("prefilter", {})
    if pf is not None and pf is not False:
        pf = _prefilter(ctx, pf)
    else:
        pf = None

    pipeline = ctx.section(d.get("pipeline"), "pipeline", PipelineSpec,
                           lo={"queue_size": 1, "overgenerate": 1.0, "max_units_per_round": 1,
                               "max_attempts_factor": 1.0, "rank_timeout": 1.0})
    worker = ctx.section(d.get("worker"), "worker", WorkerSpec, lo={"poll_interval": 0.0}, paths=("draws_dir",))
    return BuildConfig(
        name=ctx.str_(d.get("name", "default"), "name"),
        seed=ctx.int_(d.get("seed", 0), "seed"),
        output=output,
        classes=_classes(ctx, d.get("classes")),
        source=_component(ctx, d["source"], "source"),
        prompts=prompts,
        validator=_component(ctx, d.get("validator", "none"), "validator"),
        prefilter=pf,
        pipeline=pipeline,
        worker=worker,
        path=where if where != "<config>" else None,
    )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Read and validate a YAML build config. ``overrides`` (top-level keys) replace file values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if raw is None:
        raise ConfigError(f"{p}: empty config")
    if overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, where=str(p), base_dir=p.resolve().parent)
