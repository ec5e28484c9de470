"""The per-process decoded-instance cache (genval_aug.bank.cache) on a real LMDB bank, across refresh and fork."""
from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
from bank_helpers import make_rgba, writer_process

from genval_aug.bank import DEFAULT_CACHE_MB, BankSampler, CachedInstanceBank, InstanceBank
from genval_aug.bank.cache import with_cache
from genval_aug.bank.record import normalize_rgba
from genval_aug.lazy_engine import LazyPasteEngine


@pytest.fixture
def bank_path(tmp_path):
    path = str(tmp_path / "bank.lmdb")
    writer_process(path, ["cat", "dog"], 6, 0, 4)
    return path


def expected_rgba(inst) -> np.ndarray:
    return normalize_rgba(make_rgba(inst.meta["source"]["seed"]))


def test_cache_is_bounded_read_only_and_pickles_empty(tmp_path):
    path = str(tmp_path / "big.lmdb")
    from genval_aug.bank import BankWriter

    with BankWriter(path) as w:  # 7 cut-outs of 256 KB each: more than a 1 MB cache holds
        for i in range(7):
            w.add(make_rgba(i, 256, 256), category="blob")
    src = with_cache(path, cache_mb=1)
    assert isinstance(src, CachedInstanceBank)
    ids = list(src.ids())
    sizes = {i: src.get(i).rgba.nbytes for i in ids}
    assert src.cache_info()["bytes"] <= (1 << 20) and 0 < src.cache_info()["entries"] < len(ids)  # evicted, never over budget
    last = ids[-1]
    a, b = src.get(last), src.get(last)
    assert a is b and not a.rgba.flags.writeable and sizes[last] == a.rgba.nbytes
    first = src.get(ids[0])  # evicted long ago: decoded again, equal pixels
    assert np.array_equal(first.rgba, InstanceBank(path).get(ids[0]).rgba)
    info = src.cache_info()
    assert info["hits"] >= 1 and info["misses"] >= len(ids) + 1 and info["bytes"] <= info["max_bytes"] == 1 << 20
    c = pickle.loads(pickle.dumps(src))
    assert c.cache_bytes == src.cache_bytes and not c._lru and c.path == src.path
    assert type(with_cache(path, cache_mb=0)) is InstanceBank


def test_with_cache_keeps_bank_options_and_passes_samplers(bank_path):
    plain = InstanceBank(bank_path, refresh_interval=None)
    cached = with_cache(plain, 8)
    assert isinstance(cached, CachedInstanceBank) and cached.refresh_interval is None and cached.path == plain.path
    assert with_cache(plain, 0) is plain and with_cache(cached, 8) is cached
    sampler = BankSampler(plain, "uniform")
    assert with_cache(sampler, 8) is sampler  # a sampler draws through its own bank, used as given


def test_new_instances_from_a_top_up_writer_become_visible_after_refresh(bank_path):
    bank = CachedInstanceBank(bank_path, cache_mb=64, refresh_interval=None)
    before = {r: bank.get(r) for r in bank.ids()}
    assert bank.categories() == {"cat": 3, "dog": 3} and len(before) == 6
    # a top-up worker is another process writing to the same bank
    p = mp.get_context("spawn").Process(target=writer_process, args=(bank_path, ["cat", "dog", "zebra"], 9, 100, 4))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert bank.count() == 6  # counts are cached like a plain InstanceBank's ...
    bank.refresh()  # ... and re-read by refresh()
    assert bank.categories() == {"cat": 6, "dog": 6, "zebra": 3}
    rng = np.random.default_rng(0)
    drawn = {bank.random_instance("zebra", rng).id for _ in range(30)}
    assert len(drawn) == 3 and not drawn & set(before)
    for rid in bank.ids():  # old ids come from the cache, new ones decode; all equal what was written
        inst = bank.get(rid)
        assert np.array_equal(inst.rgba, expected_rgba(inst))
        if rid in before:
            assert inst is before[rid]
    assert bank.cache_info()["entries"] == 15


def _child_reads(bank: CachedInstanceBank, rid: str, out) -> None:
    start = bank.cache_info()
    inst = bank.get(rid)
    inst2 = bank.get(rid)
    out.put((start["entries"], start["hits"], bool(np.array_equal(inst.rgba, expected_rgba(inst))), inst is inst2,
             bank.cache_info()["entries"]))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cache_is_per_process_across_fork_and_spawn(bank_path, method):
    bank = CachedInstanceBank(bank_path, cache_mb=64)
    ids = sorted(bank.ids())
    for rid in ids[:4]:
        bank.get(rid)
    parent_info = bank.cache_info()
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(bank, ids[-1], q))
    p.start()
    start_entries, start_hits, equal, same, end_entries = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    assert (start_entries, start_hits) == (0, 0)  # the child starts its own cache ...
    assert equal and same and end_entries == 1  # ... decodes from its own LMDB handle and caches
    assert bank.cache_info() == parent_info  # the parent's cache is untouched by the child
    assert bank.get(ids[0]) is bank.get(ids[0])


def test_adapters_cache_by_default_and_cache_mb_zero_turns_it_off(bank_path):
    eng = LazyPasteEngine(bank_path)
    assert isinstance(eng.source, CachedInstanceBank) and eng.cache_mb == DEFAULT_CACHE_MB
    assert eng.source.cache_bytes == int(DEFAULT_CACHE_MB * (1 << 20))
    assert type(LazyPasteEngine(bank_path, cache_mb=0).source) is InstanceBank
    assert isinstance(LazyPasteEngine(InstanceBank(bank_path), cache_mb=4).source, CachedInstanceBank)
    restored = pickle.loads(pickle.dumps(eng))  # a spawned DataLoader worker: configuration only
    assert isinstance(restored.source, CachedInstanceBank) and not restored.source._lru
