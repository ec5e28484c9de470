"""Bank build pipeline (issue 9): config, resumable/idempotent builds, `bank build` CLI, plug-ins."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # genval_build_testplugins (also seen by spawned workers)

from genval_aug.bank import InstanceBank, verify  # noqa: E402
from genval_aug.build import BankBuilder, load_config, parse_config, register_source  # noqa: E402
from genval_aug.build.pipeline import scan_units  # noqa: E402
from genval_aug.build.sources import ShapesSource  # noqa: E402
from genval_aug.errors import ConfigError  # noqa: E402

PLUG = "genval_build_testplugins"


def write_cfg(tmp: Path, name: str = "b.yaml", **over) -> Path:
    cfg = {
        "name": "t",
        "seed": 3,
        "output": {"bank": "bank.lmdb"},
        "classes": {"names": ["mug", "kite", "shoe"], "target": 12},
        "source": {"kind": "shapes", "batch_size": 5, "params": {"size": 48, "bad_fraction": 0.25}},
        "validator": {"kind": f"{PLUG}:make_validator", "batch_size": 3, "params": {"keep_rate": 0.7}},
        "prefilter": {"reject_border": True},
        "pipeline": {"progress": False},
    }
    for k, v in over.items():
        cfg[k] = v
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def bank_units(path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in InstanceBank(path).iter_meta():
        out.setdefault(m["category"], []).append(m["source"]["unit"])
    return out


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tmp_path):
    base = yaml.safe_load(write_cfg(tmp_path).read_text())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "dict.json").write_text('{"categories": {"name": "x"}}')
    cases = [
        ({"classes": {"names": ["a"], "target": "many"}}, "classes.target"),
        ({"classes": {"names": ["a"], "target": 3, "targets": {"b": 1}}}, "classes.targets.b"),
        ({"source": {"kind": "shapes", "batch_size": 0}}, "source.batch_size"),
        ({"pipeline": {"overgenerate": 0.5}}, "pipeline.overgenerate"),
        ({"pipeline": {"queue_sise": 2}}, "pipeline.queue_sise"),
        ({"pipeline": {"queue_size": 0}}, "pipeline.queue_size"),
        ({"pipeline": {"max_units_per_round": 2.5}}, "pipeline.max_units_per_round"),
        ({"worker": {"poll_interval": -1}}, "worker.poll_interval"),
        ({"worker": {"topup_step": True}}, "worker.topup_step"),
        ({"worker": {"draws_dir": "$GENVAL_UNSET_VAR_X/d"}}, "worker.draws_dir"),
        ({"prompts": {"templates": ["a {nme}"]}}, "prompts.templates[0]"),
        ({"classes": {"table": "missing.json", "groups": {"r": 1}}}, "classes.table"),
        ({"classes": {"table": "broken.json"}}, "classes.table"),
        ({"classes": {"table": "dict.json"}}, "classes.table"),
    ]
    for over, fld in cases:
        with pytest.raises(ConfigError, match="b\\.yaml: " + re.escape(fld) + ":"):
            parse_config({**base, **over}, where="b.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="output"):
        parse_config({k: v for k, v in base.items() if k != "output"}, where="b.yaml")
    # flat sections: given fields checked and converted, the rest keep the dataclass defaults
    cfg = parse_config({**base, "pipeline": {"queue_size": 3, "overgenerate": 2, "progress": 0},
                        "worker": {"draws_dir": "draws", "poll_interval": 1}}, where="b.yaml", base_dir=tmp_path)
    assert (cfg.pipeline.queue_size, cfg.pipeline.overgenerate, cfg.pipeline.progress) == (3, 2.0, False)
    assert isinstance(cfg.pipeline.overgenerate, float) and cfg.pipeline.max_units_per_round == 4096
    assert cfg.worker.draws_dir == str(tmp_path / "draws") and cfg.worker.poll_interval == 1.0
    assert cfg.worker.topup_step == 8 and parse_config(base, where="b.yaml", base_dir=tmp_path).worker.draws_dir is None
    # unknown plug-in kinds are reported with the registered names
    cfg = parse_config({**base, "source": {"kind": "nope"}}, where="b.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"source\.kind: unknown kind 'nope' \(registered: .*layerdiffusion"):
        BankBuilder(cfg)._component("source")


def test_config_rejects_nan_strings_as_bools_typos_and_names_the_file_on_component_errors(tmp_path):
    # NaN/inf passed `value < lo` and crashed the run (math.ceil(nan)); "no" was bool("no") = True; a typo in
    # an inline class entry or in prefilter was ignored or failed only at build time; component errors
    # (unknown kind, bad params, backend spec) did not name the config file
    base = yaml.safe_load(write_cfg(tmp_path).read_text())
    agent = {"kind": "agent", "params": {"backend": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}}}
    cases = [
        ({"pipeline": {"overgenerate": float("nan")}}, "pipeline.overgenerate"),
        ({"pipeline": {"max_attempts_factor": float("inf")}}, "pipeline.max_attempts_factor"),
        ({"worker": {"poll_interval": float("nan")}}, "worker.poll_interval"),
        ({"pipeline": {"progress": "no"}}, "pipeline.progress"),
        ({"classes": {"names": [{"name": "mug", "targt": 5}], "target": 2}}, "classes.names[0].targt"),
        ({"classes": {"names": [{"name": "mug", "definition": 5}], "target": 2}}, "classes.names.mug.definition"),
        ({"prefilter": {"min_aera": 5}}, "prefilter.min_aera"),
        ({"prefilter": {"min_area": "big"}}, "prefilter.min_area"),
        ({"prefilter": {"coverage": [0.1]}}, "prefilter.coverage"),
        ({"prefilter": {"reject_border": "yes"}}, "prefilter.reject_border"),
    ]
    for over, fld in cases:
        with pytest.raises(ConfigError, match="b\\.yaml: " + re.escape(fld) + ":"):
            parse_config({**base, **over}, where="b.yaml", base_dir=tmp_path)
    ok = parse_config({**base, "prefilter": {"min_area": None, "coverage": [0.1, 0.9], "reject_border": True}},
                      where="b.yaml", base_dir=tmp_path)
    assert ok.prefilter == {"min_area": None, "coverage": (0.1, 0.9), "reject_border": True}
    build_cases = [
        ({"source": {"kind": "shapes", "params": {"sise": 48}}}, "source", r"source\.params: 'shapes' rejected"),
        ({"validator": {"kind": "nope"}}, "validator", r"validator\.kind: unknown kind"),
        ({"validator": {**agent, "params": {"backend": "openai"}}}, "validator",
         r"validator\.params\.backend: expected a mapping"),
        ({"validator": {**agent, "params": {"backend": {**agent["params"]["backend"], "timeout": "fast"}}}},
         "validator", r"validator\.params\.backend: backend 'openai' rejected its parameters"),
        ({"validator": {**agent, "params": {"backend": {**agent["params"]["backend"], "max_retries": -1}}}},
         "validator", r"validator\.params\.backend: max_retries must be >= 0"),
        ({"validator": {**agent, "params": {"backend": {"kind": "nope", "model": "m"}}}}, "validator",
         r"validator\.params\.backend: backend kind must be one of"),
    ]
    for over, comp, pat in build_cases:
        cfg = parse_config({**base, **over}, where="b.yaml", base_dir=tmp_path)
        with pytest.raises(ConfigError, match="^b\\.yaml: " + pat):
            BankBuilder(cfg)._component(comp)


def test_lvis_table_with_frequency_groups(shared_data, tmp_path):
    table = shared_data / "lvis_v1_categories.json"
    cfg = parse_config({
        "output": {"bank": "x.lmdb"},
        "classes": {"table": str(table), "groups": {"r": 1000, "c": 100}, "targets": {"aerosol_can": 7}},
        "source": "shapes",
    }, where="lvis.yaml", base_dir=tmp_path)
    by = {c.name: c for c in cfg.classes}
    assert len(by) == 1203
    groups = json.loads(table.read_text())["counts"]
    assert sum(c.target == 1000 for c in cfg.classes) == groups["r"]
    assert sum(c.target == 0 for c in cfg.classes) == groups["f"]
    assert by["aerosol_can"].target == 7 and by["aerosol_can"].category_id == 1
    assert by["aerosol_can"].definition and "spray_can" in by["aerosol_can"].synonyms


# ----------------------------------------------------------------------------- builds


def test_build_is_deterministic_resumable_and_idempotent(tmp_path):
    cfg_path = write_cfg(tmp_path)
    cfg = load_config(cfg_path)
    # reference: one uninterrupted build
    ref = BankBuilder(cfg, bank=tmp_path / "ref.lmdb").run()
    assert ref.total_added == 36 and not any(ref.deficits.values())
    assert ref.rejected["validator:plausible"] > 0 and any(k.startswith("prefilter:") for k in ref.rejected)
    ref_ids = set(InstanceBank(tmp_path / "ref.lmdb").ids())

    # interrupted after 3 commits, with other batch sizes; then resumed
    commits = []

    def stop_after_three(builder, status):
        commits.append(status)

    cfg2 = load_config(cfg_path)
    cfg2.source.batch_size, cfg2.validator.batch_size = 2, 1
    import threading

    stop = threading.Event()
    b = BankBuilder(cfg2, bank=tmp_path / "resumed.lmdb",
                    on_commit=lambda bl, st: (commits.append(st), len(commits) >= 3 and stop.set()))
    part = b.run(stop=stop)
    assert part.stopped and 0 < part.total_added < 36
    held = InstanceBank(tmp_path / "resumed.lmdb").get_status("build:t")
    assert held["state"] == "stopped" and held["missing"] == 36 - part.total_added
    rest = BankBuilder(load_config(cfg_path), bank=tmp_path / "resumed.lmdb").run()
    assert part.total_added + rest.total_added == 36
    assert set(InstanceBank(tmp_path / "resumed.lmdb").ids()) == ref_ids      # same instances, no duplicates
    units = bank_units(tmp_path / "resumed.lmdb")
    assert all(len(v) == len(set(v)) == 12 for v in units.values())
    # kept + rejected units: the same contiguous prefix 0..k as the uninterrupted build (nothing skipped,
    # nothing done twice)
    settled = scan_units(InstanceBank(tmp_path / "resumed.lmdb"), "t")
    assert settled == scan_units(InstanceBank(tmp_path / "ref.lmdb"), "t")
    assert all(idx == set(range(max(idx) + 1)) for idx in settled.values())
    assert verify(tmp_path / "resumed.lmdb").ok

    # a finished config does nothing, not even building its components
    def explode(*a, **k):
        raise AssertionError("components of a finished build must not be built")

    register_source("exploding", explode)
    finished = load_config(write_cfg(tmp_path, "b3.yaml", source={"kind": "exploding"}))
    again = BankBuilder(finished, bank=tmp_path / "ref.lmdb").run()
    assert again.units == 0 and again.total_added == 0
    assert set(InstanceBank(tmp_path / "ref.lmdb").ids()) == ref_ids
    with pytest.raises(AssertionError, match="must not be built"):   # ... which it would with work to do
        BankBuilder(finished, bank=tmp_path / "empty.lmdb").run()


def test_targets_count_existing_instances(tmp_path):
    cfg = load_config(write_cfg(tmp_path))
    from genval_aug.bank import BankWriter

    src = ShapesSource(size=48)
    with BankWriter(tmp_path / "pre.lmdb") as w:   # 10 harvested mugs already there
        for s in range(10):
            w.add(src.render("mug", 1000 + s)[0], category="mug", source={"kind": "harvest"})
    r = BankBuilder(cfg, bank=tmp_path / "pre.lmdb").run()
    assert r.added["mug"] == 2 and r.added["kite"] == 12 and r.added["shoe"] == 12
    assert InstanceBank(tmp_path / "pre.lmdb").categories() == {"mug": 12, "kite": 12, "shoe": 12}


def test_attempt_limit_gives_up_instead_of_looping(tmp_path):
    cfg = load_config(write_cfg(tmp_path, validator={"kind": f"{PLUG}:make_validator", "params": {"keep_rate": 0.0}},
                                pipeline={"progress": False, "max_attempts_factor": 2.0}))
    r = BankBuilder(cfg, bank=tmp_path / "none.lmdb").run()
    assert r.total_added == 0 and sorted(r.gave_up) == ["kite", "mug", "shoe"]
    assert r.units == 3 * 24          # target 12 x factor 2 per class, then stop
    assert r.deficits == {"mug": 12, "kite": 12, "shoe": 12}


def _bank_cli(argv):
    from genval_aug.cli.bank_build import add_bank_commands

    parser = argparse.ArgumentParser(prog="genval-aug")
    sub = parser.add_subparsers(dest="command")
    bank = sub.add_parser("bank").add_subparsers(dest="bank_command")
    add_bank_commands(bank)
    args = parser.parse_args(argv)
    return args.func(args)


def test_bank_build_cli_end_to_end_with_tiny_random_generator(tmp_path, capsys):
    import genval_build_testplugins as plug

    cfg = write_cfg(
        tmp_path,
        source={"kind": f"{PLUG}:make_tiny_generator", "batch_size": 4, "params": {"size": 48}},
        prompts={"kind": f"{PLUG}:make_prompts", "n": 3},
        classes={"names": ["mug", "kite"], "target": 6},
    )
    plug.CountingPrompts.calls = 0
    assert _bank_cli(["bank", "build", "--config", str(cfg), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["added"] == 12 and rep["deficits"] == {"mug": 0, "kite": 0}
    assert rep["stages"]["generate"]["items"] == rep["units"] >= 12
    assert plug.CountingPrompts.calls == 2       # once per class, then cached in the bank
    bank = InstanceBank(tmp_path / "bank.lmdb")
    metas = list(bank.iter_meta())
    assert {m["source"]["kind"] for m in metas} == {"tiny-random"}
    assert all(m["source"]["prompt"].startswith("a photo of a ") for m in metas)
    assert all(m["verdict"]["model"] == "hash-validator" for m in metas)
    assert bank.get_status("prompts:t:mug")["prompts"][2] == "a photo of a mug, variant 2"
    ids = sorted(bank.ids())
    stats = bank.stats(refresh=True)

    assert _bank_cli(["bank", "build", "--config", str(cfg)]) == 0      # second run: nothing to do
    assert "units processed: 0   added: 0" in capsys.readouterr().out
    assert sorted(InstanceBank(tmp_path / "bank.lmdb").ids()) == ids
    assert InstanceBank(tmp_path / "bank.lmdb").stats(refresh=True) == stats
    assert plug.CountingPrompts.calls == 2

    # resumed with prompts from the bank cache: raise a target, prompts are not regenerated
    cfg2 = write_cfg(
        tmp_path, "b2.yaml",
        source={"kind": f"{PLUG}:make_tiny_generator", "batch_size": 4, "params": {"size": 48}},
        prompts={"kind": f"{PLUG}:make_prompts", "n": 3},
        classes={"names": ["mug", "kite"], "target": 6, "targets": {"kite": 9}},
    )
    assert _bank_cli(["bank", "build", "--config", str(cfg2), "--dry-run"]) == 0
    assert "kite: 3" in capsys.readouterr().out
    assert _bank_cli(["bank", "build", "--config", str(cfg2)]) == 0
    assert InstanceBank(tmp_path / "bank.lmdb").categories() == {"mug": 6, "kite": 9}
    assert plug.CountingPrompts.calls == 2
    assert verify(tmp_path / "bank.lmdb").ok


def test_folder_source_and_registry_kinds(tmp_path):
    import cv2

    from genval_aug.build.registry import registered

    assert {"layerdiffusion", "harvest", "folder", "shapes"} <= set(registered("source"))
    src = ShapesSource(size=48)
    for cat in ("mug", "kite"):
        (tmp_path / "in" / cat).mkdir(parents=True)
        for i in range(4):
            rgba = src.render(cat, i)[0]
            cv2.imwrite(str(tmp_path / "in" / cat / f"{i}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    cfg = load_config(write_cfg(tmp_path, source={"kind": "folder", "params": {"root": str(tmp_path / "in")}},
                                validator="none", prefilter=None, classes={"names": ["mug", "kite"], "target": 10}))
    r = BankBuilder(cfg, bank=tmp_path / "f.lmdb").run()
    # only 4 files per class: the source is exhausted, the build says so instead of looping
    assert r.added == {"mug": 4, "kite": 4} and sorted(r.gave_up) == ["kite", "mug"]
    inst = InstanceBank(tmp_path / "f.lmdb").random_instance("mug", np.random.default_rng(0))
    assert inst.meta["source"]["kind"] == "folder" and inst.meta["source"]["path"].endswith(".png")


def test_harvest_source_fills_targets_from_a_real_dataset(coco128_seg, tmp_path):
    cfg = load_config(write_cfg(
        tmp_path, validator="none", prefilter=None,
        source={"kind": "harvest", "params": {"data": str(coco128_seg / "coco128-seg.yaml"), "max_images": 24}},
        classes={"names": ["person", "car", "zebra"], "target": 5}))
    r = BankBuilder(cfg, bank=tmp_path / "h.lmdb").run()
    bank = InstanceBank(tmp_path / "h.lmdb")
    assert bank.count("person") == 5 and r.added["person"] == 5
    metas = list(bank.iter_meta("person"))
    assert all(m["source"]["kind"] == "harvest" and m["source"]["build"] == "t" for m in metas)
    # classes the first 24 images do not hold enough of are reported, not looped on
    for name in ("car", "zebra"):
        assert bank.count(name) == 5 or name in r.gave_up


def test_example_lvis_config_is_valid(shared_data, monkeypatch):
    monkeypatch.setenv("LVIS_CATEGORIES", str(shared_data / "lvis_v1_categories.json"))
    cfg = load_config(Path(__file__).parents[1] / "examples" / "build_lvis_rare.yaml")
    rare = [c for c in cfg.classes if c.target > 0]
    assert len(rare) == 337 and all(c.group == "r" and c.target == 1000 for c in rare)
    assert cfg.source.kind == "layerdiffusion" and cfg.validator.kind == "agent"
    monkeypatch.delenv("LVIS_CATEGORIES")
    with pytest.raises(ConfigError, match=r"classes\.table: unset environment variable"):
        load_config(Path(__file__).parents[1] / "examples" / "build_lvis_rare.yaml")


def test_prompt_failure_gives_one_class_up_not_the_build(tmp_path):
    import genval_build_testplugins as plug

    cfg = load_config(write_cfg(
        tmp_path, source={"kind": f"{PLUG}:make_tiny_generator", "batch_size": 4, "params": {"size": 48}},
        prompts={"kind": f"{PLUG}:make_picky_prompts", "n": 2}, validator="none",
        classes={"names": ["mug", "kite", "shoe"], "target": 3}))
    plug.CountingPrompts.calls = 0
    r = BankBuilder(cfg, bank=tmp_path / "p.lmdb").run()
    assert plug.CountingPrompts.calls == 1                       # one batched call for all three classes
    assert r.added == {"mug": 3, "shoe": 3} and r.gave_up == ["kite"] and r.rejected["prompt_error"] == 1
    assert InstanceBank(tmp_path / "p.lmdb").get_status("prompts:t:kite") is None


def test_prompt_maker_returning_one_string_gives_one_prompt_not_its_characters(tmp_path):
    # list("a photo of a mug") made twelve one-letter prompts, cached in the bank for good
    class OneString:
        def prompts(self, cls, n):
            return f"a photo of a {cls.name}"

    class ManyStrings:
        def prompts_many(self, classes, n):
            return {c.name: f"a drawing of a {c.name}" for c in classes}

    for maker, want in ((OneString(), "a photo of a mug"), (ManyStrings(), "a drawing of a mug")):
        bank = tmp_path / f"{type(maker).__name__}.lmdb"
        cfg = load_config(write_cfg(tmp_path, source={"kind": f"{PLUG}:make_tiny_generator", "params": {"size": 48}},
                                    validator="none", prefilter=None, classes={"names": ["mug"], "target": 2}))
        BankBuilder(cfg, bank=bank, components={"prompts": maker}).run()
        assert InstanceBank(bank).get_status("prompts:t:mug")["prompts"] == [want]
        assert [m["source"]["prompt"] for m in InstanceBank(bank).iter_meta()] == [want, want]


def test_class_rows_from_csv_and_names_are_coerced_or_named_in_errors(tmp_path):
    """CSV cells are strings: a `target`/`id` column must work; a bad id or synonyms value is a ConfigError."""
    base = yaml.safe_load(write_cfg(tmp_path).read_text())
    (tmp_path / "t.csv").write_text("name,id,target,synonyms\ndog,1,5,hound|pup\ncat,,3,\n")
    cfg = parse_config({**base, "classes": {"table": "t.csv"}}, where="b.yaml", base_dir=tmp_path)
    by = {c.name: c for c in cfg.classes}
    assert (by["dog"].target, by["dog"].category_id, by["dog"].synonyms) == (5, 1, ("hound", "pup"))
    assert (by["cat"].target, by["cat"].category_id, by["cat"].synonyms) == (3, None, ())
    # a UTF-8 BOM (Excel's "CSV UTF-8") turned the first header into "\ufeffname": "entry 0 has no 'name'"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfname,target\nmug,4\n")
    assert [(c.name, c.target) for c in parse_config({**base, "classes": {"table": "bom.csv"}}, where="b.yaml",
                                                     base_dir=tmp_path).classes] == [("mug", 4)]
    (tmp_path / "bad.csv").write_text("name,id,target\ndog,1,lots\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: classes\.table\.dog\.target: "):
        parse_config({**base, "classes": {"table": "bad.csv"}}, where="b.yaml", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"b\.yaml: classes\.names\.dog\.id: .*'abc'"):
        parse_config({**base, "classes": {"names": [{"name": "dog", "id": "abc"}], "target": 2}},
                     where="b.yaml", base_dir=tmp_path)
    # a single synonym given as a string is one synonym, not its characters
    cfg = parse_config({**base, "classes": {"names": [{"name": "dog", "synonyms": "hound"}], "target": 2}},
                       where="b.yaml", base_dir=tmp_path)
    assert cfg.classes[0].synonyms == ("hound",)


def test_config_refuses_fields_the_build_does_not_use(tmp_path):
    """`output.commit_every` (the build commits once per batch) and `prompts.cache` (prompts are cached in the
    bank) used to be accepted and silently ignored; a field that does nothing must not look configurable."""
    base = yaml.safe_load(write_cfg(tmp_path).read_text())
    for over, fld in [({"output": {"bank": "b.lmdb", "commit_every": 8}}, "output.commit_every"),
                      ({"prompts": {"cache": "prompts.json"}}, "prompts.cache")]:
        with pytest.raises(ConfigError, match="b\\.yaml: " + re.escape(fld) + ": unknown field"):
            parse_config({**base, **over}, where="b.yaml", base_dir=tmp_path)


def test_dead_prompt_server_is_not_retried_class_by_class(tmp_path):
    """When the batched prompt call fails because the server is down (BackendError, after the backend's own
    bounded retries), asking again once per class only multiplies the wait (1,203 LVIS classes x retries):
    the build stops with the error instead of 'giving every class up'."""
    import genval_build_testplugins as plug

    from genval_aug.errors import BackendError

    cfg = load_config(write_cfg(
        tmp_path, source={"kind": f"{PLUG}:make_tiny_generator", "batch_size": 4, "params": {"size": 48}},
        prompts={"kind": f"{PLUG}:make_dead_server_prompts", "n": 2}, validator="none",
        classes={"names": ["mug", "kite", "shoe"], "target": 3}))
    plug.DeadServerPrompts.calls = 0
    with pytest.raises(BackendError, match="failed after 5 attempts"):
        BankBuilder(cfg, bank=tmp_path / "p.lmdb").run()
    assert plug.DeadServerPrompts.calls == 1


class _FlakyShapes:
    """Shapes, except units 0 mod 4 come out with an empty alpha (the bank refuses them), units 1 mod 4
    are source errors and units 2 mod 4 make the validator raise; every produced unit is counted."""

    name = "flaky"
    needs_prompts = False

    def __init__(self):
        self.shapes = ShapesSource(size=48)
        self.seen: list[tuple[str, int]] = []

    def capacity(self, cls):  # noqa: ARG002
        return None

    def produce(self, units):
        from genval_aug.build.registry import Candidate

        out = []
        for u in units:
            self.seen.append((u.category, u.index))
            rgba = self.shapes.render(u.category, u.seed)[0].copy()
            if u.index % 4 == 0:
                rgba[..., 3] = 0
            if u.index % 4 == 1:
                out.append(Candidate(u, None, error="source_error:RuntimeError"))
            else:
                out.append(Candidate(u, rgba, {"kind": "flaky", "mark": int(u.index % 4 == 2)}))
        return out


class _RaisesOnMarked:
    name = "raises"

    def validate(self, rgbas, categories):
        if any(int(r[0, 0, 0]) == 7 for r in rgbas):
            raise ValueError("cannot judge this one")
        return [{"keep": False, "criteria": {"plausible": False}} for _ in rgbas]


def test_units_with_no_storable_output_are_settled_not_regenerated_every_poll(tmp_path):
    cfg = load_config(write_cfg(tmp_path, prefilter=None, classes={"names": ["mug"], "target": 4},
                                source={"kind": "shapes", "batch_size": 1},
                                validator={"kind": "none", "batch_size": 1},
                                pipeline={"progress": False, "max_attempts_factor": 2.0}))
    src = _FlakyShapes()

    def produce(units):                       # mark units 2 mod 4 so the validator fails on them
        cands = _FlakyShapes.produce(src, units)
        for c in cands:
            if c.rgba is not None and c.source.get("mark"):
                c.rgba[0, 0, 0] = 7
            elif c.rgba is not None:
                c.rgba[0, 0, 0] = 0
        return cands

    src.produce = produce
    comps = {"source": src, "validator": _RaisesOnMarked()}
    bank = tmp_path / "flaky.lmdb"
    r1 = BankBuilder(cfg, bank=bank, components=comps).run()
    assert r1.units == 8 and r1.total_added == 0 and r1.gave_up == ["mug"]
    assert {"prefilter:empty_alpha", "source_error", "validator_error"} <= set(r1.rejected)
    assert scan_units(InstanceBank(bank), "t") == {"mug": set(range(8))}
    r2 = BankBuilder(cfg, bank=bank, components=comps).run()   # a worker's next poll: nothing to redo
    assert r2.units == 0 and len(src.seen) == 8 == len(set(src.seen))


def test_validator_server_down_stops_the_run_and_settles_nothing(tmp_path):
    from genval_aug.errors import BackendError

    class Down:
        name = "down"

        def validate(self, rgbas, categories):
            raise BackendError("POST http://127.0.0.1:9/v1/chat/completions failed after 5 attempts")

    cfg = load_config(write_cfg(tmp_path, prefilter=None, classes={"names": ["mug"], "target": 4}))
    bank = tmp_path / "down.lmdb"
    with pytest.raises(BackendError, match="failed after 5 attempts"):
        BankBuilder(cfg, bank=bank, components={"validator": Down()}).run()
    assert scan_units(InstanceBank(bank), "t") == {}            # a later run retries every unit
    st = InstanceBank(bank).get_status("build:t")                # it said "done" after the failed run
    assert st["state"] == "failed" and "failed after 5 attempts" in st["error"] and st["missing"] == 4


@pytest.mark.parametrize("stage", ["source", "validator"])
def test_config_error_while_working_stops_the_run_and_settles_nothing(tmp_path, stage):
    # a ConfigError (a model path that does not load, found lazily) was settled per unit: the run used up all
    # target * max_attempts_factor units of every class, and after the fix the class stayed given up for good
    class Broken:
        def validate(self, rgbas, categories):
            raise ConfigError("validator.params.model: /models/vlm not found")

        def produce(self, units):
            raise ConfigError("source.params.base_model: /models/sdxl not found")

        def capacity(self, spec):
            return None

    comps = {"validator": Broken()} if stage == "validator" else {"source": Broken()}
    cfg = load_config(write_cfg(tmp_path, prefilter=None, classes={"names": ["mug"], "target": 4}))
    bank = tmp_path / "cfg.lmdb"
    with pytest.raises(ConfigError, match="not found"):
        BankBuilder(cfg, bank=bank, components=comps).run()
    assert scan_units(InstanceBank(bank), "t") == {}
    r = BankBuilder(cfg, bank=bank).run()                          # once fixed, the build proceeds
    assert r.total_added == 4 and r.gave_up == []


@pytest.mark.parametrize("bad", [
    {"keep": "false", "score": 0.1}, {"keep": "no"}, {"keep": 1}, {"score": 1.0}, None, True, "keep",
    {"keep": True, "score": "high"}, {"keep": True, "score": float("nan")}, {"keep": True, "criteria": ["intact"]},
    {"keep": True, "score": 1.0, "extra": object()}, {"error": 5},
], ids=lambda b: repr(b)[:30])
def test_malformed_verdicts_are_errors_never_keeps_nor_crashes(tmp_path, bad):
    # keep="false" is truthy and was kept silently; None, a bool or a string crashed the writer
    class Odd:
        name = "odd"

        def validate(self, rgbas, categories):
            return [bad for _ in rgbas]

    cfg = load_config(write_cfg(tmp_path, prefilter=None, classes={"names": ["mug"], "target": 3}))
    bank = tmp_path / "odd.lmdb"
    r = BankBuilder(cfg, bank=bank, components={"validator": Odd()}).run()
    assert r.total_added == 0 and r.units > 0 and r.rejected_units == r.units
    reasons = InstanceBank(bank).get_status("unstored:t:mug")["reasons"]
    assert len(reasons) == r.units and all(x.startswith(("validator_error:bad_verdict", "5")) for x in reasons)


# ----------------------------------------------------------------------------- folder units keyed by file name


def _write_png(folder: Path, name: str, seed: int, cat: str = "mug") -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rgba = ShapesSource(size=48).render(cat, seed)[0]
    cv2.imwrite(str(folder / name), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    return folder / name


def _folder_cfg(tmp_path: Path, root: Path, names=("mug",)):
    return load_config(write_cfg(tmp_path, source={"kind": "folder", "batch_size": 2, "params": {"root": str(root)}},
                                 validator="none", prefilter=None, classes={"names": list(names), "target": 50}))


def _imported(bank_path) -> dict[str, list[str]]:
    """category -> file names the bank's records came from (one entry per record)."""
    out: dict[str, list[str]] = {}
    for m in InstanceBank(bank_path, refresh_interval=None).iter_meta():
        out.setdefault(m["category"], []).append(Path(m["source"]["path"]).name)
    return {k: sorted(v) for k, v in out.items()}


