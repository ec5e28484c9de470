"""Background top-up worker (issue 9): a spawned writer process, readers in DataLoader workers,
clean stop on SIGTERM, crash safety on SIGKILL, resume without duplicates, most-drawn top-ups."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # genval_build_testplugins, importable by the spawned worker

from genval_aug.bank import BankSampler, InstanceBank, verify  # noqa: E402
from genval_aug.build import BankBuilder, load_config  # noqa: E402
from genval_aug.build.draws import DrawCounter, TrackingSampler, read_draws  # noqa: E402
from genval_aug.build.worker import run_worker, start_worker  # noqa: E402

PLUG = "genval_build_testplugins"
CLASSES = ["mug", "kite", "shoe"]

try:  # the torchvision adapter (branch tv-adapter); the bank sampler is read directly without it
    from genval_aug.transforms import GenValPaste
except ImportError:  # pragma: no cover - depends on merge order
    GenValPaste = None


def write_cfg(tmp: Path, target: int, delay: float = 0.0, name: str = "w.yaml", **over) -> Path:
    cfg = {
        "name": "w",
        "seed": 11,
        "output": {"bank": "bank.lmdb"},
        "classes": {"names": CLASSES, "target": target},
        "source": {"kind": "shapes", "batch_size": 4, "params": {"size": 48, "bad_fraction": 0.2, "delay": delay}},
        "validator": {"kind": f"{PLUG}:make_validator", "batch_size": 4, "params": {"keep_rate": 0.8}},
        "prefilter": {"reject_border": True},
        "pipeline": {"progress": False},
        "worker": {"poll_interval": 0.2},
        **over,
    }
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def safe_count(path) -> int:
    try:
        return InstanceBank(path, refresh_interval=None).count()
    except Exception:  # not created yet / being created by the worker
        return 0


def units_by_class(path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in InstanceBank(path).iter_meta():
        out.setdefault(m["category"], []).append(m["source"]["unit"])
    return out


class RecordingSampler:
    """Sampler wrapper that remembers the ids of its last draw (the dataset returns them)."""

    def __init__(self, inner):
        self.inner = inner
        self.last: list[str] = []

    def sample(self, rng, n):
        out = self.inner.sample(rng, n)
        self.last = [i.id for i in out]
        return out

    def __getattr__(self, name):
        if name.startswith("__") or name in ("inner", "last"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class PasteDataset(torch.utils.data.Dataset):
    """Blank images with one box each, augmented with instances from the bank being topped up."""

    def __init__(self, bank: str, draws: str, n: int = 100000):
        inner = TrackingSampler(BankSampler(InstanceBank(bank, refresh_interval=0.2)), draws, flush_interval=0.2)
        self.sampler = RecordingSampler(inner)
        self.n = n
        self.transform = GenValPaste(self.sampler, n=2, p=1.0, seed=5) if GenValPaste is not None else None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(0.01)
        if self.transform is None:
            self.sampler.sample(np.random.default_rng(i), 2)
            return ",".join(self.sampler.last), 2
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.zeros(3, 96, 96, dtype=torch.uint8))
        target = {"boxes": tv_tensors.BoundingBoxes([[4, 4, 20, 20]], format="XYXY", canvas_size=(96, 96)),
                  "labels": torch.tensor([0])}
        img, target = self.transform(img, target)
        return ",".join(self.sampler.last), int(len(target["labels"]))


@pytest.mark.slow
def test_worker_tops_up_while_dataloader_reads(tmp_path):
    torch.set_num_threads(1)
    cfg_path = write_cfg(tmp_path, target=3)
    BankBuilder(load_config(cfg_path)).run()                       # a small bank to start from
    bank = str(tmp_path / "bank.lmdb")
    initial = set(InstanceBank(bank).ids())
    assert len(initial) == 9
    draws = str(tmp_path / "draws")
    topup = load_config(write_cfg(tmp_path, target=25, delay=0.03, name="topup.yaml"))

    ds = PasteDataset(bank, draws)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True,
                                         collate_fn=lambda b: b)
    seen: list[set[str]] = []
    objects: list[int] = []
    with start_worker(bank, topup, exit_when_done=True) as worker:
        for batch in loader:
            seen.append({i for ids, _ in batch for i in ids.split(",") if i})
            objects += [n_obj for _, n_obj in batch]
            if not worker.is_alive() and len(seen) > 20:
                break
            assert len(seen) < 3000, "worker did not finish"
        assert worker.wait(30) == 0
        status = worker.status()
    del loader
    final = InstanceBank(bank)
    assert final.categories() == {c: 25 for c in CLASSES}          # targets respected, not overshot
    new_ids = set(final.ids()) - initial
    first, last = seen[0], set().union(*seen[-10:])
    assert first <= initial                                          # first batch: only the starting bank
    assert last & new_ids, "readers never drew an instance added by the worker"
    assert set().union(*seen) <= set(final.ids())
    assert status["state"] == "finished" and status["total_added"] == 66 and status["missing"] == 0
    if GenValPaste is not None:                                      # 1 original box + pasted ones
        assert min(objects) >= 1 and max(objects) == 3
    assert sum(read_draws(draws).values()) > 0                       # readers reported their draws
    assert verify(bank).ok


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_without_duplicates(tmp_path):
    cfg_path = write_cfg(tmp_path, target=30, delay=0.05)
    cfg = load_config(cfg_path)
    bank = str(tmp_path / "bank.lmdb")

    def added():
        try:
            return InstanceBank(bank, refresh_interval=None).count()
        except Exception:
            return 0

    # SIGTERM: the worker finishes its batch, writes its status and exits 0
    w = start_worker(bank, cfg)
    n0 = wait_for(lambda: added() >= 6 and added(), 60, "first instances")
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait(30) == 0
    st = InstanceBank(bank).get_status("worker")
    assert st["state"] == "stopped" and st["pid"] == w.pid
    assert verify(bank).ok and added() >= n0

    # SIGKILL mid-run: LMDB commits are atomic, the bank verifies
    w = start_worker(bank, cfg)
    n1 = added()
    wait_for(lambda: added() >= n1 + 6, 60, "more instances")
    os.kill(w.pid, signal.SIGKILL)
    assert w.wait(30) == -signal.SIGKILL
    assert verify(bank).ok
    assert added() < 90

    # restart resumes (without the emulated slowness: `delay` only sleeps): no unit twice, exactly the
    # instances of an uninterrupted build
    fast = load_config(write_cfg(tmp_path, target=30, delay=0.0, name="fast.yaml"))
    status = run_worker(fast, bank, exit_when_done=True)
    assert status["state"] == "finished"
    units = units_by_class(bank)
    assert all(len(u) == len(set(u)) == 30 for u in units.values())
    ref = tmp_path / "ref.lmdb"
    BankBuilder(fast, bank=ref).run()
    assert set(InstanceBank(bank).ids()) == set(InstanceBank(ref).ids())
    assert verify(bank).ok


def test_handle_stop_and_parent_side_api(tmp_path):
    cfg = load_config(write_cfg(tmp_path, target=400, delay=0.05))
    bank = str(tmp_path / "bank.lmdb")
    with start_worker(bank, cfg) as w:
        wait_for(lambda: (w.status() or {}).get("added", 0) > 0, 60, "worker status in the bank")
        st = w.status()
        assert st["state"] == "running" and st["classes_below_target"] == 3 and st["missing"] > 0
        assert set(st["deficit"]) == set(CLASSES)
    assert w.exitcode == 0 and not w.is_alive()
    assert w.status()["state"] == "stopped"
    assert verify(bank).ok


def test_most_drawn_classes_get_topped_up(tmp_path):
    cfg = load_config(write_cfg(tmp_path, target=4, worker={"poll_interval": 0, "most_drawn_top_k": 1,
                                                              "topup_step": 3, "max_extra_per_class": 6}))
    bank = str(tmp_path / "bank.lmdb")
    draws = tmp_path / "draws"
    c = DrawCounter(draws, flush_interval=0)
    c.record(["kite"] * 50 + ["mug"] * 5)       # kite instances are reused 10x more than mug ones
    c.flush()
    assert read_draws(draws) == {"kite": 50, "mug": 5}
    status = run_worker(cfg, bank, draws_dir=draws, max_cycles=4)
    assert status["extra"] == {"kite": 6}       # raised twice by 3, then capped
    assert InstanceBank(bank).categories() == {"mug": 4, "kite": 10, "shoe": 4}
    # the raise is remembered: a restarted worker keeps kite at 10
    status = run_worker(cfg, bank, draws_dir=draws, max_cycles=1)
    assert status["extra"] == {"kite": 6} and InstanceBank(bank).count("kite") == 10


def test_draw_counter_is_per_process_and_atomic(tmp_path):
    import multiprocessing as mp

    c = DrawCounter(tmp_path / "d", flush_interval=0)
    c.record(["a", "b", "a"])
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_child_draws, args=(c,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    files = sorted(os.listdir(tmp_path / "d"))
    assert len(files) == 2 and not any(f.startswith(".tmp-") for f in files)
    assert read_draws(tmp_path / "d") == {"a": 2, "b": 1, "z": 4}


def _child_draws(counter):
    counter.record(["z"] * 4)   # forked copy: its own counts, its own file (flushed at exit too)


def test_worker_cli_and_bank_stats_show_status(tmp_path, capsys):
    from genval_aug.cli import main

    cfg = write_cfg(tmp_path, target=5)
    assert main(["worker", "--config", str(cfg), "--once"]) == 0
    out = capsys.readouterr().out
    assert '"state": "finished"' in out and '"total_added": 15' in out
    assert main(["bank", "stats", str(tmp_path / "bank.lmdb")]) == 0
    stats = capsys.readouterr().out
    assert re.search(r"worker: finished \(pid \d+, .*\): \+15 added, \d+ rejected; 0 classes below target", stats)
    assert "prefilter:" in stats and "validator:plausible" in stats      # rejection reasons recorded
    # a foreground worker stops cleanly on SIGINT / SIGTERM
    cfg2 = write_cfg(tmp_path, target=500, delay=0.05, name="long.yaml")
    p = subprocess.Popen([sys.executable, "-m", "genval_aug.cli", "worker", "--config", str(cfg2)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                          str(Path(__file__).parent)])})
    wait_for(lambda: safe_count(tmp_path / "bank.lmdb") > 18, 60, "CLI worker")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-2000:]
    assert '"state": "stopped"' in out
    assert verify(tmp_path / "bank.lmdb").ok


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()           # exited, waiting to be reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_worker_stops_when_its_parent_dies(tmp_path):
    cfg = write_cfg(tmp_path, target=500, delay=0.05)
    code = ("import sys, time; from genval_aug.build import start_worker\n"
            f"w = start_worker(None, {str(cfg)!r}); print(w.pid, flush=True); time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                               str(Path(__file__).parent)])})
    pid = int(parent.stdout.readline())
    wait_for(lambda: safe_count(tmp_path / "bank.lmdb") > 3, 60, "worker")
    parent.kill()                                       # training process crashes: no stop() call
    parent.wait(10)
    wait_for(lambda: _gone(pid), 30, "orphaned worker to exit")
    assert InstanceBank(tmp_path / "bank.lmdb").get_status("worker")["state"] == "stopped"
    assert verify(tmp_path / "bank.lmdb").ok


def start_slow_loading_worker_cli(tmp_path) -> tuple[subprocess.Popen, Path]:
    """`genval-aug worker` on a source whose model load takes 120 s; the marker file appears when it starts."""
    marker = tmp_path / "loading"
    cfg = write_cfg(tmp_path, target=5, source={"kind": f"{PLUG}:make_slow_loading_source",
                                                 "params": {"marker": str(marker), "load_s": 120}})
    p = subprocess.Popen([sys.executable, "-m", "genval_aug.cli", "worker", "--config", str(cfg)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                                          str(Path(__file__).parent)])})
    return p, marker


def test_worker_cli_second_signal_interrupts_a_long_model_load(tmp_path):
    """The first Ctrl-C asks for a clean stop, which only takes effect once the models are loaded; a second
    one must interrupt at once (it used to be swallowed, leaving `kill -9` as the only way out)."""
    p, marker = start_slow_loading_worker_cli(tmp_path)
    try:
        wait_for(marker.exists, 60, "the source to start loading")
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert p.poll() is None                       # first signal: clean stop requested, still loading
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err


def test_worker_outlives_a_dead_prompt_server(tmp_path):
    """A prompt server that is down stops a `bank build`, but the long-running worker logs it and tries
    again after its poll interval (bounded here by max_cycles) instead of dying."""
    import genval_build_testplugins as plug

    cfg = write_cfg(tmp_path, target=3, source={"kind": f"{PLUG}:make_tiny_generator", "params": {"size": 48}},
                    prompts={"kind": f"{PLUG}:make_dead_server_prompts", "n": 2})
    plug.DeadServerPrompts.calls = 0
    status = run_worker(cfg, max_cycles=2, poll_interval=0.01)
    assert plug.DeadServerPrompts.calls == 2 and status["cycles"] == 2
    assert status["state"] == "finished" and "failed after 5 attempts" in status["last_error"]


@pytest.mark.parametrize("poll", [float("nan"), -1.0])
def test_bad_poll_interval_is_refused_before_any_work(tmp_path, poll):
    # --poll nan made stop.wait() return at once: the idle worker spun on the bank instead of waiting
    from genval_aug.errors import ConfigError

    cfg = write_cfg(tmp_path, target=1)
    with pytest.raises(ConfigError, match="poll interval"):
        run_worker(cfg, poll_interval=poll, max_cycles=3)
    with pytest.raises(ConfigError, match="poll interval"):
        start_worker(None, cfg, poll_interval=poll)
    assert not (tmp_path / "bank.lmdb" / "data.mdb").exists()


def test_second_builder_on_the_same_bank_is_refused_while_a_worker_runs(tmp_path):
    """Two builders on one bank schedule the same units; with a generator whose pixels depend on its batch
    mates (Layer Diffusion) the ids differ and the unit is banked twice. A worker holds the bank's build lock
    for its lifetime; a second builder fails at once naming the holder; a dead holder's lock is free."""
    from genval_aug.errors import BankError

    p, marker = start_slow_loading_worker_cli(tmp_path)
    try:
        wait_for(marker.exists, 60, "the worker to start loading")
        fast = load_config(write_cfg(tmp_path, target=5, name="fast.yaml"))
        with pytest.raises(BankError, match=rf"being built by pid {p.pid}"):
            BankBuilder(fast).run()
    finally:
        p.kill()
        p.communicate()
    r = BankBuilder(fast).run()                      # SIGKILLed holder: the lock went with it
    assert r.total_added == 15
