"""The LMDB instance bank with real LMDB, real processes and a real DataLoader."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import time

import lmdb
import numpy as np
import pytest
from bank_helpers import make_rgba, writer_process

from genval_aug.bank import (
    BankSampler,
    BankWriter,
    InstanceBank,
    category_weights,
    merge,
    repeat_factors,
    verify,
)
from genval_aug.bank.record import content_id, normalize_rgba
from genval_aug.errors import BadInstanceError, BadRecordError, BankError, ConfigError


@pytest.fixture
def bank_path(tmp_path):
    return str(tmp_path / "bank.lmdb")


def fill(path, n, categories=("cat", "dog", "zebra"), start=0, batch_size=16):
    writer_process(path, list(categories), n, start, batch_size)


def test_round_trip_every_field(bank_path):
    rgba = make_rgba(7)
    src = {"kind": "layerdiffusion", "base_model": "x/y", "prompt": "a red mug", "seed": 7}
    verdict = {"keep": True, "score": 0.91, "criteria": {"single_object": True}, "reasons": {"single_object": "ok"}}
    with BankWriter(bank_path) as w:
        rid = w.add(rgba, category="mug", category_id=344, source=src, verdict=verdict)
        w.set_size_prior("mug", {"rel_sqrt_area_mean": 0.2, "rel_sqrt_area_std": 0.05, "n": 3})
    bank = InstanceBank(bank_path)
    inst = bank.get(rid)
    expected = normalize_rgba(rgba)
    assert np.array_equal(inst.rgba, expected)
    assert inst.id == rid == content_id("mug", expected)
    assert (inst.category, inst.category_id) == ("mug", 344)
    m = inst.meta
    assert m["source"] == src and m["verdict"] == verdict and m["score"] == pytest.approx(0.91)
    assert (m["width"], m["height"]) == (32, 24)
    assert m["mask"]["area"] == int((rgba[..., 3] >= 128).sum())
    ys, xs = np.nonzero(rgba[..., 3])
    assert m["mask"]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert m["mask"]["components"] == 1
    assert m["created_at"].endswith("Z")
    assert bank.size_prior("mug")["rel_sqrt_area_mean"] == 0.2
    assert bank.schema_version() == 1
    assert bank.category_ids() == {"mug": 344}
    assert bank.stats()["sources"] == {"layerdiffusion": 1}


@pytest.mark.parametrize("codec", ["lz4", "zlib", "png", "webp"])
def test_every_codec_round_trips_and_mixes(bank_path, codec):
    rgba = make_rgba(3)
    with BankWriter(bank_path, codec=codec) as w:
        rid = w.add(rgba, category="a")
    with BankWriter(bank_path) as w:  # a bank may hold records of several codecs
        other = w.add(make_rgba(4), category="a")
    bank = InstanceBank(bank_path)
    assert bank.get_meta(rid)["codec"] == codec
    out = bank.get(rid).rgba
    assert np.array_equal(out, normalize_rgba(rgba)) and out.flags.writeable
    assert np.array_equal(bank.get(other).rgba, normalize_rgba(make_rgba(4)))


def test_dedupe(bank_path):
    with BankWriter(bank_path, batch_size=2) as w:
        ids = [w.add(make_rgba(i % 3), category="a") for i in range(9)]
    with BankWriter(bank_path) as w:
        w.add(make_rgba(0), category="a")
        w.flush()
        assert w.added == 0 and w.duplicates == 1
    assert len(set(ids)) == 3
    assert InstanceBank(bank_path).count() == 3
    # the same pixels under another category are a different instance
    with BankWriter(bank_path) as w:
        w.add(make_rgba(0), category="b")
    assert InstanceBank(bank_path).count() == 4
    assert verify(bank_path).ok


@pytest.mark.parametrize("mode", ["uniform", "balanced", "weights", "rare_boost"])
def test_sampling_matches_requested_weights(bank_path, mode):
    counts = {"a": 60, "b": 30, "c": 10}
    seed = 0
    with BankWriter(bank_path, batch_size=50) as w:
        for cat, n in counts.items():
            for _ in range(n):
                w.add(make_rgba(seed), category=cat)
                seed += 1
    kw = {}
    if mode == "weights":
        kw["weights"] = {"a": 1, "b": 2, "c": 7}
        expected = {"a": 0.1, "b": 0.2, "c": 0.7}
    elif mode == "rare_boost":
        kw["dataset_frequencies"] = {"a": 0.5, "b": 0.04, "c": 0.0001}
        kw["repeat_threshold"] = 0.01
        r = {"a": 1.0, "b": 1.0, "c": (0.01 / 0.0001) ** 0.5}
        expected = {k: v / sum(r.values()) for k, v in r.items()}
    elif mode == "uniform":
        expected = {k: v / 100 for k, v in counts.items()}
    else:
        expected = {k: 1 / 3 for k in counts}
    sampler = BankSampler(bank_path, mode, **kw)
    assert sampler.probabilities() == pytest.approx(expected)
    rng = np.random.default_rng(123)
    n = 3000
    cats = sampler.sample_categories(rng, n)
    observed = np.array([cats.count(k) for k in counts])
    exp = np.array([expected[k] * n for k in counts])
    chi2 = float((((observed - exp) ** 2) / exp).sum())
    assert chi2 < 13.8, (observed, exp)  # p = 0.001 for 2 degrees of freedom
    # instances are uniform within a category and decode
    insts = sampler.sample(rng, 30)
    assert len(insts) == 30 and all(i.rgba.shape == (24, 32, 4) for i in insts)


def test_weights_matching_no_category_draw_nothing_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="genval_aug.bank.sampling"):
        assert category_weights({"a": 3, "b": 1}, "weights", weights={"a": 0, "zebra": 5}) == {}
    assert "none of the bank's 2 categories a positive weight" in caplog.text and "zebra" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genval_aug.bank.sampling"):
        assert category_weights({}, "weights", weights={"a": 1}) == {}  # an empty bank may still be filling
    assert caplog.text == ""


def test_sampler_filters_and_classes(bank_path):
    with BankWriter(bank_path) as w:
        for i in range(10):
            w.add(make_rgba(i), category="a", source={"kind": "harvest" if i < 5 else "layerdiffusion"},
                  verdict={"keep": True, "score": i / 10})
        w.add(make_rgba(99), category="b")
    rng = np.random.default_rng(0)
    s = BankSampler(bank_path, min_score=0.5, sources=["layerdiffusion"])
    got = {i.id for i in s.sample(rng, 50)}
    assert got and all(InstanceBank(bank_path).get_meta(r)["score"] >= 0.5 for r in got)
    assert s.probabilities() == {"a": 1.0}  # b has no score: filtered out
    only_b = BankSampler(bank_path, classes=["b"])
    assert {i.category for i in only_b.sample(rng, 10)} == {"b"}
    assert BankSampler(bank_path, classes=["nope"]).sample(rng, 3) == []


def test_repeat_factors_and_bad_config():
    assert repeat_factors({"x": 0.001, "y": 0.00001}, 0.001) == pytest.approx({"x": 1.0, "y": 10.0})
    with pytest.raises(ConfigError, match="frequency of 'x'"):
        repeat_factors({"x": 0})
    with pytest.raises(ConfigError, match="sampling mode"):
        category_weights({"a": 1}, "nope")
    with pytest.raises(ConfigError, match="weights"):
        category_weights({"a": 1}, "weights")


def test_bad_input_errors(bank_path, tmp_path):
    with BankWriter(bank_path) as w:
        with pytest.raises(BadInstanceError, match="HxWx4"):
            w.add(np.zeros((10, 10, 3), np.uint8), category="a")
        with pytest.raises(BadInstanceError, match="alpha channel is empty"):
            w.add(np.zeros((10, 10, 4), np.uint8), category="a")
        with pytest.raises(BadInstanceError, match="uint8"):
            w.add(np.zeros((10, 10, 4), np.float32), category="a")
        with pytest.raises(ValueError, match="category"):
            w.add(make_rgba(0), category="")
    with pytest.raises(BankError, match="no instance bank at .*missing"):
        InstanceBank(tmp_path / "missing.lmdb").count()
    plain = tmp_path / "plain.lmdb"
    env = lmdb.open(str(plain))
    env.close()
    with pytest.raises(BankError, match="not a genval_aug instance bank"):
        InstanceBank(plain).count()


def test_corrupt_record_is_skipped_counted_and_reported(bank_path, caplog):
    with BankWriter(bank_path) as w:
        good = [w.add(make_rgba(i), category="a") for i in range(3)]
    # corrupt one image behind the bank's back
    env = lmdb.open(bank_path, max_dbs=8)
    images = env.open_db(b"images")
    with env.begin(write=True) as txn:
        txn.put(good[1].encode(), b"not an image", db=images)
    env.close()
    bank = InstanceBank(bank_path)
    with pytest.raises(Exception, match=good[1]):
        bank.get(good[1])
    sampler = BankSampler(bank)
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        out = sampler.sample(rng, 60)
    assert len(out) == 60 and all(i.id != good[1] for i in out)
    assert sampler.skipped > 0
    assert sum("corrupt bank record" in r.message for r in caplog.records) == 1
    report = verify(bank_path)
    assert not report.ok and any(good[1] in e for e in report.errors)


def test_pickle_is_cheap_and_reopens(bank_path):
    fill(bank_path, 6)
    bank = InstanceBank(bank_path)
    assert bank.count() == 6
    blob = pickle.dumps(bank)
    assert len(blob) < 400
    clone = pickle.loads(blob)
    assert clone.categories() == bank.categories()
    sampler = pickle.loads(pickle.dumps(BankSampler(bank)))
    assert len(sampler.sample(np.random.default_rng(0), 4)) == 4


def test_map_grows_from_tiny_initial_size(bank_path):
    big = [np.dstack([np.random.default_rng(i).integers(0, 256, (200, 200, 3), dtype=np.uint8),
                      np.full((200, 200), 255, np.uint8)]) for i in range(12)]
    with BankWriter(bank_path, batch_size=4, map_size=64 * 1024) as w:
        ids = [w.add(a, category="noise") for a in big]
    assert w._map_size > 64 * 1024
    bank = InstanceBank(bank_path)
    assert bank.count() == 12
    assert all(np.array_equal(bank.get(r).rgba, a) for r, a in zip(ids, big, strict=True))
    assert verify(bank_path).ok


def _reader_process(path: str, seconds: float, out: mp.Queue) -> None:
    """Sample + decode continuously, refreshing; report (decoded, errors, max count seen)."""
    bank = InstanceBank(path, refresh_interval=None)
    sampler = BankSampler(bank, "uniform")
    rng = np.random.default_rng(os.getpid())
    decoded = errors = 0
    seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sampler.refresh()
            seen = max(seen, bank.count())
            for inst in sampler.sample(rng, 4):
                assert inst.rgba.shape == (24, 32, 4)
                decoded += 1
        except Exception as e:  # noqa: BLE001 - any failure is what this test counts
            errors += 1
            out.put(("error", repr(e)))
    out.put(("done", decoded, errors + sampler.skipped, seen))


@pytest.mark.slow
def test_one_writer_two_readers_fork_and_spawn(bank_path):
    fill(bank_path, 12)
    parent_bank = InstanceBank(bank_path)
    assert parent_bank.count() == 12  # the parent holds the bank open while children start
    results = []
    procs = []
    queue = mp.get_context("spawn").Queue()
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        p = ctx.Process(target=_reader_process, args=(bank_path, 6.0, queue))
        p.start()
        procs.append(p)
    writer = mp.get_context("spawn").Process(target=writer_process,
                                             args=(bank_path, ["cat", "dog", "zebra"], 300, 1000, 10, 0.005))
    writer.start()
    writer.join(60)
    assert writer.exitcode == 0
    for _ in procs:
        msg = queue.get(timeout=60)
        while msg[0] == "error":
            results.append(msg)
            msg = queue.get(timeout=60)
        results.append(msg)
    for p in procs:
        p.join(30)
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors[:3]
    done = [r for r in results if r[0] == "done"]
    assert len(done) == 2
    for _, decoded, n_err, seen in done:
        assert decoded > 50 and n_err == 0
        assert seen == 312  # new instances became visible to both readers
    assert parent_bank.count() == 12  # cached until refresh
    parent_bank.refresh()
    assert parent_bank.count() == 312
    assert verify(bank_path).ok


@pytest.mark.slow
def test_sigkill_writer_mid_batch_loses_nothing_committed(bank_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=writer_process, args=(bank_path, ["a", "b"], 100000, 0, 7, 0.001))
    p.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(bank_path, "data.mdb")):
            try:
                if InstanceBank(bank_path, refresh_interval=0).count() >= 30:
                    break
            except BankError:
                pass
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    bank = InstanceBank(bank_path)
    bank.refresh()
    n = bank.count()
    assert n >= 30 and n % 7 == 0  # only whole batches were committed
    report = verify(bank_path)
    assert report.ok, str(report)
    for rid in bank.ids():
        inst = bank.get(rid)
        seed = inst.meta["source"]["seed"]
        assert np.array_equal(inst.rgba, normalize_rgba(make_rgba(seed)))
    # a new writer continues after the crash. LMDB publishes a commit to readers (the lock file's txnid) just
    # after writing its meta page, so a kill between the two leaves the last batch durable but not yet visible;
    # the next writer starts from that meta page and the batch surfaces, whole: at most one batch of 7.
    before = set(bank.ids())
    writer_process(bank_path, ["a", "b"], 5, 10**6, 2)
    bank.refresh()
    assert bank.count() in (n + 5, n + 7 + 5) and verify(bank_path).ok
    assert before <= set(bank.ids())  # nothing visible before the crash was lost
    for rid in set(bank.ids()) - before:
        seed = bank.get_meta(rid)["source"]["seed"]
        assert np.array_equal(bank.get(rid).rgba, normalize_rgba(make_rgba(seed)))


class _BankDataset:
    def __init__(self, bank):
        self.bank = bank
        self.ids = sorted(bank.ids())

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        import torch

        inst = self.bank.get(self.ids[i])
        return torch.from_numpy(inst.rgba[..., 3].copy()).sum(), os.getpid()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_with_bank_held_by_parent(bank_path, context):
    import torch
    from torch.utils.data import DataLoader

    fill(bank_path, 24)
    bank = InstanceBank(bank_path)
    ds = _BankDataset(bank)  # the parent has opened and read the bank
    expected = sum(int(bank.get(r).rgba[..., 3].astype(np.int64).sum()) for r in ds.ids)
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    total, pids = 0, set()
    for _ in range(2):  # two epochs: workers are forked again while the parent holds the bank
        for sums, worker_pids in loader:
            total += int(sums.sum())
            pids.update(int(p) for p in worker_pids)
    assert total == 2 * expected
    assert os.getpid() not in pids and len(pids) >= 2
    assert bank.count() == 24  # the parent can still read
    del torch


def test_merge_dedupes_and_pools_priors(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a.lmdb", "b.lmdb", "out.lmdb"))
    writer_process(a, ["x", "y"], 10, 0, 4)
    writer_process(b, ["x", "y"], 10, 5, 4)  # seeds 5..9 overlap with a
    with BankWriter(a) as w:
        w.set_size_prior("x", {"rel_sqrt_area_mean": 0.1, "rel_sqrt_area_std": 0.0, "n": 1})
        w.record_rejections({"too_small": 2})
    with BankWriter(b) as w:
        w.set_size_prior("x", {"rel_sqrt_area_mean": 0.3, "rel_sqrt_area_std": 0.0, "n": 1})
        w.record_rejections({"too_small": 1, "coverage": 4})
    res = merge(out, [a, b])
    assert res == {"added": 15, "duplicates": 5, "skipped": 0, "errors": []}
    bank = InstanceBank(out)
    assert set(bank.ids()) == set(InstanceBank(a).ids()) | set(InstanceBank(b).ids())
    prior = bank.size_prior("x")
    assert prior["rel_sqrt_area_mean"] == pytest.approx(0.2) and prior["rel_sqrt_area_std"] == pytest.approx(0.1)
    assert bank.stats()["rejections"] == {"too_small": 3, "coverage": 4}
    assert verify(out).ok
    merge(out, [a, b])  # idempotent
    assert InstanceBank(out).count() == 15
    with pytest.raises(BankError, match="into itself"):
        merge(out, [out])


def test_export_import_round_trip(tmp_path, rgba_objects):
    src = str(tmp_path / "src.lmdb")
    from genval_aug.bank import export_folder, import_folder

    # per-class folders of real RGBA cut-outs
    per_class = tmp_path / "per_class"
    for name in ("car", "person"):
        (per_class / name).mkdir(parents=True)
        for f in sorted(rgba_objects.glob(f"rembg_{'girl' if name == 'person' else name}-*.png"))[:2]:
            (per_class / name / f.name).write_bytes(f.read_bytes())
    (per_class / "car" / "broken.png").write_bytes(b"garbage")
    res = import_folder(src, per_class)
    assert res["added"] == 4 and res["skipped"] == 1 and "broken.png" in res["errors"][0]
    out = export_folder(src, tmp_path / "exported")
    assert (out / "manifest.json").is_file()
    res2 = import_folder(str(tmp_path / "copy.lmdb"), out)
    assert res2 == {"added": 4, "skipped": 0, "errors": []}
    a, b = InstanceBank(src), InstanceBank(tmp_path / "copy.lmdb")
    assert set(a.ids()) == set(b.ids())
    for rid in a.ids():
        assert np.array_equal(a.get(rid).rgba, b.get(rid).rgba)
        assert a.get_meta(rid)["source"] == b.get_meta(rid)["source"]
    with pytest.raises(BankError, match="no manifest.json"):
        import_folder(str(tmp_path / "x.lmdb"), tmp_path / "per_class" / "car")


def test_pool_priors_is_exact_and_takes_contributions_back_out():
    from genval_aug.bank.priors import pool_priors

    rng = np.random.default_rng(3)
    x = rng.uniform(0.05, 0.5, 30)

    def summary(v):
        return {"n": len(v), "rel_sqrt_area_mean": float(v.mean()), "rel_sqrt_area_std": float(v.std())}

    a, b, c = summary(x[:10]), summary(x[10:25]), summary(x[25:])
    pooled = pool_priors([a, b, c])
    assert pooled["n"] == 30
    assert pooled["rel_sqrt_area_mean"] == pytest.approx(x.mean()) and pooled["rel_sqrt_area_std"] == pytest.approx(x.std())
    back = pool_priors([pooled], remove=[c])
    for k, v in summary(x[:25]).items():
        assert back[k] == pytest.approx(v)
    # a statistic only some sources have is pooled over those sources only
    mixed = pool_priors([{**a, "aspect_mean": 2.0, "aspect_std": 0.0}, b])
    assert mixed["aspect_mean"] == 2.0 and mixed["n"] == 25
    assert pool_priors([a], remove=[a]) is None


def test_category_ids_stay_unique_across_datasets(bank_path, caplog):
    """Two datasets with different id spaces in one bank: a new category whose requested id is already held by
    another category gets a fresh id (class_map=None pastes by bank id; a shared id would mislabel objects)."""
    with BankWriter(bank_path, batch_size=1) as w:
        w.add(make_rgba(0), category="person", category_id=0)  # e.g. YOLO ids
        w.add(make_rgba(1), category="bicycle", category_id=1)
        w.add(make_rgba(2), category="person", category_id=1)  # COCO ids: person=1 (existing: keeps 0)
    with BankWriter(bank_path) as w:  # same commit: both new categories ask for 7
        w.add(make_rgba(3), category="car", category_id=7)
        w.add(make_rgba(4), category="bus", category_id=7)
    ids = InstanceBank(bank_path).category_ids()
    assert ids["person"] == 0 and ids["bicycle"] == 1 and ids["car"] == 7
    assert len(set(ids.values())) == len(ids)
    assert InstanceBank(bank_path).random_instance("bus", np.random.default_rng(0)).category_id == ids["bus"]
    assert "already used by" in caplog.text
    assert verify(bank_path).ok


def test_filtered_sampler_rescans_only_changed_categories(bank_path):
    """The periodic stats re-read (refresh_interval) must not rebuild every filtered id list: that is a full
    metadata scan per worker every interval. Only categories whose count changed are rescanned."""
    with BankWriter(bank_path) as w:
        for i in range(6):
            w.add(make_rgba(i), category="a" if i < 3 else "b", verdict={"keep": True, "score": 0.9})
    bank = InstanceBank(bank_path, refresh_interval=0)  # every access re-reads the stats
    scanned: list[str] = []
    orig = bank.ids  # a scan lists the category's ids, then reads each record's metadata
    bank.ids = lambda category=None: (scanned.append(category), orig(category))[1]
    s = BankSampler(bank, min_score=0.5)
    rng = np.random.default_rng(0)
    assert len(s.sample(rng, 20)) == 20
    assert sorted(scanned) == ["a", "b"]
    scanned.clear()
    s.sample(rng, 20)
    assert scanned == []  # nothing changed: no rescan
    with BankWriter(bank_path) as w:
        w.add(make_rgba(50), category="b", verdict={"keep": True, "score": 0.9})
    got = {i.id for i in s.sample(rng, 200)}
    assert scanned == ["b"] and len(got) == 7  # the new instance is drawn, only b was rescanned


def _shard(path, start, mean, reasons):
    writer_process(path, ["x", "y"], 6, start, 4)
    with BankWriter(path) as w:
        w.set_size_prior("x", {"rel_sqrt_area_mean": mean, "rel_sqrt_area_std": 0.05, "n": 3})
        w.record_rejections(reasons)


def _merged_state(path):
    bank = InstanceBank(path)
    stats = bank.stats(refresh=True)
    return set(bank.ids()), bank.size_prior("x"), stats["rejections"], stats["total"]


def test_merge_into_existing_bank_pools_and_is_idempotent(tmp_path):
    import shutil

    from genval_aug.bank.priors import pool_priors

    a, c, out, ref = (str(tmp_path / n) for n in ("a.lmdb", "c.lmdb", "out.lmdb", "ref.lmdb"))
    _shard(a, 0, 0.1, {"too_small": 2})
    _shard(c, 100, 0.4, {"too_small": 1, "coverage": 4})
    merge(out, [a])
    merge(out, [c])  # a second merge into the same, existing output
    ids, prior, rejections, total = _merged_state(out)
    merge(ref, [a, c])
    assert (ids, rejections, total) == _merged_state(ref)[0:1] + _merged_state(ref)[2:]
    expected = pool_priors([InstanceBank(a).size_prior("x"), InstanceBank(c).size_prior("x")])
    assert prior["n"] == expected["n"] == 6
    for key in ("rel_sqrt_area_mean", "rel_sqrt_area_std"):
        assert prior[key] == pytest.approx(expected[key])
        assert _merged_state(ref)[1][key] == pytest.approx(expected[key])
    assert rejections == {"too_small": 3, "coverage": 4}
    assert verify(out).ok

    # re-merging A, or a copy of A, changes nothing
    merge(out, [a])
    shutil.copytree(a, str(tmp_path / "a_copy.lmdb"))
    merge(out, [str(tmp_path / "a_copy.lmdb"), c])
    ids2, prior2, rejections2, total2 = _merged_state(out)
    assert (ids2, rejections2, total2) == (ids, rejections, total)
    assert prior2["n"] == prior["n"]
    for key in ("rel_sqrt_area_mean", "rel_sqrt_area_std"):
        assert prior2[key] == pytest.approx(prior[key])
    assert verify(out).ok


def test_merge_replaces_a_grown_shards_contribution(tmp_path):
    a, out = str(tmp_path / "a.lmdb"), str(tmp_path / "out.lmdb")
    _shard(a, 0, 0.1, {"too_small": 2})
    merge(out, [a])
    writer_process(a, ["x", "y"], 4, 50, 4)  # the shard grows and is re-harvested
    with BankWriter(a) as w:
        w.set_size_prior("x", {"rel_sqrt_area_mean": 0.2, "rel_sqrt_area_std": 0.0, "n": 5})
        w.record_rejections({"too_small": 1})
    merge(out, [a])
    ids, prior, rejections, total = _merged_state(out)
    assert ids == set(InstanceBank(a).ids()) and total == 10
    assert prior == pytest.approx({"n": 5, "rel_sqrt_area_mean": 0.2, "rel_sqrt_area_std": 0.0})
    assert rejections == {"too_small": 3}
    assert verify(out).ok


def test_merge_identity_of_banks_without_uuid_survives_copy(tmp_path):
    import shutil

    a, out = str(tmp_path / "a.lmdb"), str(tmp_path / "out.lmdb")
    _shard(a, 0, 0.1, {"too_small": 2})
    env = lmdb.open(a, max_dbs=8)  # make it look like a bank written before uuids existed
    with env.begin(write=True) as txn:
        txn.delete(b"uuid", db=env.open_db(b"meta", txn=txn))
    env.close()
    merge(out, [a])
    shutil.copytree(a, str(tmp_path / "a2.lmdb"))
    merge(out, [str(tmp_path / "a2.lmdb")])
    _, prior, rejections, total = _merged_state(out)
    assert prior["n"] == 3 and rejections == {"too_small": 2} and total == 6


def _read_in_child(path, q):
    q.put(InstanceBank(path).count())


def _count_in_forked_child(bank_path, ctx, q) -> int:
    """The bank's instance count as a forked child reads it (the child must exit cleanly)."""
    p = ctx.Process(target=_read_in_child, args=(bank_path, q))
    p.start()
    p.join(20)
    assert p.exitcode == 0
    return q.get(timeout=5)


