"""The ``genval-aug bank`` commands, run through the real entry point (main(argv)) on coco128-seg."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genval_aug.bank import InstanceBank
from genval_aug.cli import build_parser, main

SUBCOMMANDS = ["harvest", "stats", "show", "verify", "merge", "export", "import"]


@pytest.fixture(scope="module")
def harvested(coco128_seg, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bank = root / "coco128.lmdb"
    rc = main(["bank", "harvest", "--data", str(coco128_seg / "coco128-seg.yaml"), "--out", str(bank),
               "--max-images", "40", "--no-progress", "--report", str(root / "report.json")])
    assert rc == 0
    return root, bank


def cli_env() -> dict[str, str]:
    """Environment for running ``python -m genval_aug.cli`` from this checkout in a subprocess."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


def run_cli_expecting_one_error_line(argv: list[str], needle: str, cwd: Path) -> None:
    """The command exits 2 with exactly one stderr line, ``genval-aug: error: ...``, containing ``needle``."""
    proc = subprocess.run([sys.executable, "-m", "genval_aug.cli", *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=cli_env())
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("genval-aug: error:") and needle in lines[0], proc.stderr


def test_harvest_report_and_rerun_is_idempotent(harvested, coco128_seg, capsys):
    root, bank = harvested
    report = json.loads((root / "report.json").read_text())
    n = InstanceBank(bank).count()
    assert report["images"] == 40 and report["kept"] == n > 50
    not_kept = sum(report["rejected"].values()) + sum(report["bad_input"].values()) + sum(report["skipped"].values())
    assert report["annotations"] - not_kept - report["duplicates"] == n
    prior = InstanceBank(bank).size_prior("person")
    # the same harvest again adds nothing: every instance is already there (content ids)
    rc = main(["bank", "harvest", "--data", str(coco128_seg / "coco128-seg.yaml"), "--out", str(bank),
               "--max-images", "40", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "-> 0 instances kept" in out and f"duplicates (already in the bank): {n}" in out
    assert InstanceBank(bank).count() == n
    # rejection counts in the bank are those of the latest harvest of the dataset, not doubled
    stats = InstanceBank(bank).stats(refresh=True)
    for reason, k in report["rejected"].items():
        assert stats["rejections"][reason] == k
    again = InstanceBank(bank).size_prior("person")  # and its size prior is not counted twice
    assert again["n"] == prior["n"] and again["rel_sqrt_area_mean"] == pytest.approx(prior["rel_sqrt_area_mean"])
    assert again["aspect_std"] == pytest.approx(prior["aspect_std"])


def test_harvest_summary_numbers_add_up(coco128_seg, tmp_path, capsys):
    bank = tmp_path / "b.lmdb"
    rc = main(["bank", "harvest", "--data", str(coco128_seg / "coco128-seg.yaml"), "--out", str(bank),
               "--classes", "person,dog", "--min-area", "400", "--keep-largest", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    m = re.search(r"(\d+) annotations -> (\d+) instances kept", out)
    total, kept = int(m.group(1)), int(m.group(2))
    lost = [int(x) for x in re.findall(r"(?:rejected by quality filters|skipped bad input|skipped by options): (\d+)", out)]
    assert total == 929 and kept == InstanceBank(bank).count() == total - sum(lost)
    assert set(InstanceBank(bank).categories()) == {"person", "dog"}
    # --keep-largest: every stored mask is one connected component, so nothing is rejected as fragmented
    assert "fragmented" not in out
    assert all(m["mask"]["components"] == 1 for m in InstanceBank(bank).iter_meta())


def test_readme_commands_with_relative_paths(coco128_seg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(coco128_seg / "coco128-seg.yaml", tmp_path)
    assert main(["bank", "harvest", "--data", data, "--out", "cache/coco128.lmdb", "--max-images", "8",
                 "--no-progress"]) == 0
    assert main(["bank", "stats", "cache/coco128.lmdb"]) == 0
    assert main(["bank", "show", "cache/coco128.lmdb", "--out", "cache/sheet.png", "--max-classes", "2"]) == 0
    assert (tmp_path / "cache" / "sheet.png").is_file()
    assert "instances kept" in capsys.readouterr().out


def test_stats_json_show_verify(harvested, tmp_path, capsys):
    _, bank = harvested
    assert main(["bank", "stats", str(bank), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["total"] == InstanceBank(bank).count()
    assert sum(c["count"] for c in s["classes"].values()) == s["total"]
    assert s["verdicts"] == {"none": s["total"]}
    assert "harvest/coco128-seg" in s["harvests"] and s["rejections"]
    assert s["classes"]["person"]["size_prior"]["n"] > 0
    assert main(["bank", "stats", str(bank), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "rejections: too_small" in out and "verdicts: keep 0, reject 0, none" in out
    m = re.search(r"(\d+) annotations in \d+ images -> (\d+) kept, (\d+) already in the bank, (\d+) rejected, "
                  r"(\d+) bad input, (\d+) skipped", out)
    assert m and int(m.group(1)) == sum(int(g) for g in m.groups()[1:]), out  # every annotation accounted for
    png = tmp_path / "sheet.png"
    assert main(["bank", "show", str(bank), "--out", str(png), "--per-class", "4", "--max-classes", "3",
                 "--cell", "64"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bank", "verify", str(bank)]) == 0
    assert ": OK" in capsys.readouterr().out


def test_output_piped_into_head_and_bad_max_classes(harvested, tmp_path):
    _, bank = harvested
    env = cli_env()
    cli = f"{sys.executable} -m genval_aug.cli"
    # output into a pipe whose reader is gone (as `| head` after its lines): no BrokenPipeError traceback
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([*cli.split(), "bank", "stats", str(bank)], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    proc = subprocess.run([*cli.split(), "bank", "show", str(bank), "--out", str(tmp_path / "s.png"),
                           "--max-classes", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "max_classes must be >= 1" in proc.stderr, proc.stderr


def test_export_import_merge(harvested, tmp_path, capsys):
    _, bank = harvested
    n = InstanceBank(bank).count()
    assert main(["bank", "export", str(bank), str(tmp_path / "exp")]) == 0
    assert len(list((tmp_path / "exp").rglob("*.png"))) == n
    assert main(["bank", "import", str(tmp_path / "exp"), "--out", str(tmp_path / "imp.lmdb")]) == 0
    assert InstanceBank(tmp_path / "imp.lmdb").count() == n
    assert main(["bank", "merge", "--out", str(tmp_path / "m.lmdb"), str(bank), str(tmp_path / "imp.lmdb")]) == 0
    assert "added" in capsys.readouterr().out
    assert InstanceBank(tmp_path / "m.lmdb").count() == n  # same content ids: deduplicated


@pytest.mark.parametrize("argv, needle", [
    (["bank", "stats", "{tmp}/nope"], "no instance bank at"),
    (["bank", "verify", "{tmp}/nope"], "no instance bank at"),
    (["bank", "show", "{tmp}/nope"], "no instance bank at"),
    (["bank", "harvest", "--data", "{tmp}/nope.yaml", "--out", "{tmp}/b"], "dataset not found"),
    (["bank", "harvest", "--data", "{coco}", "--out", "{tmp}/b", "--classes", "unicorn"], "unicorn"),
    (["bank", "harvest", "--data", "{coco}", "--out", "{tmp}/b", "--coverage", "0.9", "0.1"], "--coverage"),
    (["bank", "import", "{tmp}", "--out", "{tmp}/b"], "no manifest.json"),
    (["bank", "merge", "--out", "{tmp}/m", "{tmp}/nope"], "no instance bank at"),
])
def test_bad_input_exits_nonzero_with_one_line(argv, needle, coco128_seg, tmp_path):
    argv = [a.format(tmp=tmp_path, coco=coco128_seg / "coco128-seg.yaml") for a in argv]
    run_cli_expecting_one_error_line(argv, needle, tmp_path)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bank", sub, "--help"])
    assert e.value.code == 0
    assert "usage: genval-aug bank " + sub in capsys.readouterr().out


def test_bank_extension_hook(monkeypatch):
    """A module listed in BANK_COMMAND_MODULES gets the bank subparsers through add_bank_commands."""
    import types

    import genval_aug.cli.bank as bank_cli

    mod = types.ModuleType("genval_aug.cli.bank_fake")
    mod.add_bank_commands = lambda sub: sub.add_parser("fake", help="test").set_defaults(func=lambda a: 7)
    monkeypatch.setitem(sys.modules, "genval_aug.cli.bank_fake", mod)
    monkeypatch.setattr(bank_cli, "BANK_COMMAND_MODULES", ["bank_fake"])
    assert main(["bank", "fake"]) == 7


@pytest.mark.parametrize("argv, needle", [
    (["bank", "merge", "--out", "{tmp}/afile", "{tmp}/b.lmdb"], "afile"),           # was FileExistsError
    (["bank", "merge", "--out", "{tmp}/afile/sub", "{tmp}/b.lmdb"], "afile/sub"),   # NotADirectoryError
    (["bank", "import", "{tmp}/exp", "--out", "{tmp}/afile"], "afile"),
    (["bank", "export", "{tmp}/b.lmdb", "{tmp}/afile"], "afile"),
    (["bank", "show", "{tmp}/b.lmdb", "--out", "{tmp}/afile/sheet.png"], "afile"),
    (["bank", "import", "{tmp}/listmanifest", "--out", "{tmp}/i.lmdb"], "manifest"),   # TypeError
    (["bank", "import", "{tmp}/intentry", "--out", "{tmp}/i.lmdb"], "instance 0"),
])
def test_bad_output_paths_and_manifests_exit_2_with_one_line(argv, needle, tmp_path):
    """Output paths that are files (or under one) and malformed manifests ended in a Python traceback with
    exit code 1 instead of one 'genval-aug: error:' line and exit code 2."""
    from bank_helpers import make_rgba

    from genval_aug.bank import BankWriter, export_folder
    (tmp_path / "afile").write_text("x")
    with BankWriter(tmp_path / "b.lmdb") as w:
        w.add(make_rgba(0), category="a")
    export_folder(tmp_path / "b.lmdb", tmp_path / "exp")
    for name, manifest in (("listmanifest", "[1, 2]"), ("intentry", '{"instances": [3]}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(manifest)
    argv = [a.format(tmp=tmp_path) for a in argv]
    run_cli_expecting_one_error_line(argv, needle, tmp_path)


def test_stats_survives_a_record_with_odd_score_and_verdict(tmp_path, capsys):
    """A record whose score is not a number made `bank stats` end in a ValueError traceback; one whose
    metadata is not JSON at all ended it with BadRecordError: now counted and left out."""
    import lmdb
    from bank_helpers import make_rgba

    from genval_aug.bank import BankWriter
    with BankWriter(tmp_path / "b.lmdb") as w:
        ids = [w.add(make_rgba(i), category="a", verdict={"keep": True, "score": 0.5}) for i in range(3)]
    env = lmdb.open(str(tmp_path / "b.lmdb"), max_dbs=8)
    records = env.open_db(b"records")
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(ids[0].encode(), db=records))
        txn.put(ids[0].encode(), json.dumps({**meta, "score": "high", "verdict": "keep"}).encode(), db=records)
        txn.put(ids[2].encode(), b"{not json", db=records)
    env.close()
    assert main(["bank", "stats", str(tmp_path / "b.lmdb")]) == 0
    out = capsys.readouterr().out
    assert "mean score 0.500" in out
    assert "WARNING: 1 record(s) with unreadable metadata" in out and "bank verify" in out
    assert main(["bank", "stats", str(tmp_path / "b.lmdb"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["corrupt_records"] == 1
    for extra in ([], ["--source", "harvest"]):  # the contact sheet leaves the unreadable record out too
        png = tmp_path / f"sheet{len(extra)}.png"
        assert main(["bank", "show", str(tmp_path / "b.lmdb"), "--out", str(png), *extra]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_of_dot_named_categories_stays_inside_the_export_folder(tmp_path):
    """A category named '..' was exported to <out>/../<id>.png, outside the export folder."""
    from bank_helpers import make_rgba

    from genval_aug.bank import BankWriter, export_folder, import_folder
    with BankWriter(tmp_path / "b.lmdb") as w:
        ids = {w.add(make_rgba(i), category=c): c for i, c in enumerate(["..", ".", "a/../..", "ok"])}
    out = tmp_path / "nest" / "exp"
    export_folder(tmp_path / "b.lmdb", out)
    assert sorted(p.relative_to(out).parts[-1] for p in (tmp_path / "nest").rglob("*.png")) == sorted(
        f"{rid}.png" for rid in ids)
    assert all(out in p.parents for p in (tmp_path / "nest").rglob("*.png"))
    import_folder(tmp_path / "back.lmdb", out)
    back = InstanceBank(tmp_path / "back.lmdb")
    assert {rid: back.get_meta(rid)["category"] for rid in back.ids()} == ids


def test_merge_lists_the_corrupt_input_records_it_skipped(tmp_path, capsys):
    import lmdb
    from bank_helpers import make_rgba

    from genval_aug.bank import BankWriter

    src = tmp_path / "src.lmdb"
    with BankWriter(src) as w:
        ids = [w.add(make_rgba(i), category="a") for i in range(3)]
    env = lmdb.open(str(src), max_dbs=8)
    with env.begin(write=True) as txn:
        images = env.open_db(b"images", txn=txn)
        raw = bytearray(txn.get(ids[1].encode(), db=images))
        raw[40] ^= 0x01
        txn.put(ids[1].encode(), bytes(raw), db=images)
    env.close()
    assert main(["bank", "merge", "--out", str(tmp_path / "m.lmdb"), str(src)]) == 0
    out = capsys.readouterr().out
    assert "2 added" in out and "1 corrupt input record(s) skipped" in out and ids[1] in out, out
    assert ids[1] not in InstanceBank(tmp_path / "m.lmdb")
