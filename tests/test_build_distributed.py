"""Scale-out (issue 12): torchrun shards whose merge equals a single-process build, a crashed rank re-run
alone, deterministic class split, read-only bank replicas for training nodes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from genval_aug.bank import BankSampler, InstanceBank, verify
from genval_aug.build import BankBuilder, load_config
from genval_aug.build.distributed import (
    DistInfo,
    assign_classes,
    build_distributed,
    rank_share,
    replicate_bank,
    shard_path,
)

ROOT = Path(__file__).resolve().parents[1]
PLUG = "genval_build_testplugins"
CLASSES = ["mug", "kite", "shoe", "lamp", "bell"]


def write_cfg(tmp: Path, delay: float = 0.0, name: str = "d.yaml", **over) -> Path:
    cfg = {
        "name": "dist",
        "seed": 5,
        "output": {"bank": "out.lmdb"},
        "classes": {"names": CLASSES, "target": 8, "targets": {"mug": 20, "kite": 14}},
        "source": {"kind": "shapes", "batch_size": 4, "params": {"size": 40, "bad_fraction": 0.2, "delay": delay}},
        "validator": {"kind": f"{PLUG}:make_validator", "batch_size": 4, "params": {"keep_rate": 0.75}},
        "prefilter": {"reject_border": True},
        "pipeline": {"progress": False},
        **over,
    }
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def ids(path) -> set[str]:
    return set(InstanceBank(path, refresh_interval=None).ids())


def assert_category_ids(*banks) -> None:
    """Classes named without ids get them in config order, however the bank was built (shards merge
    in another order): the bank's table and every record agree."""
    want = {c: i for i, c in enumerate(CLASSES)}
    for path in banks:
        bank = InstanceBank(path, refresh_interval=None)
        assert bank.category_ids() == want, path
        assert all(m["category_id"] == want[m["category"]] for m in bank.iter_meta()), path


def test_split_is_deterministic_and_balanced(tmp_path):
    deficits = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 0, "f": 10}
    shares = assign_classes(deficits, 2)
    assert shares == [["a", "d", "e"], ["b", "c", "f"]]         # loads 140 / 120 (LPT)
    assert assign_classes(deficits, 1) == [["a", "b", "c", "d", "f", "e"]]
    assert assign_classes(deficits, 8)[6:] == [[], []]
    cfg = load_config(write_cfg(tmp_path))
    # every rank computes the same split from the (unwritten) output bank
    s = [rank_share(cfg, tmp_path / "out.lmdb", r, 2) for r in range(2)]
    assert sorted(s[0] + s[1]) == sorted(CLASSES) and not set(s[0]) & set(s[1])
    assert DistInfo.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).rank == 1
    assert not DistInfo.from_env({"RANK": "1", "WORLD_SIZE": "2"}).coordinated