def test_fork_while_another_parent_thread_reads(bank_path):
    """Forking closes the parent's read-only handle; a parent thread reading at that moment must not fail."""
    import threading

    fill(bank_path, 24)
    bank = InstanceBank(bank_path)
    ids = bank.ids()
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader():
        nonlocal reads
        try:
            while not stop.is_set():
                for i in ids:
                    assert bank.get(i).rgba.shape[2] == 4
                    reads += 1
        except BaseException as e:  # noqa: BLE001 - the test reports whatever the reader hit
            errors.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    try:
        for _ in range(30):
            assert _count_in_forked_child(bank_path, ctx, q) == 24
            if errors:
                break
    finally:
        stop.set()
        t.join(20)
    assert not errors, f"parent reader failed after {reads} reads: {errors[0]!r}"
    assert reads > 0


@pytest.mark.parametrize("bad", [
    {"category_id": "x"},                                         # int() fails inside the transaction
    {"category_id": 2.5},
    {"source": {"kind": "harvest", "file": __import__("pathlib").Path("/x")}},  # not JSON
    {"source": "harvest"},                                        # not a mapping
    {"verdict": {"keep": True, "score": "high"}},                 # float(score) fails
    {"category": "x" * 600},                                      # LMDB keys are at most 511 bytes
    {"category": 7},
])
def test_a_bad_add_is_refused_at_once_and_does_not_poison_the_batch(bank_path, bad):
    """One invalid add used to be queued, then fail inside every later commit: the good instances queued
    beside it were never committed and the writer could not commit anything again (close raised too)."""
    kw = {"category": "a", **bad}
    with BankWriter(bank_path, batch_size=100) as w:
        good = w.add(make_rgba(0), category="a")
        with pytest.raises(ValueError, match="category|source|verdict|score|metadata"):
            w.add(make_rgba(1), **kw)
        with pytest.raises(TypeError, match="JSON"):
            w.set_status("s", {"p": __import__("pathlib").Path("/x")})
        w.set_size_prior("a", {"n": 3, "aspect_mean": 1.0})
        w.flush()
        later = w.add(make_rgba(2), category="b")
    bank = InstanceBank(bank_path)
    assert set(bank.ids()) == {good, later} and bank.size_prior("a")["n"] == 3
    assert verify(bank).ok