def test_folder_topup_imports_exactly_the_files_added_in_any_sort_position(tmp_path):
    """Files added later (sorting before, between and after the imported ones) are imported by a re-run
    of the same builder (as the top-up worker does) and by a fresh one; nothing twice, nothing retried."""
    mug = tmp_path / "in" / "mug"
    for name, seed in (("b.png", 1), ("d.png", 2)):
        _write_png(mug, name, seed)
    (mug / "c_broken.png").write_bytes(b"not a png")          # settled as unstored, never retried
    cfg = _folder_cfg(tmp_path, tmp_path / "in")
    bank = tmp_path / "f.lmdb"
    builder = BankBuilder(cfg, bank=bank)
    r = builder.run()
    assert r.units == 3 and r.added == {"mug": 2} and r.gave_up == ["mug"]
    for name, seed in (("a.png", 3), ("c.png", 4), ("e.png", 5)):   # before, between and after
        _write_png(mug, name, seed)
    r = builder.run()                                              # the worker reuses one builder
    assert r.units == 3 and r.added == {"mug": 3}
    assert _imported(bank) == {"mug": ["a.png", "b.png", "c.png", "d.png", "e.png"]}
    _write_png(mug, "0.png", 6)                                     # a fresh builder sees the stored numbering
    r = BankBuilder(cfg, bank=bank).run()
    assert r.units == 1 and r.added == {"mug": 1}
    assert BankBuilder(cfg, bank=bank).run().units == 0             # nothing new: nothing done
    assert _imported(bank)["mug"] == ["0.png", "a.png", "b.png", "c.png", "d.png", "e.png"]
    metas = list(InstanceBank(bank).iter_meta("mug"))
    units = {m["source"]["unit_name"]: m["source"]["unit"] for m in metas}
    assert units == {"b.png": 0, "d.png": 2, "a.png": 3, "c.png": 4, "e.png": 5, "0.png": 6}
    assert InstanceBank(bank).get_status("units:t:mug")["names"] == [
        "b.png", "c_broken.png", "d.png", "a.png", "c.png", "e.png", "0.png"]
    assert verify(bank).ok


