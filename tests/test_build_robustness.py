"""Robustness of the bank build and the top-up worker against failing servers and plug-ins (agentfix):
transient vs permanent backend errors, short cached prompt sets, stages failing batch after batch."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # agents_support, genval_build_testplugins

from agents_support import ChatServer, verdict_json  # noqa: E402

from genval_aug.bank import InstanceBank  # noqa: E402
from genval_aug.build.worker import run_worker  # noqa: E402
from genval_aug.errors import BackendError, BackendUnavailableError  # noqa: E402


def judge_cfg(tmp: Path, base_url: str, target: int = 2, **over) -> Path:
    """One class of shapes judged by the real ValidationAgent over the loopback server (no retries, no cache)."""
    backend = {"kind": "openai", "model": "judge-vlm", "base_url": base_url, "api_key_env": "NONE",
               "max_retries": 0, "backoff": 0, "concurrency": 1, "cache": False}
    cfg = {"name": "r", "seed": 5, "output": {"bank": "bank.lmdb"},
           "classes": {"names": ["mug"], "target": target},
           "source": {"kind": "shapes", "batch_size": 2, "params": {"size": 48}},
           "validator": {"kind": "agent", "batch_size": 2, "params": {"backend": backend}},
           "prefilter": None, "pipeline": {"progress": False}, "worker": {"poll_interval": 0.01}, **over}
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def keep_all(body):
    return verdict_json()


# ----------------------------------------------------------------------------- 1. transient vs permanent


def test_wrong_model_name_stops_the_worker_instead_of_retrying_forever(tmp_path):
    # every BackendError used to count as "server down": the worker retried a 404 every poll, forever
    missing = ("status", 404, {"error": {"message": "The model `judge-vlm` does not exist."}})
    with ChatServer([missing]) as srv:
        cfg = judge_cfg(tmp_path, srv.base_url)
        with pytest.raises(BackendError, match=r"model 'judge-vlm'.*HTTP 404.*does not exist") as info:
            run_worker(cfg, max_cycles=5)
        assert not isinstance(info.value, BackendUnavailableError)
        assert len(srv.requests) == 1                      # not asked again
    st = InstanceBank(tmp_path / "bank.lmdb").get_status("worker")
    assert st["state"] == "failed" and st["worker_state"] == "failed" and st["cycles"] == 0
    assert "HTTP 404" in st["error"] and "judge-vlm" in st["error"] and "HTTP 404" in st["last_error"]


def test_wrong_model_name_makes_the_worker_cli_exit_non_zero(tmp_path, capsys):
    from genval_aug.cli import main

    with ChatServer([("status", 404, {"error": {"message": "no such model"}})]) as srv:
        rc = main(["worker", "--config", str(judge_cfg(tmp_path, srv.base_url))])   # no --once: would loop
    assert rc == 2
    err = capsys.readouterr().err
    assert "judge-vlm" in err and "HTTP 404: no such model" in err


def test_unavailable_server_is_retried_by_the_worker_until_it_recovers(tmp_path):
    loading = ("status", 503, {"error": {"message": "model is loading"}})
    with ChatServer([loading, keep_all]) as srv:
        status = run_worker(judge_cfg(tmp_path, srv.base_url, target=2), max_cycles=2)
    assert status["state"] == "finished" and status["cycles"] == 2
    assert status["total_added"] == 2 and status["last_error"] is None and "error" not in status
    assert InstanceBank(tmp_path / "bank.lmdb").categories() == {"mug": 2}


@pytest.mark.parametrize(("script", "transient"), [
    ([("status", 503, {"error": {"message": "busy"}})], True),
    ([("status", 425, {"error": {"message": "too early"}})], True),
    ([("status", 429, {"error": {"message": "slow down"}})], True),
    ([("status", 400, {"error": {"message": "bad request"}})], False),
    ([("status", 401, {"error": {"message": "bad key"}})], False),
    ([("status", 501, {"error": {"message": "no such endpoint"}})], False),
    ([("raw", "<html>proxy page</html>")], False),
])
def test_backend_tells_transient_from_permanent_failures(script, transient):
    from genval_aug.agents.backends import OpenAICompatibleBackend

    with ChatServer(script) as srv:
        b = OpenAICompatibleBackend("m", srv.base_url, api_key_env=None, max_retries=1, backoff=0)
        with pytest.raises(BackendError) as info:
            b.chat([{"role": "user", "content": "hi"}])
        assert isinstance(info.value, BackendUnavailableError) is transient, info.value
        assert len(srv.requests) == (2 if transient else 1)


def test_unreachable_server_is_transient():
    import socket

    from genval_aug.agents.backends import OpenAICompatibleBackend

    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAICompatibleBackend("m", f"http://127.0.0.1:{port}/v1", api_key_env=None, max_retries=0, backoff=0)
    with pytest.raises(BackendUnavailableError, match="connection failed"):
        b.chat([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------- 3. short cached prompt sets


class PromptSource:
    """Shapes that need prompts; records the prompt of every unit it makes."""

    name = "prompted-shapes"
    needs_prompts = True

    def __init__(self):
        from genval_aug.build.sources import ShapesSource

        self.shapes = ShapesSource(size=48)
        self.used: list[tuple[int, str]] = []

    def capacity(self, cls):  # noqa: ARG002
        return None

    def produce(self, units):
        self.used += [(u.index, u.prompt) for u in units]
        return self.shapes.produce(units)


class StingyPrompts:
    """A prompt maker (plain ``prompts(cls, n)``) that returns 3 prompts the first time, then ``n``."""

    def __init__(self, first: int = 3):
        self.first = first
        self.calls: list[int] = []

    def prompts(self, cls, n):
        self.calls.append(n)
        k = self.first if len(self.calls) == 1 else n
        return [f"a {cls.name}, variant {i}" for i in range(k)]


def prompt_cfg(tmp: Path, target: int, n: int = 8):
    from genval_aug.build import load_config

    p = tmp / "p.yaml"
    p.write_text(yaml.safe_dump({
        "name": "p", "seed": 1, "output": {"bank": "bank.lmdb"}, "classes": {"names": ["mug"], "target": target},
        "source": {"kind": "shapes", "batch_size": 4}, "validator": "none", "prefilter": None,
        "prompts": {"kind": "template", "n": n}, "pipeline": {"progress": False}}))
    return load_config(p)


def test_short_cached_prompt_set_is_completed_at_the_next_run_keeping_the_cached_ones(tmp_path):
    # a cached set was reused whenever its fingerprint matched: 3 of 8 prompts, for ever
    from genval_aug.build import BankBuilder

    maker, src = StingyPrompts(), PromptSource()
    b1 = BankBuilder(prompt_cfg(tmp_path, 6), components={"prompts": maker, "source": src})
    b1.run()
    st = InstanceBank(tmp_path / "bank.lmdb").get_status("prompts:p:mug")
    assert st["prompts"] == [f"a mug, variant {i}" for i in range(3)]
    assert {p for _, p in src.used} == set(st["prompts"])
    b1.run(targets={"mug": 6})                              # nothing to do: the maker is not asked
    assert maker.calls == [8]
    src.used.clear()
    b1.run(targets={"mug": 14})                            # same builder (a worker's next cycle): asks again
    assert maker.calls == [8, 8]
    st = InstanceBank(tmp_path / "bank.lmdb").get_status("prompts:p:mug")
    assert st["prompts"] == [f"a mug, variant {i}" for i in range(8)]     # cached three first, then the new
    assert [p for _, p in src.used] == [st["prompts"][i % 8] for i, _ in src.used]
    b2 = BankBuilder(prompt_cfg(tmp_path, 20), components={"prompts": maker, "source": src})
    b2.run()
    assert maker.calls == [8, 8]                            # a complete set is reused as before


def test_short_prompt_set_is_kept_when_the_maker_fails_to_complete_it(tmp_path):
    from genval_aug.build import BankBuilder

    class Fails(StingyPrompts):
        def prompts(self, cls, n):
            if self.calls:
                self.calls.append(n)
                raise RuntimeError("model returned nothing")
            return super().prompts(cls, n)

    maker, src = Fails(), PromptSource()
    BankBuilder(prompt_cfg(tmp_path, 4), components={"prompts": maker, "source": src}).run()
    r = BankBuilder(prompt_cfg(tmp_path, 8), components={"prompts": maker, "source": src}).run()
    assert maker.calls == [8, 8] and r.total_added == 4 and r.gave_up == []
    assert InstanceBank(tmp_path / "bank.lmdb").get_status("prompts:p:mug")["prompts"] == \
        [f"a mug, variant {i}" for i in range(3)]


def test_prompt_agent_is_asked_only_for_the_missing_prompts(tmp_path):
    """The LLM prompt maker (real PromptAgent over the loopback server) gets the cached prompts as ones not to
    repeat and is asked for the missing number only."""
    import json
    import re

    from agents_support import tiny_clip_tokenizer

    from genval_aug.build import BankBuilder

    tiny_clip_tokenizer().save_pretrained(tmp_path / "tok")
    asked: list[int] = []

    def llm(body):
        user = body["messages"][-1]["content"]
        k = int(re.search(r"Write (\d+) different prompts", user).group(1))
        asked.append(k)
        start = 0 if len(asked) == 1 else 3
        k = min(k, 3) if len(asked) == 1 else k
        views = ["front", "side", "top", "back", "low angle", "close-up", "far", "tilted"]
        return json.dumps({"prompts": [f"A single mug, {views[start + i]} view" for i in range(k)]})

    with ChatServer([llm]) as srv:
        backend = {"kind": "openai", "model": "llm", "base_url": srv.base_url, "api_key_env": "NONE",
                   "cache": False, "backoff": 0}
        cfg = prompt_cfg(tmp_path, 4, n=6)
        cfg.prompts.kind = "agent"
        cfg.prompts.params = {"backend": backend, "tokenizer": str(tmp_path / "tok"), "max_retries": 0}
        BankBuilder(cfg, components={"source": PromptSource()}).run()
        assert asked == [6]
        BankBuilder(cfg, components={"source": PromptSource()}).run(targets={"mug": 8})
        assert asked == [6, 3]
        assert "A single mug, front view" in srv.requests[-1]["messages"][-1]["content"]   # "do not repeat"
    st = InstanceBank(tmp_path / "bank.lmdb").get_status("prompts:p:mug")
    assert st["prompts"] == [f"A single mug, {v} view" for v in ["front", "side", "top", "back", "low angle",
                                                                   "close-up"]]


# ----------------------------------------------------------------------------- 4. stages failing on every batch


def stage_cfg(tmp: Path, target: int = 12, **over):
    from genval_aug.build import load_config

    cfg = {"name": "s", "seed": 2, "output": {"bank": "bank.lmdb"}, "classes": {"names": ["mug", "kite"],
           "target": target}, "source": {"kind": "shapes", "batch_size": 4, "params": {"size": 48}},
           "validator": {"kind": "none", "batch_size": 2}, "prefilter": None, "pipeline": {"progress": False},
           **over}
    p = tmp / "s.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p)


def settled(bank) -> int:
    from genval_aug.build.pipeline import scan_units

    return sum(len(v) for v in scan_units(InstanceBank(bank), "s").values())


def test_validator_raising_on_every_batch_stops_the_run_instead_of_burning_every_unit(tmp_path):
    # every batch was marked validator_error: 2 classes x 12 x max_attempts_factor (3) = 72 units used up
    from genval_aug.build import BankBuilder
    from genval_aug.build.pipeline import MAX_FAILED_BATCHES
    from genval_aug.errors import BuildStageError

    class Broken:
        name = "broken"
        calls = 0

        def validate(self, rgbas, categories):
            Broken.calls += 1
            raise TypeError("validate() got an unexpected keyword argument 'size'")

    with pytest.raises(BuildStageError, match=r"validator 'none' failed on 3 batches in a row \(last: TypeError: "
                                              r"validate\(\) got an unexpected"):
        BankBuilder(stage_cfg(tmp_path), components={"validator": Broken()}).run()
    assert Broken.calls == MAX_FAILED_BATCHES == 3
    assert settled(tmp_path / "bank.lmdb") == 2 * 2          # the first two failed batches of 2 instances
    st = InstanceBank(tmp_path / "bank.lmdb").get_status("build:s")
    assert st["state"] == "failed" and "BuildStageError" in st["error"]


def test_intermittent_validator_failures_do_not_stop_the_run(tmp_path):
    from genval_aug.build import BankBuilder

    class Flaky:
        name = "flaky"
        calls = 0

        def validate(self, rgbas, categories):
            Flaky.calls += 1
            if Flaky.calls % 3:                              # two failures, one success, ...
                raise ValueError("cannot judge")
            return [{"keep": True, "score": 1.0} for _ in rgbas]

    r = BankBuilder(stage_cfg(tmp_path, target=3), components={"validator": Flaky()}).run()
    assert r.total_added == 6 and r.rejected["validator_error"] > 0


def test_generator_failing_on_every_batch_stops_the_run(tmp_path):
    # GeneratorSource catches generate() errors and retries unit by unit: every unit became generation_error
    from genval_aug.build import BankBuilder
    from genval_aug.build.sources import GeneratorSource
    from genval_aug.errors import BuildStageError

    class BrokenGenerator:
        name = "broken-gen"
        calls = 0

        def generate(self, prompts, seeds, negative_prompt=None):
            BrokenGenerator.calls += 1
            raise TypeError("expected Tensor as element 0 in argument 0, but got NoneType")

    cfg = stage_cfg(tmp_path, prompts={"kind": "template", "n": 2})
    with pytest.raises(BuildStageError, match=r"source 'shapes' failed on 3 batches in a row \(last: every unit "
                                              r"failed \(generation_error: TypeError"):
        BankBuilder(cfg, components={"source": GeneratorSource(BrokenGenerator())}).run()
    assert BrokenGenerator.calls == 3 * (1 + 4)                 # each batch of 4, then unit by unit
    assert settled(tmp_path / "bank.lmdb") == 2 * 4


def test_source_produce_raising_on_every_batch_stops_the_run(tmp_path):
    from genval_aug.build import BankBuilder
    from genval_aug.errors import BuildStageError

    class Broken:
        name = "broken"
        needs_prompts = False

        def capacity(self, cls):  # noqa: ARG002
            return None

        def produce(self, units):
            raise KeyError("weights")

    with pytest.raises(BuildStageError, match=r"source 'shapes' failed on 3 batches in a row \(last: KeyError"):
        BankBuilder(stage_cfg(tmp_path), components={"source": Broken()}).run()
    assert settled(tmp_path / "bank.lmdb") == 2 * 4