@pytest.mark.parametrize("corrupt", [b"{not json", b'{"id": "x", "score": "high", "width": null}', b"[1, 2]"])
def test_filtered_sampler_skips_and_counts_corrupt_metadata(bank_path, caplog, corrupt):
    """The filtered sampler scanned metadata with ``iter_meta`` and compared fields without checks: one record
    with bad JSON or a non-numeric score/width raised out of ``sample`` instead of being skipped and counted."""
    with BankWriter(bank_path) as w:
        ids = [w.add(make_rgba(i), category="a", verdict={"keep": True, "score": 0.9}) for i in range(4)]
    env = lmdb.open(bank_path, max_dbs=8)
    records = env.open_db(b"records")
    with env.begin(write=True) as txn:
        txn.put(ids[0].encode(), corrupt, db=records)
    env.close()
    sampler = BankSampler(bank_path, min_score=0.5, min_side=2)
    with caplog.at_level("WARNING"):
        out = sampler.sample(np.random.default_rng(0), 20)
        sampler.refresh()
        out += sampler.sample(np.random.default_rng(1), 20)
    assert len(out) == 40 and {i.id for i in out} <= set(ids[1:])
    assert sampler.skipped == 2  # once per scan of the category
    assert sum("corrupt bank record" in r.message for r in caplog.records) == 1