def test_folder_bank_of_the_old_index_numbering_tops_up_without_duplicates(tmp_path):
    """A bank built when unit i was the i-th sorted file (no stored numbering): the numbering is rebuilt
    from the records' paths, and only files not imported yet are imported."""
    from genval_aug.bank import BankWriter
    from genval_aug.build.pipeline import unstored_key

    mug = tmp_path / "in" / "mug"
    b, d = _write_png(mug, "b.png", 1), _write_png(mug, "d.png", 2)
    (mug / "e_broken.png").write_bytes(b"not a png")
    src = ShapesSource(size=48)
    with BankWriter(tmp_path / "old.lmdb") as w:       # what the old scheme wrote for [b, d, e_broken]
        for unit, (path, seed) in enumerate([(b, 1), (d, 2)]):
            w.add(src.render("mug", seed)[0], category="mug",
                  source={"kind": "folder", "path": str(path), "build": "t", "unit": unit})
        w.set_status(unstored_key("t", "mug"), {"units": [2], "reasons": ["unreadable_image"]})
    _write_png(mug, "a.png", 3)
    _write_png(mug, "c.png", 4)
    r = BankBuilder(_folder_cfg(tmp_path, tmp_path / "in"), bank=tmp_path / "old.lmdb").run()
    # a and c imported; the broken file (whose old unit has no name) is tried once more, nothing else
    assert r.added == {"mug": 2} and r.units == 3 and r.duplicates == 0
    assert _imported(tmp_path / "old.lmdb") == {"mug": ["a.png", "b.png", "c.png", "d.png"]}
    names = InstanceBank(tmp_path / "old.lmdb").get_status("units:t:mug")["names"]
    assert names[:3] == ["b.png", "d.png", ""] and sorted(names[3:]) == ["a.png", "c.png", "e_broken.png"]
    r = BankBuilder(_folder_cfg(tmp_path, tmp_path / "in"), bank=tmp_path / "old.lmdb").run()
    assert r.units == 0