@pytest.mark.slow
def test_torchrun_two_ranks_merge_equals_single_process(tmp_path):
    # a prompt-driven generator (tiny random conv net): prompt caches must survive the merge too
    cfg_path = write_cfg(tmp_path, source={"kind": f"{PLUG}:make_tiny_generator", "batch_size": 4,
                                           "params": {"size": 40}},
                         prompts={"kind": f"{PLUG}:make_prompts", "n": 3}, pipeline={"progress": True})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "genval_aug.cli", "bank", "build", "--config", str(cfg_path)]
    r = subprocess.run(cmd + ["--json"], env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "banked (all 2 ranks)" in r.stderr                   # rank 0's aggregate progress bar
    agg = json.loads(r.stdout[r.stdout.index("{"):])           # rank 0 alone prints the aggregate report
    assert agg["added"] == 58 and set(agg["added_per_class"]) == set(CLASSES)
    assert agg["deficits"] == {c: 0 for c in CLASSES}
    out = tmp_path / "out.lmdb"
    shards = [shard_path(out, k, 2) for k in range(2)]
    cats = [set(InstanceBank(s).categories()) for s in shards]
    assert cats[0] and cats[1] and not cats[0] & cats[1]       # each class built by exactly one rank
    assert ids(shards[0]) | ids(shards[1]) == ids(out)

    single = tmp_path / "single.lmdb"
    BankBuilder(load_config(cfg_path), bank=single).run()
    assert ids(out) == ids(single)                              # same ids as one process
    assert_category_ids(out, single)
    assert InstanceBank(out).categories() == {"mug": 20, "kite": 14, "shoe": 8, "lamp": 8, "bell": 8}
    assert verify(out).ok
    for c in CLASSES:                                            # prompt caches merged with the records
        assert InstanceBank(out).get_status(f"prompts:dist:{c}")["prompts"][0] == f"a photo of a {c}, variant 0"

    # re-running the finished distributed build does nothing
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "units processed: 0" in r.stdout, r.stderr[-3000:]
    assert ids(out) == ids(single)


@pytest.mark.slow
def test_crashed_rank_rerun_alone_resumes(tmp_path):
    slow = write_cfg(tmp_path, delay=0.05, name="slow.yaml")
    fast = load_config(write_cfg(tmp_path))          # same units; `delay` only sleeps
    out = tmp_path / "out.lmdb"
    s1 = shard_path(out, 1, 2)
    p = subprocess.Popen([sys.executable, "-m", "genval_aug.cli", "bank", "build", "--config", str(slow),
                          "--rank", "1", "--world-size", "2", "--no-progress"], env=env(), cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            if InstanceBank(s1, refresh_interval=None).count() >= 4:
                break
        except Exception:
            pass
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    partial = ids(s1)
    assert partial and verify(s1).ok
    share1 = rank_share(fast, out, 1, 2)
    assert InstanceBank(s1).count() < sum(fast.class_spec(c).target for c in share1)

    # the crashed rank alone, then the other one, then the merge
    r1 = build_distributed(fast, dist=DistInfo(rank=1, world_size=2))
    assert r1.units > 0 and partial <= ids(s1)
    build_distributed(fast, dist=DistInfo(rank=0, world_size=2))
    r = subprocess.run([sys.executable, "-m", "genval_aug.cli", "bank", "build", "--config", str(slow),
                        "--merge-shards"], env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    BankBuilder(fast, bank=tmp_path / "single.lmdb").run()
    assert ids(out) == ids(tmp_path / "single.lmdb")
    assert_category_ids(out, tmp_path / "single.lmdb")
    units: dict[str, list[int]] = {}
    for m in InstanceBank(out).iter_meta():
        units.setdefault(m["category"], []).append(m["source"]["unit"])
    assert all(len(u) == len(set(u)) for u in units.values())


def _read_replica(args):
    path, i = args
    bank = InstanceBank(path, lock=False)
    return [x.id for x in BankSampler(bank).sample(np.random.default_rng(i), 3)]


def test_read_only_replica_for_training_nodes(tmp_path):
    import torch

    cfg = load_config(write_cfg(tmp_path))
    BankBuilder(cfg, bank=tmp_path / "src.lmdb").run()
    dst = replicate_bank(tmp_path / "src.lmdb", tmp_path / "node1" / "bank.lmdb")
    assert sorted(os.listdir(dst)) == ["data.mdb"]              # compact copy, no lock file
    replica = set(InstanceBank(dst, lock=False).ids())
    assert replica == ids(tmp_path / "src.lmdb")

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return ",".join(_read_replica((dst, i)))

    got = [x for b in torch.utils.data.DataLoader(DS(), batch_size=4, num_workers=2) for x in b]
    assert len(got) == 16 and set(",".join(got).split(",")) <= replica
    assert sorted(os.listdir(dst)) == ["data.mdb"]              # lock=False readers wrote nothing
    with pytest.raises(Exception, match="refusing to overwrite"):
        replicate_bank(tmp_path / "src.lmdb", dst)


def test_merge_carries_units_settled_without_output(tmp_path):
    """Units that left nothing in a shard (source/validator error, empty alpha) stay settled after the merge."""
    from genval_aug.bank import BankWriter
    from genval_aug.build.distributed import merge_shards
    from genval_aug.build.pipeline import scan_units, unstored_key

    cfg = load_config(write_cfg(tmp_path))
    bank = tmp_path / "out.lmdb"
    with BankWriter(bank) as w:      # an earlier single-process run left one unstored unit of "mug"
        w.set_status(unstored_key("dist", "mug"), {"units": [2], "reasons": ["source_error"]})
    for r, (cat, units) in enumerate([("mug", [0, 5]), ("kite", [1])]):
        with BankWriter(shard_path(bank, r, 2)) as w:
            w.set_status(unstored_key("dist", cat), {"units": units, "reasons": ["validator_error"] * len(units)})
    merge_shards(cfg, bank, 2)
    assert scan_units(InstanceBank(bank, refresh_interval=None), "dist") == {"mug": {0, 2, 5}, "kite": {1}}


def test_merge_without_world_size_refuses_stale_shards_of_another_world_size(tmp_path):
    from genval_aug.bank import BankWriter
    from genval_aug.build.distributed import merge_shards
    from genval_aug.build.sources import ShapesSource
    from genval_aug.errors import ConfigError

    cfg = load_config(write_cfg(tmp_path))
    bank = tmp_path / "out.lmdb"
    src = ShapesSource(size=40)

    def shard(rank, world, cat, seeds):
        with BankWriter(shard_path(bank, rank, world)) as w:
            for s in seeds:
                w.add(src.render(cat, s)[0], category=cat, source={"build": "dist"})

    shard(0, 2, "mug", [1, 2])
    shard(1, 2, "kite", [3])
    assert merge_shards(cfg, bank)["added"] == 3              # one world size on disk: it is the run's
    shard(0, 3, "shoe", [4, 5])                               # stale shard of an earlier 3-rank run
    stale = shard_path(bank, 0, 3)
    with pytest.raises(ConfigError, match=r"--world-size") as ei:
        merge_shards(cfg, bank)
    assert stale in str(ei.value) and "rank-000-of-002" in str(ei.value)
    assert InstanceBank(bank, refresh_interval=None).categories() == {"mug": 2, "kite": 1}   # nothing merged
    merge_shards(cfg, bank, 2)                                # explicit: the other shards are left alone
    assert "shoe" not in InstanceBank(bank, refresh_interval=None).categories()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank0_stops_waiting_for_a_dead_rank_and_names_it(tmp_path):
    """Ranks started by hand (no torchrun agent to end the job): rank 1 is killed mid-build; rank 0 must
    not wait forever but fail after pipeline.rank_timeout naming rank 1 and its shard."""
    over = {"pipeline": {"progress": False, "rank_timeout": 3}}
    slow = write_cfg(tmp_path, delay=0.05, name="slow.yaml", **over)
    fast = write_cfg(tmp_path, name="fast.yaml", **over)
    out = tmp_path / "out.lmdb"
    s1 = shard_path(out, 1, 2)
    base = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    cli = [sys.executable, "-m", "genval_aug.cli", "bank", "build", "--config"]
    r1 = subprocess.Popen(cli + [str(slow)], env={**base, "RANK": "1", "LOCAL_RANK": "1"}, cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r0 = subprocess.Popen(cli + [str(fast)], env={**base, "RANK": "0", "LOCAL_RANK": "0"}, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:       # rank 1 is building (and beating): kill it mid-way
            try:
                if InstanceBank(s1, refresh_interval=None).count() >= 2:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        r1.send_signal(signal.SIGKILL)
        r1.wait(30)
        killed = time.monotonic()
        _, err = r0.communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
                p.wait(30)
    assert r0.returncode != 0 and "sent no heartbeat for 3 s" in err, err[-3000:]
    msg = err[err.index("error: build dist:"):]
    assert "rank 1" in msg and s1 in msg and "rank 0 " not in msg and "--rank 1 --world-size 2" in msg
    assert waited < 60
    # what rank 1 built survives; re-run alone and merge: the bank is complete
    cfg = load_config(fast)
    build_distributed(cfg, dist=DistInfo(rank=1, world_size=2))
    from genval_aug.build.distributed import merge_shards

    merge_shards(cfg, out, 2)
    assert InstanceBank(out).categories() == {c.name: c.target for c in cfg.classes}


def test_folder_numbering_survives_shards_and_merge(tmp_path):
    """A folder build split over two ranks (each re-run alone), merged; files added afterwards in any sort
    position are then imported exactly once by a single-process top-up of the merged bank."""
    import cv2

    from genval_aug.build.distributed import merge_shards
    from genval_aug.build.sources import ShapesSource

    src = ShapesSource(size=40)

    def put(cat, name, seed):
        (tmp_path / "in" / cat).mkdir(parents=True, exist_ok=True)
        rgba = src.render(cat, seed)[0]
        cv2.imwrite(str(tmp_path / "in" / cat / name), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))

    for cat in ("mug", "kite"):
        put(cat, "m.png", 1)
        put(cat, "p.png", 2)
        (tmp_path / "in" / cat / "o_broken.png").write_bytes(b"not a png")   # settled, leaves no record
    cfg = load_config(write_cfg(tmp_path, source={"kind": "folder", "params": {"root": str(tmp_path / "in")}},
                                validator="none", prefilter=None, classes={"names": ["mug", "kite"], "target": 9}))
    out = tmp_path / "out.lmdb"
    for r in range(2):
        build_distributed(cfg, dist=DistInfo(rank=r, world_size=2))
    merge_shards(cfg, out, 2)
    bank = InstanceBank(out, refresh_interval=None)
    assert bank.categories() == {"mug": 2, "kite": 2}
    assert bank.get_status("units:dist:mug")["names"] == ["m.png", "o_broken.png", "p.png"]
    for cat in ("mug", "kite"):
        put(cat, "a.png", 3)
        put(cat, "n.png", 4)
    r = BankBuilder(cfg, bank=out).run()
    assert r.units == 4 and r.added == {"mug": 2, "kite": 2}     # the broken files are not retried
    names: dict[str, list[str]] = {}
    for m in InstanceBank(out).iter_meta():
        names.setdefault(m["category"], []).append(m["source"]["unit_name"])
    assert {k: sorted(v) for k, v in names.items()} == {c: ["a.png", "m.png", "n.png", "p.png"] for c in ("mug", "kite")}