def _edit(path, db, key, value):
    env = lmdb.open(path, max_dbs=8)
    handle = env.open_db(db.encode())
    with env.begin(write=True) as txn:
        txn.put(key.encode() if isinstance(key, str) else key, value, db=handle)
    env.close()


@pytest.mark.parametrize("what, edit, needle", [
    ("category not a string", lambda m: m.update(category=5), "category"),
    ("category null", lambda m: m.update(category=None), "category"),
    ("height missing", lambda m: m.pop("height"), "height"),
    ("width not a number", lambda m: m.update(width="wide"), "width"),
    ("category_id differs from the bank's", lambda m: m.update(category_id=77), "category_id"),
])
def test_verify_reports_bad_metadata_fields_instead_of_crashing(bank_path, what, edit, needle):
    """verify raised AttributeError/KeyError on a record whose category is not a string or whose height is
    missing (the whole check died instead of listing the bad record), and did not notice a record whose
    category_id is not its category's id."""
    with BankWriter(bank_path) as w:
        ids = [w.add(make_rgba(i), category="ab"[i % 2]) for i in range(4)]
    bank = InstanceBank(bank_path)
    meta = bank.get_meta(ids[0])
    bank.close()  # _edit opens the environment itself
    edit(meta)
    _edit(bank_path, "records", ids[0], __import__("json").dumps(meta).encode())
    report = verify(bank_path)
    assert not report.ok and any(ids[0] in e and needle in e for e in report.errors), (what, report.errors)


