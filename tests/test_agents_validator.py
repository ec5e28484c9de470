"""Validation agent: strict verdict parsing (fuzzed), pre-filters, rendering, real tiny VLM, bank, CLI."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from agents_support import CRITERIA, ChatServer, ScriptedBackend, tiny_qwen25_vl, verdict_json
from hypothesis import given, settings
from hypothesis import strategies as st

from genval_aug.agents import OpenAICompatibleBackend, ValidationAgent, Verdict, store_verdicts
from genval_aug.agents.backends import decode_image_data_url
from genval_aug.agents.parsing import OutputParseError
from genval_aug.agents.validation_agent import parse_verdict, render_for_judge


def blob(h=96, w=96, box=(24, 24, 72, 72), color=(200, 30, 30)):
    rgba = np.zeros((h, w, 4), np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1, :3] = color
    rgba[y0:y1, x0:x1, 3] = 255
    return rgba


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_valid_keep_and_reject():
    keep, score, crit, reasons, desc = parse_verdict(verdict_json())
    assert keep and score == 0.9 and all(crit.values()) and set(reasons) == set(CRITERIA)
    keep, score, crit, _, _ = parse_verdict(verdict_json(fail=("intact",), confidence=None, fence=True))
    assert not keep and not crit["intact"] and score == pytest.approx(4 / 5)


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("keep"),
    lambda o: o["criteria"].pop("intact"),
    lambda o: o.update(keep="true"),
    lambda o: o.update(keep=1),
    lambda o: o["criteria"]["intact"].update({"pass": "yes"}),
    lambda o: o["criteria"]["intact"].update({"pass": 1}),
    lambda o: o["criteria"]["intact"].update({"reason": ""}),
    lambda o: o["criteria"]["intact"].pop("reason"),
    lambda o: o["criteria"].update(extra={"pass": True, "reason": "x"}),
    lambda o: o.update(confidence=1.5),
    lambda o: o.update(confidence=True),
    lambda o: o.update(verdict="keep"),
    lambda o: o["criteria"]["plain_background"].update({"pass": False}),   # keep=true contradicts a failure
], ids=lambda f: "mutation")
def test_parse_rejects_missing_mistyped_contradictory(mutate):
    obj = json.loads(verdict_json())
    mutate(obj)
    with pytest.raises(OutputParseError):
        parse_verdict(json.dumps(obj))


def test_all_pass_but_keep_false_is_contradictory():
    with pytest.raises(OutputParseError, match="contradictory"):
        parse_verdict(verdict_json(keep=False))


def test_huge_integer_literal_is_a_parse_error_not_a_crash():
    # json.loads raises a plain ValueError (not JSONDecodeError) past sys.get_int_max_str_digits()
    huge = verdict_json().replace("0.9", "1" + "0" * 5000)
    with pytest.raises(OutputParseError, match="invalid JSON"):
        parse_verdict(huge)
    replies = {"dog": huge, "cat": verdict_json()}
    agent = ValidationAgent(ScriptedBackend(lambda m, p: replies["dog" if "dog" in m[1]["content"][1]["text"]
                                                                 else "cat"]), max_retries=0)
    bad, good = agent.validate([blob(), blob()], ["dog", "cat"])   # one bad reply spoils only its own verdict
    assert bad.status == "invalid" and not bad.keep and "digits" in bad.reasons["error"]
    assert good.status == "judged" and good.keep


def test_leading_think_block_of_a_reasoning_model_is_dropped():
    # Qwen3 / DeepSeek-R1 style replies put <think>...</think> before the answer: every verdict was invalid
    think = "<think>\nThe mug has a handle {\"keep\": false} so...\n</think>\n\n"
    keep, *_ = parse_verdict(think + verdict_json())
    assert keep is True
    assert parse_verdict(think + verdict_json(fail=("intact",), fence=True))[0] is False
    with pytest.raises(OutputParseError):       # only a leading block; the answer itself stays strict
        parse_verdict(verdict_json() + "\n<think>x</think>")
    with pytest.raises(OutputParseError, match="empty reply"):
        parse_verdict("<think>I could not decide</think>")


def test_crlf_code_fence_is_accepted():
    keep, *_ = parse_verdict("```json\r\n" + verdict_json() + "\r\n```")
    assert keep is True


def _agent_on(reply, **kw):
    return ValidationAgent(ScriptedBackend(lambda m, p: reply), max_retries=0, **kw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_garbage_text_never_keeps(text):
    try:
        keep, *_ = parse_verdict(text)
    except OutputParseError:
        return
    obj = json.loads(re.sub(r"^[^{]*```(?:json)?\s*|\s*```[^}]*$", "", text.strip()))
    assert keep is True and all(obj["criteria"][c]["pass"] is True for c in CRITERIA)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                     max_leaves=12)
_crit = st.fixed_dictionaries({}, optional={
    "pass": st.booleans() | st.integers(0, 1) | st.sampled_from(["true", "meet", "yes", None]),
    "reason": st.text(max_size=10) | st.none(), "extra": _json})


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "criteria": st.dictionaries(st.sampled_from([*CRITERIA, "other"]), _crit, max_size=6) | _json,
    "keep": st.booleans() | st.sampled_from(["keep", 1, None]),
    "confidence": _json, "description": _json, "junk": _json}))
def test_fuzz_structured_garbage_keeps_only_a_fully_valid_verdict(obj):
    try:
        keep, score, crit, reasons, _ = parse_verdict(json.dumps(obj))
    except OutputParseError:
        return
    if keep:
        assert obj["keep"] is True and set(obj["criteria"]) == set(CRITERIA)
        assert all(obj["criteria"][c]["pass"] is True and obj["criteria"][c]["reason"].strip() for c in CRITERIA)
        assert 0.0 <= score <= 1.0 and all(crit.values())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_agent_turns_garbage_into_invalid_reject(text):
    v = _agent_on(text).validate([blob()], ["dog"])[0]
    if v.keep:  # only possible when the text was a fully valid keep verdict
        assert v.status == "judged" and all(v.criteria.values())
    else:
        assert v.status in ("invalid", "judged")


# --- rendering and pre-filters -----------------------------------------------------------------------


def test_render_composites_on_neutral_grey_and_resizes():
    rgba = blob(200, 300, (100, 50, 140, 150))
    rgba[60:70, 110:120, 3] = 128  # half-transparent patch
    out = render_for_judge(rgba, size=256, background=(128, 128, 128), margin=0.1)
    assert out.dtype == np.uint8 and out.shape[2] == 3 and max(out.shape[:2]) == 256
    assert tuple(out[0, 0]) == (128, 128, 128)            # margin shows the background
    assert tuple(out[out.shape[0] // 2, out.shape[1] // 2]) == (200, 30, 30)
    tiny = render_for_judge(blob(20, 20, (5, 5, 15, 15)), size=128)
    assert max(tiny.shape[:2]) == 128                      # small objects are upscaled


def test_prefilter_rejects_without_calling_the_model():
    backend = ScriptedBackend(lambda m, p: verdict_json())
    agent = ValidationAgent(backend)
    two = blob()
    two[5:15, 5:15, 3] = 255
    two[24:72, 24:72, 3] = 0
    two[30:60, 30:40, 3] = 255
    two[30:60, 60:70, 3] = 255
    items = [np.zeros((64, 64, 4), np.uint8), blob(), blob(96, 96, (47, 47, 49, 49)), two]
    vs = agent.validate(items, ["dog"] * 4)
    assert [v.status for v in vs] == ["prefilter", "judged", "prefilter", "prefilter"]
    assert [v.keep for v in vs] == [False, True, False, False]
    assert vs[0].reasons["prefilter"] == "empty_alpha"
    assert "too_small" in vs[2].reasons["prefilter"] and "fragmented" in vs[3].reasons["prefilter"]
    assert len(backend.calls) == 1
    assert vs[1].model == "scripted" and vs[1].prompt_version == "validation_agent-v1"


def test_message_shows_image_category_and_definition():
    backend = ScriptedBackend(lambda m, p: verdict_json())
    ValidationAgent(backend).validate([blob()], ["orange_(fruit)"], ["fruit of an orange tree"])
    system, user = backend.calls[0][0]
    assert system["content"].startswith("You inspect cut-out images")
    img_part, txt = user["content"]
    im = decode_image_data_url(img_part["image_url"]["url"])
    assert max(im.size) == 448
    assert "Named category: orange (fruit) (definition: fruit of an orange tree)." in txt["text"]


def test_invalid_reply_retried_then_invalid():
    replies = iter(["```json\n{\"keep\": true}\n```", verdict_json(fail=("single_view",))])
    agent = ValidationAgent(ScriptedBackend(lambda m, p: next(replies)), max_retries=1)
    v = agent.validate_one(blob(), "dog")
    assert v.status == "judged" and not v.keep and v.reasons["single_view"]
    agent = _agent_on('{"keep": true}')
    v = agent.validate_one(blob(), "dog")
    assert v.status == "invalid" and not v.keep and "criteria" in v.reasons["error"]
    d = v.to_dict()
    assert json.loads(json.dumps(d)) == d and d["keep"] is False


def test_tiny_random_vlm_through_the_real_code():
    import torch

    from genval_aug.agents.backends import TransformersVisionBackend

    torch.set_num_threads(1)
    model, proc = tiny_qwen25_vl()
    backend = TransformersVisionBackend(model, proc, max_new_tokens=16)
    agent = ValidationAgent(backend, image_size=64, max_retries=1, params={"max_tokens": 16})
    vs = agent.validate([blob(), blob(80, 120, (10, 20, 100, 70)), np.zeros((32, 32, 4), np.uint8)],
                        ["dog", "cat", "cup"])
    assert [v.keep for v in vs] == [False, False, False]
    assert [v.status for v in vs] == ["invalid", "invalid", "prefilter"]


def test_loopback_vllm_malformed_json_and_good_verdict():
    def reply(body):
        text = body["messages"][1]["content"][1]["text"]
        assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        if "Named category: dog" in text:
            return '{"criteria": {"single_object": {"pass": true, "reason": "one"}, '  # truncated JSON
        return verdict_json(confidence=0.75)

    with ChatServer([reply]) as srv:
        backend = OpenAICompatibleBackend("vlm", srv.base_url, api_key_env=None, backoff=0.01)
        vs = ValidationAgent(backend, max_retries=1).validate([blob(), blob()], ["dog", "cat"])
    assert (vs[0].status, vs[0].keep) == ("invalid", False)
    assert (vs[1].status, vs[1].keep, vs[1].score) == ("judged", True, 0.75)
    assert len(srv.requests) == 3  # the dog was asked twice
    assert all(r["temperature"] == 0.0 and r["stream"] is False for r in srv.requests)


# --- bank and CLI ------------------------------------------------------------------------------------


def test_verdicts_go_into_the_bank(tmp_path):
    from genval_aug.bank import BankWriter, InstanceBank

    replies = iter([verdict_json(), verdict_json(fail=("correct_category", "intact"))])
    agent = ValidationAgent(ScriptedBackend(lambda m, p: next(replies)))
    items = [blob(color=(10, 200, 10)), blob(color=(10, 10, 200)), np.zeros((40, 40, 4), np.uint8),
             np.zeros((40, 40, 4), np.uint8)]
    items[2][10:12, 10:12, 3] = 255
    cats = ["dog"] * 4
    vs = agent.validate(items, cats)
    assert [v.status for v in vs] == ["judged", "judged", "prefilter", "prefilter"]
    with BankWriter(tmp_path / "b.lmdb") as w:
        kept, rejected = store_verdicts(w, items, cats, vs, sources=[{"kind": "test", "i": i} for i in range(4)])
    assert len(kept) == 1 and len(rejected) == 2  # the empty-alpha instance is only counted
    bank = InstanceBank(tmp_path / "b.lmdb")
    assert bank.count() == 1
    meta = bank.get_meta(kept[0])
    assert meta["verdict"]["keep"] is True and meta["verdict"]["prompt_version"] == "validation_agent-v1"
    assert meta["verdict"]["model"] == "scripted" and set(meta["verdict"]["criteria"]) == set(CRITERIA)
    statuses = sorted(m["verdict"]["status"] for m, _ in bank.rejected())
    assert statuses == ["judged", "prefilter"]
    rej = bank.stats()["rejections"]
    assert rej["empty_alpha"] == 1 and rej["too_small"] == 1
    assert rej["vllm_correct_category"] == 1 and rej["vllm_intact"] == 1


def test_verdict_dataclass_roundtrip():
    v = Verdict(True, 1.0, {c: True for c in CRITERIA}, {c: "ok" for c in CRITERIA}, "m", "validation_agent-v1")
    assert v.to_dict()["criteria"]["intact"] is True and v.to_dict()["status"] == "judged"


def test_labels_csv_with_a_utf8_bom(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM: the first header became "\ufeffimage" and the file was refused
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(blob(), cv2.COLOR_RGBA2BGRA))
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbfimage,category,keep\na.png,dog,1\n")
    from genval_aug.agents.evaluation import load_labels

    (lab,) = load_labels(tmp_path / "labels.csv")
    assert lab.image.name == "a.png" and lab.category == "dog" and lab.keep is True


def test_eval_validator_cli_on_real_cutouts(rgba_objects, tmp_path, capsys):
    from genval_aug.cli import main

    rows = list(csv.DictReader((rgba_objects / "objects.csv").open()))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "category", "keep", "single_object", "intact"])
        for r in rows:
            ok_single = r["n_objects"] == "1"
            ok_intact = not r["truncated_at"]
            wr.writerow([r["file"], r["class_name"], int(ok_single and ok_intact), int(ok_single), int(ok_intact)])

    def judge(body):  # a stand-in VLLM that only sees the category text: cars fail single_object
        text = body["messages"][1]["content"][1]["text"]
        return verdict_json(fail=("single_object",) if "Named category: car" in text else ())

    with ChatServer([judge]) as srv:
        rc = main(["agents", "eval-validator", "--labels", str(labels), "--images", str(rgba_objects),
                   "--backend", "openai", "--model", "vlm", "--base-url", srv.base_url, "--api-key-env", "NO_SUCH",
                   "--no-cache", "--json", str(tmp_path / "m.json"), "--image-size", "96"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "precision" in out and "invalid@kept" in out
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    # pre-filters: plants-1 (tiny pot on a big canvas) fails coverage, car-3 (two cars) is fragmented, car-3 and
    # the three persons touch the canvas border (cut off); the lion touches it only with soft alpha (< 128),
    # so it reaches the judge, which keeps it wrongly; the 2 other cars fail in the judge
    assert m["prefiltered"] == 5 and m["n"] == 10
    gold = {r["file"]: (r["n_objects"] == "1" and not r["truncated_at"]) for r in rows}
    assert sum(gold.values()) == 5  # tiger, elephant, car-1, car-2, potted plant
    assert (m["kept"], m["tp"], m["fp"]) == (3, 2, 1)       # tiger, elephant + the truncated lion
    assert m["precision"] == pytest.approx(2 / 3) and m["invalid_rate_among_kept"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["criteria"]["intact"]["invalid_rate_among_kept"] == pytest.approx(1 / 3)
    assert m["criteria"]["single_object"]["invalid_rate_among_kept"] == 0.0
    verdicts = {Path(v["image"]).name: v for v in json.loads((tmp_path / "m.json").read_text())["verdicts"]}
    assert "touches_border" in verdicts["rembg_girl-2.png"]["reasons"]["prefilter"]
    assert verdicts["rembg_car-1.png"]["criteria"]["single_object"] is False


def test_long_lists_are_sent_in_chunks():
    sizes = []
    backend = ScriptedBackend(lambda m, p: verdict_json())
    orig = backend.chat_batch
    backend.chat_batch = lambda b, **p: (sizes.append(len(b)), orig(b, **p))[1]
    vs = ValidationAgent(backend, chunk_size=3).validate([blob()] * 7, ["dog"] * 7)
    assert sizes == [3, 3, 1] and all(v.keep for v in vs)