def test_harvest_source_spills_crops_and_cuts_out_only_requested_classes(coco128_seg, tmp_path):
    """Bounded memory: the kept crops live in a scratch bank on disk, memory holds only their ids; a pass
    cuts out only the classes asked for; the units are the same crops as a plain harvest, in order."""
    import tracemalloc

    from genval_aug.bank.record import content_id
    from genval_aug.build.registry import WorkUnit
    from genval_aug.build.sources import HarvestSource
    from genval_aug.harvest.core import HarvestConfig, harvest

    data = str(coco128_seg / "coco128-seg.yaml")
    src = HarvestSource(data, spill_dir=tmp_path / "spill")
    tracemalloc.start()
    try:
        src.prepare(["person", "car"])
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(src.report.per_class) == {"person", "car"}           # other classes were not cut out
    spill = InstanceBank(next((tmp_path / "spill").glob("*/crops.lmdb")), refresh_interval=None)
    pixels = sum(m["width"] * m["height"] * 4 for m in spill.iter_meta())
    # holding the crops in memory (as before) retains at least `pixels`; spilled: ids only (~1%), and the
    # peak is one image's work plus a 32-crop commit batch
    assert pixels > 8e6 and retained < pixels / 20 and peak < pixels, (pixels, retained, peak)

    plain = tmp_path / "plain.lmdb"
    harvest(data, plain, config=HarvestConfig())
    ref = InstanceBank(plain, refresh_interval=None)
    spec = parse_config({"name": "x", "output": {"bank": "b"}, "source": "shapes",
                         "classes": {"names": ["person", "zebra"], "target": 1}}).class_spec
    for name in ("person", "zebra"):                                # zebra: a second pass, later
        n = src.capacity(spec(name))
        assert n == ref.count(name) > 0
        cands = src.produce([WorkUnit(name, i, 0) for i in range(n)])
        assert [content_id(name, c.rgba) for c in cands] == list(ref.ids(name))   # same crops, dataset order
        assert all(c.source["image"] and c.source["kind"] == "harvest" for c in cands)
    src.close()
    assert not list((tmp_path / "spill").iterdir())                # the scratch bank is removed


def test_topup_worker_imports_files_dropped_into_the_folder_while_it_runs(tmp_path):
    """The worker keeps one builder (and one source) for its lifetime; files that appear between its
    cycles, sorting before and between the imported ones, are imported by the next cycle, once each."""
    from genval_aug.build import run_worker

    mug = tmp_path / "in" / "mug"
    _write_png(mug, "b.png", 1)
    _write_png(mug, "d.png", 2)

    class DropFilesWhileIdle:     # the worker's stop flag; its idle wait is where the files appear
        waits = 0

        def is_set(self) -> bool:
            return False

        def wait(self, timeout: float) -> bool:  # noqa: ARG002
            self.waits += 1
            if self.waits == 1:
                _write_png(mug, "a.png", 3)
                _write_png(mug, "c.png", 4)
            return False

    stop = DropFilesWhileIdle()
    status = run_worker(_folder_cfg(tmp_path, tmp_path / "in"), tmp_path / "w.lmdb", stop=stop, max_cycles=2,
                        poll_interval=0.0)
    assert stop.waits == 1 and status["total_added"] == 4 and status["cycles"] == 2
    assert _imported(tmp_path / "w.lmdb") == {"mug": ["a.png", "b.png", "c.png", "d.png"]}