def test_verify_reports_non_rgba8_images_and_shared_category_ids(bank_path):
    import json

    import cv2
    with BankWriter(bank_path) as w:
        ids = [w.add(make_rgba(i), category="ab"[i % 2]) for i in range(4)]
    deep = np.zeros((24, 32, 4), np.uint16)
    deep[..., 3] = 65535
    _edit(bank_path, "images", ids[0], cv2.imencode(".png", deep)[1].tobytes())  # a 16-bit RGBA PNG
    bank = InstanceBank(bank_path)
    with pytest.raises(BadRecordError, match=f"{ids[0]}.*uint16"):
        bank.get(ids[0])  # was returned as a uint16 "RGBA" instance
    stats = bank.stats(refresh=True)
    bank.close()
    stats["categories"]["b"]["id"] = stats["categories"]["a"]["id"]
    _edit(bank_path, "meta", "stats", json.dumps(stats).encode())
    errors = verify(bank_path).errors
    assert any(ids[0] in e and "uint16" in e for e in errors), errors
    assert any("'a'" in e and "'b'" in e and "id" in e for e in errors), errors


def test_verify_catches_a_bit_flip_that_still_decodes(bank_path):
    """LZ4 (the default codec) has no checksum: a flipped bit in a literal decodes to different pixels
    without error, and verify said OK. The record id is the content hash of category + pixels, so verify
    now recomputes it."""
    with BankWriter(bank_path) as w:
        ids = [w.add(make_rgba(i), category="a") for i in range(3)]
    bank = InstanceBank(bank_path)
    before = bank.get(ids[0]).rgba.copy()
    bank.close()
    env = lmdb.open(bank_path, max_dbs=8)
    images = env.open_db(b"images")
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(ids[0].encode(), db=images))
        raw[40] ^= 0x01
        txn.put(ids[0].encode(), bytes(raw), db=images)
    env.close()
    assert not np.array_equal(InstanceBank(bank_path).get(ids[0]).rgba, before)  # decodes, other pixels
    report = verify(bank_path)
    assert not report.ok and any(ids[0] in e and "content id" in e for e in report.errors), report.errors
    assert verify(bank_path, decode=False).ok  # the cheap check does not decode


def test_merge_skips_and_reports_corrupt_input_records(tmp_path, caplog):
    """One record with unreadable metadata in an input stopped merge midway: the batches before it were
    already committed to the output, the rest and the input's bookkeeping (priors, status) were not."""
    src, out = str(tmp_path / "src.lmdb"), str(tmp_path / "out.lmdb")
    with BankWriter(src) as w:
        ids = [w.add(make_rgba(i), category="a") for i in range(40)]
        w.set_size_prior("a", {"n": 40, "aspect_mean": 1.0, "aspect_std": 0.0})
    env = lmdb.open(src, max_dbs=8)
    records = env.open_db(b"records")
    with env.begin(write=True) as txn:
        txn.put(ids[30].encode(), b"{broken", db=records)
    env.close()
    with caplog.at_level("WARNING"):
        res = merge(out, [src], batch_size=8)
    assert res["added"] == 39 and res["skipped"] == 1
    assert any(ids[30] in r.message for r in caplog.records)
    bank = InstanceBank(out)
    assert bank.count() == 39 and ids[30] not in bank and bank.size_prior("a")["n"] == 40
    assert len(bank.statuses("merge/")) == 1 and verify(bank).ok


def test_export_import_round_trip_with_long_and_odd_category_names(tmp_path):
    """A category name the bank accepts (up to 505 UTF-8 bytes) became one folder name of the export; over
    255 bytes the export failed (ENAMETOOLONG). Folder names are now capped; the manifest keeps the name."""
    from genval_aug.bank import export_folder, import_folder
    names = ["é" * 200, "x" * 505, "a/b", "a_b", "ünï ✓", "\x00nul"]
    with BankWriter(tmp_path / "b.lmdb") as w:
        ids = {w.add(make_rgba(i), category=c, category_id=10 + i): c for i, c in enumerate(names)}
    export_folder(tmp_path / "b.lmdb", tmp_path / "exp")
    import_folder(tmp_path / "back.lmdb", tmp_path / "exp")
    a, b = InstanceBank(tmp_path / "b.lmdb"), InstanceBank(tmp_path / "back.lmdb")
    assert set(b.ids()) == set(ids) and b.category_ids() == a.category_ids()
    for rid in ids:
        assert np.array_equal(a.get(rid).rgba, b.get(rid).rgba) and b.get_meta(rid)["category"] == ids[rid]


@pytest.mark.parametrize("mode, kw, needle", [
    ("weights", {}, "weights"),
    ("weights", {"weights": {"cat": "heavy"}}, "weights"),
    ("rare_boost", {}, "dataset_frequencies"),
])
def test_sampler_config_errors_surface_at_construction(bank_path, mode, kw, needle):
    """A 'weights'/'rare_boost' sampler without (or with unusable) weights/frequencies was accepted and only
    failed at its first draw, i.e. inside a DataLoader worker; a non-numeric weight gave a bare ValueError."""
    fill(bank_path, 3)
    with pytest.raises(ConfigError, match=needle):
        BankSampler(bank_path, mode, **kw)


def test_writer_adopts_a_map_grown_by_another_writer_process(bank_path):
    """A second writer process grew the file past this writer's map: the next commit's begin() raised
    MapResizedError (flush only handled MapFullError), so the queued batch was lost and close() raised."""
    from bank_helpers import noise_writer_process

    with BankWriter(bank_path, map_size=1 << 20, batch_size=100) as w:
        first = w.add(make_rgba(0), category="a")
        w.flush()
        p = mp.get_context("spawn").Process(target=noise_writer_process, args=(bank_path, 4, 600, 10))
        p.start()
        p.join(120)
        assert p.exitcode == 0
        BankWriter(bank_path)  # its schema check reads through the same (now too small) map
        second = w.add(make_rgba(1), category="a")
    bank = InstanceBank(bank_path)
    assert first in bank and second in bank and bank.count() == 6 and verify(bank).ok


@contextlib.contextmanager
def reading_threads(bank_path, n: int = 1):
    """Threads reading the bank in a loop while the block runs; yields the list their errors go to."""
    import threading

    errors: list[str] = []
    stop = threading.Event()

    def read():
        bank = InstanceBank(bank_path)
        while not stop.is_set():
            try:
                for rid in list(bank.ids())[:4]:
                    bank.get(rid)
            except Exception as e:  # noqa: BLE001 - any failure is what the tests count
                errors.append(repr(e))

    threads = [threading.Thread(target=read) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield errors
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_map_growth_waits_for_reads_in_other_threads_of_the_writer_process(bank_path):
    """Growing the map (set_mapsize) while another thread of the same process had a read transaction open
    broke that thread's reads (InvalidParameterError from begin()); LMDB allows a resize only while the
    process has no transaction open."""
    with BankWriter(bank_path, map_size=1 << 16, batch_size=1) as w:
        w.add(make_rgba(0), category="a")
        with reading_threads(bank_path) as errors:
            for i in range(6):
                a = np.random.default_rng(i).integers(0, 256, (300, 300, 4), dtype=np.uint8)
                a[..., 3] = 255
                w.add(a, category="noise")
    assert w._map_size > 1 << 16 and errors == []
    assert InstanceBank(bank_path).count() == 7 and verify(bank_path).ok


def test_opening_and_closing_a_writer_does_not_break_reads_in_other_threads(bank_path):
    """The process keeps one LMDB handle per bank: opening a BankWriter replaces a read-only handle (closing
    it) and BankWriter.close() closes the shared one, both while other threads of the process might be
    reading through it."""
    fill(bank_path, 4)
    with reading_threads(bank_path, 2) as errors:
        for i in range(30):
            with BankWriter(bank_path) as w:
                w.add(make_rgba(100 + i), category="cat")
    assert errors == [] and InstanceBank(bank_path).count() == 34


def test_import_skips_name_the_file_for_every_kind_of_bad_instance(tmp_path):
    """An RGBA file with an empty alpha channel (or a manifest entry with an unusable category) was skipped
    with "instance of 'cls': alpha channel is empty": the report did not say which file."""
    import json

    import cv2

    from genval_aug.bank import import_folder
    (tmp_path / "in" / "cls").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "in" / "cls" / "clear.png"), np.zeros((5, 5, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "in" / "cls" / "ok.png"), cv2.cvtColor(make_rgba(0), cv2.COLOR_RGBA2BGRA))
    res = import_folder(tmp_path / "b.lmdb", tmp_path / "in")
    assert res["added"] == 1 and res["skipped"] == 1 and "clear.png" in res["errors"][0], res
    (tmp_path / "in" / "manifest.json").write_text(json.dumps({"instances": [
        {"file": "cls/ok.png", "category": ""}, {"file": "cls/ok.png", "category": "a", "category_id": "x"}]}))
    res = import_folder(tmp_path / "b2.lmdb", tmp_path / "in")
    assert res["added"] == 0 and res["skipped"] == 2 and all("ok.png" in e for e in res["errors"]), res


def test_forked_children_read_a_bank_whose_writer_the_parent_holds(bank_path):
    """Only read-only handles were closed before a fork: a process holding an open BankWriter forked children
    that could not read the bank at all (py-lmdb: 'The environment ... is already open in this process'),
    e.g. DataLoader workers started while a top-up writer runs in the training process. Forks from a thread
    while another thread commits must not break the commit either."""
    import threading

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    errors: list[BaseException] = []
    with BankWriter(bank_path, batch_size=1) as w:
        for i in range(4):
            w.add(make_rgba(i), category="cat")
        stop = threading.Event()

        def write():
            i = 100
            try:
                while not stop.is_set():
                    w.add(make_rgba(i), category="dog")
                    i += 1
            except BaseException as e:  # noqa: BLE001 - the test reports whatever the writer hit
                errors.append(e)

        t = threading.Thread(target=write)
        t.start()
        try:
            for _ in range(5):
                assert _count_in_forked_child(bank_path, ctx, q) >= 4
        finally:
            stop.set()
            t.join(20)
        w.add(make_rgba(99), category="cat")
    assert not errors, repr(errors[0])
    bank = InstanceBank(bank_path)
    assert bank.count("cat") == 5 and bank.count("dog") > 0 and verify(bank).ok


def test_readers_refuse_a_bank_with_a_newer_schema(bank_path):
    """BankWriter refused a bank whose schema is newer than this code, but InstanceBank (and so every sampler
    and DataLoader worker) read and decoded it as if it had today's format."""
    with BankWriter(bank_path) as w:
        rid = w.add(make_rgba(0), category="a")
    _edit(bank_path, "meta", "schema", b'{"version": 99}')
    with pytest.raises(BankError, match="schema 99.*newer"):
        InstanceBank(bank_path).get(rid)
    report = verify(bank_path)
    assert not report.ok and any("schema 99" in e for e in report.errors)


def test_export_import_round_trip_keeps_size_priors(tmp_path):
    """Size priors (paste-time scales) were not exported: a bank rebuilt from its export pasted at other
    scales. They travel in manifest.json now; an import never overwrites a prior the bank already has."""
    from genval_aug.bank import export_folder, import_folder
    prior = {"n": 5, "rel_sqrt_area_mean": 0.2, "rel_sqrt_area_std": 0.05, "aspect_mean": 1.3, "aspect_std": 0.2}
    with BankWriter(tmp_path / "b.lmdb") as w:
        w.add(make_rgba(0), category="a")
        w.add(make_rgba(1), category="b")
        w.set_size_prior("a", prior)
    export_folder(tmp_path / "b.lmdb", tmp_path / "exp")
    import_folder(tmp_path / "back.lmdb", tmp_path / "exp")
    back = InstanceBank(tmp_path / "back.lmdb")
    assert back.size_prior("a") == prior and back.size_prior("b") is None
    mine = {**prior, "n": 9}
    with BankWriter(tmp_path / "other.lmdb") as w:
        w.set_size_prior("a", mine)
    import_folder(tmp_path / "other.lmdb", tmp_path / "exp")
    assert InstanceBank(tmp_path / "other.lmdb").size_prior("a") == mine


def _flip_image(path, rid, edit):
    """Apply ``edit`` (bytearray -> None) to the stored image bytes of record ``rid``."""
    env = lmdb.open(path, max_dbs=8)
    images = env.open_db(b"images")
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(rid.encode(), db=images))
        edit(raw)
        txn.put(rid.encode(), bytes(raw), db=images)
    env.close()


@pytest.mark.parametrize("codec", ["lz4", "zlib"])
@pytest.mark.parametrize("h, w", [(16000, 16000), (100000, 100000), (0, 7)])
def test_a_header_claiming_huge_dimensions_fails_without_allocating(bank_path, codec, h, w):
    """The raw codecs' 12-byte header gives height and width; a corrupt one claiming 16000x16000 made the LZ4
    decoder reserve 1 GB (np.empty) before failing, 100000x100000 got as far as numpy refusing 37 GiB. The
    declared size is now checked against the stored byte length first."""
    import struct
    import tracemalloc

    with BankWriter(bank_path, codec=codec) as w_:
        rid = w_.add(make_rgba(0), category="a")
        good = w_.add(make_rgba(1), category="a")
    _flip_image(bank_path, rid, lambda raw: struct.pack_into("<II", raw, 4, h, w))
    bank = InstanceBank(bank_path)
    tracemalloc.start()
    try:
        with pytest.raises(BadRecordError) as err:
            bank.get(rid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding the corrupt header allocated {peak / 2**20:.0f} MiB"
    assert rid in str(err.value) and f"declares {h}x{w}" in str(err.value), err.value
    assert bank.get(good).rgba.shape == (24, 32, 4)
    assert any(rid in e for e in verify(bank_path).errors)


def test_instances_over_the_pixel_limit_are_refused_on_write(bank_path, monkeypatch):
    """What the reader refuses as implausibly large must never be written in the first place."""
    from genval_aug.bank import record

    monkeypatch.setattr(record, "MAX_PIXELS", 24 * 32 - 1)
    with BankWriter(bank_path) as w:
        with pytest.raises(BadInstanceError, match="limit"):
            w.add(make_rgba(0), category="a")
        w.add(make_rgba(0, h=23), category="a")
    assert InstanceBank(bank_path).count() == 1


def test_merge_does_not_spread_corrupt_images(tmp_path, caplog):
    """merge copied image bytes without decoding them: an input record whose LZ4 bytes had a flipped bit (still
    decodes, to other pixels than its content id was hashed from) ended up in the output, where only verify
    caught it. Each copied record is now checked like verify does; bad ones are skipped, counted, listed."""
    import struct

    src, out = str(tmp_path / "src.lmdb"), str(tmp_path / "out.lmdb")
    with BankWriter(src) as w:
        ids = [w.add(make_rgba(i), category="a") for i in range(12)]
    _flip_image(src, ids[3], lambda raw: raw.__setitem__(40, raw[40] ^ 0x01))  # decodes, other pixels
    _flip_image(src, ids[7], lambda raw: struct.pack_into("<II", raw, 4, 32, 24))  # transposed header
    assert InstanceBank(src).get(ids[3]).rgba.shape == (24, 32, 4)  # the reader cannot tell
    with caplog.at_level("WARNING", logger="genval_aug.bank.maintenance"):
        res = merge(out, [src], batch_size=4)
    assert (res["added"], res["skipped"]) == (10, 2)
    assert [e for e in res["errors"] if ids[3] in e and "content id" in e]
    assert [e for e in res["errors"] if ids[7] in e and "metadata says" in e]
    assert len([r for r in caplog.records if "skipped 2 corrupt" in r.message]) == 1  # logged once
    bank = InstanceBank(out)
    assert ids[3] not in bank and ids[7] not in bank and bank.count() == 10
    assert verify(bank).ok
    res = merge(str(tmp_path / "unchecked.lmdb"), [src], check=False)  # the old byte copy, for trusted inputs
    assert res["skipped"] == 0 and not verify(str(tmp_path / "unchecked.lmdb")).ok


def test_a_read_longer_than_the_fork_wait_starts_again_after_the_fork(bank_path, monkeypatch):
    """A fork waits FORK_READ_WAIT s for other threads' reads, then closes the handle anyway: a read still running
    (a long scan of a big bank) failed with lmdb.Error ('closed/deleted/dropped object'). It now starts again
    once through a fresh handle."""
    import threading

    from genval_aug.bank import store

    monkeypatch.setattr(store, "FORK_READ_WAIT", 0.2)
    fill(bank_path, 6)
    bank = InstanceBank(bank_path)
    ids = sorted(bank.ids())
    inside, go, calls, got = threading.Event(), threading.Event(), [], []

    def slow_scan(txn, dbs):  # reads, waits past the fork, reads again in the same transaction
        calls.append(1)
        first = txn.get(ids[0].encode(), db=dbs["records"])
        inside.set()
        go.wait(10)
        return first, [k.decode() for k in txn.cursor(db=dbs["records"]).iternext(values=False)]

    def reader():
        try:
            got.append(bank._read(slow_scan))
        except BaseException as e:  # noqa: BLE001 - the test reports whatever the reader hit
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(10)
    ctx = mp.get_context("fork")
    try:
        assert _count_in_forked_child(bank_path, ctx, ctx.Queue()) == 6
    finally:
        go.set()
        t.join(20)
    assert not isinstance(got[0], BaseException), f"the parent's read failed: {got[0]!r}"
    assert got[0][1] == ids and len(calls) == 2 and bank.count() == 6
