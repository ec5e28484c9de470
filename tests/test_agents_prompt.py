"""Prompt agent: strict parsing, token budget with a CLIP tokenizer, dedup, retries, real tiny LLM."""
from __future__ import annotations

import json

import pytest
from agents_support import ChatServer, ScriptedBackend, tiny_clip_tokenizer, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from genval_aug.agents import CategoryDefinitions, OpenAICompatibleBackend, PromptAgent
from genval_aug.agents.parsing import OutputParseError
from genval_aug.agents.prompt_agent import near_duplicates, object_request, parse_prompts
from genval_aug.errors import AgentOutputError, ConfigError


@pytest.fixture(scope="module")
def clip_tok():
    return tiny_clip_tokenizer()


def _reply(prompts):
    return json.dumps({"prompts": prompts})


def test_parse_prompts_strict():
    assert parse_prompts('{"prompts": ["a  dog", "b"]}') == ["a dog", "b"]
    assert parse_prompts('Sure!\n```json\n{"prompts": ["x"]}\n```') == ["x"]
    for bad in ['', 'prompts: a, b', '["a"]', '{"prompts": "a"}', '{"prompts": []}', '{"prompts": ["a", 3]}',
                '{"prompts": ["a"], "prompts": ["b"]}', '{"prompts": [" "]}', '{"prompt": ["a"]}',
                '```json\n{"prompts": ["a"]}\n```\n```json\n{"prompts": ["b"]}\n```', '{"prompts": [NaN]}']:
        with pytest.raises(OutputParseError):
            parse_prompts(bad)


def test_parse_prompts_huge_integer_is_a_parse_error():
    with pytest.raises(OutputParseError, match="invalid JSON"):
        parse_prompts('{"prompts": ["a mug"], "n": ' + "9" * 5000 + "}")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_prompts_fuzz_garbage_is_error_or_list_of_strings(text):
    try:
        out = parse_prompts(text)
    except OutputParseError:
        return
    assert out and all(isinstance(p, str) and p for p in out)


def test_object_request_is_the_papers_standard_prompt():
    assert object_request("orange_(fruit)", "orange (FRUIT of an orange tree).") == \
        "An image of a single orange (fruit), orange (FRUIT of an orange tree)."
    assert object_request("dog") == "An image of a single dog."


def test_near_duplicates():
    ps = ["Photo of a single red apple, soft light, side view",
          "photo of a single red apple, soft light, side view!",
          "3D render of a single green apple from above, glossy"]
    assert near_duplicates(ps) == [1]
    assert near_duplicates(ps[2:], keep=ps[:1]) == []


def test_prompts_counted_with_the_pipeline_tokenizer(clip_tok):
    long = "photo of a single dog " + "very " * 40 + "fluffy"
    good = ["Studio photo of a single dog, golden fur, side view",
            "Watercolor painting of a single dog sleeping, top-down view",
            "Studio photo of a single dog, golden fur, side view.",   # near-duplicate
            "A bowl of fruit",                                         # does not name the object
            long]
    backend = ScriptedBackend(lambda m, p: _reply(good))
    agent = PromptAgent(backend, tokenizer=clip_tok, max_retries=0)
    n_long = agent.count_tokens(long)
    assert n_long > 77 and n_long == len(clip_tok(long)["input_ids"])
    res = agent.run("dog", 4)
    assert res.prompts == good[:2]
    reasons = dict(res.rejected)
    assert reasons[good[2]] == "near-duplicate"
    assert "does not name" in reasons[good[3]]
    assert reasons[long].startswith(f"too long: {n_long} tokens")
    sys_msg, user_msg = backend.calls[0][0]
    assert sys_msg["role"] == "system" and sys_msg["content"] == agent.prompt_file.system
    assert "An image of a single dog." in user_msg["content"] and '{"prompts"' in user_msg["content"]


def test_object_must_be_named_as_a_word_and_list_markers_are_dropped(clip_tok):
    # substring matching took "smuggler" for a mug and "locate" for a cat; "1. " numbering reached the prompt
    ps = ["1. Photo of a smuggler at night", "2) Photo of two mugs on a shelf", "- Photo of a single red mug",
          "* A cupcake on a plate", "3D render of a single teal mug"]
    assert parse_prompts(_reply(ps))[1:] == ["Photo of two mugs on a shelf", "Photo of a single red mug",
                                             "A cupcake on a plate", "3D render of a single teal mug"]
    agent = PromptAgent(ScriptedBackend(lambda m, p: _reply(ps)), tokenizer=clip_tok, max_retries=0,
                        dedup_threshold=0.99)
    res = agent.run("mug", 5)
    assert res.prompts == ["Photo of two mugs on a shelf", "Photo of a single red mug", "3D render of a single teal mug"]
    assert dict(res.rejected)["Photo of a smuggler at night"].startswith("does not name")
    assert agent.check_prompt("A single cat, locate it", "cat") is None
    assert agent.check_prompt("Try to locate the education", "cat").startswith("does not name")
    assert agent.check_prompt("A cupcake on a plate", "cake").startswith("does not name")
    assert agent.check_prompt("A single t-shirt, folded", "t-shirt") is None
    assert agent.check_prompt("Photo of a single teddy bear", "teddy_bear") is None


def test_malformed_output_is_retried_then_reported(clip_tok):
    replies = iter(["not json at all", '{"prompts": "oops"}',
                    _reply(["Photo of a single cat, tabby, front view", "Render of a single cat, black, side"])])
    backend = ScriptedBackend(lambda m, p: next(replies))
    agent = PromptAgent(backend, tokenizer=clip_tok, max_retries=2)
    assert agent.prompts("cat", 2) == ["Photo of a single cat, tabby, front view", "Render of a single cat, black, side"]
    seeds = [p["seed"] for _, p in backend.calls]
    assert seeds == [0, 1, 2]  # each retry asks with another seed (so the response cache does not replay it)

    backend = ScriptedBackend(lambda m, p: "I cannot do that.")
    agent = PromptAgent(backend, tokenizer=clip_tok, max_retries=1)
    with pytest.raises(AgentOutputError, match=r"no usable prompt for 'cat' in 2 attempts.*not a JSON object"):
        agent.prompts("cat", 3)
    res = agent.run("cat", 3)
    assert res.prompts == [] and len(res.failures) == 2


def test_retry_asks_only_for_missing_and_avoids_repeats(clip_tok):
    first = ["Photo of a single cup, white porcelain, side view"]
    second = ["Photo of a single cup, white porcelain, side view", "Oil painting of a single cup, blue glaze, top view"]
    replies = iter([_reply(first), _reply(second)])
    backend = ScriptedBackend(lambda m, p: next(replies))
    res = PromptAgent(backend, tokenizer=clip_tok, max_retries=1).run("cup", 2)
    assert res.prompts == [first[0], second[1]]
    user2 = backend.calls[1][0][1]["content"]
    assert "Write 1 different prompts" in user2 and first[0] in user2


def test_run_many_batches_categories(clip_tok):
    def reply(m, p):
        cat = "dog" if "single dog" in m[1]["content"] else "cat"
        return _reply([f"Photo of a single {cat}, pose {i}, seed {p['seed']}" for i in range(2)])

    backend = ScriptedBackend(reply)
    calls = []
    orig = backend.chat_batch
    backend.chat_batch = lambda b, **p: (calls.append(len(b)), orig(b, **p))[1]
    res = PromptAgent(backend, tokenizer=clip_tok, dedup_threshold=0.99).run_many(["dog", "cat"], 2)
    assert calls == [2] and [len(r.prompts) for r in res] == [2, 2]
    assert "single cat" in res[1].prompts[0]


def test_lvis_definitions_are_used(shared_data, clip_tok):
    defs = CategoryDefinitions.from_lvis(shared_data / "lvis_v1_categories.json")
    assert len(defs) > 1000
    assert defs.get("aerosol can") == "a dispenser that holds a substance under pressure"
    assert defs.get("spray_can") == defs.get("aerosol_can")  # synonym
    backend = ScriptedBackend(lambda m, p: _reply(["Photo of a single spray can, red, side view"]))
    agent = PromptAgent(backend, tokenizer=clip_tok, definitions=defs, max_retries=0)
    res = agent.run("aerosol_can", 1)
    assert res.prompts  # "spray can" names the object through an LVIS synonym
    assert "An image of a single aerosol can, a dispenser that holds a substance under pressure." in \
        backend.calls[0][0][1]["content"]


def test_unreadable_lvis_table_is_a_dataset_error_naming_the_file(tmp_path):
    from genval_aug.errors import DatasetError

    (tmp_path / "cats.json").write_text("{broken")
    (tmp_path / "dict.json").write_text('{"categories": {"name": "x"}}')
    for name in ("cats.json", "dict.json", "absent.json"):
        with pytest.raises(DatasetError, match=name):
            CategoryDefinitions.from_lvis(tmp_path / name)


def test_missing_tokenizer_is_a_clear_error():
    agent = PromptAgent(ScriptedBackend(lambda m, p: _reply(["a dog"])), tokenizer="/nonexistent/tokenizer")
    with pytest.raises(ConfigError, match="pass tokenizer=pipe.tokenizer"):
        agent.prompts("dog", 1)


def test_tiny_random_llm_through_the_real_code(clip_tok):
    """A random LLM emits garbage: the agent must retry, then report it, never return junk prompts."""
    import torch

    from genval_aug.agents.backends import TransformersChatBackend

    torch.set_num_threads(1)
    model, tok = tiny_llama()
    backend = TransformersChatBackend(model, tok, max_new_tokens=24)
    agent = PromptAgent(backend, tokenizer=clip_tok, max_retries=1, params={"max_tokens": 24})
    res = agent.run("dog", 2)
    assert res.attempts == 2 and res.prompts == [] and len(res.failures) == 2
    with pytest.raises(AgentOutputError, match="tiny|Llama|produced no usable prompt"):
        agent.prompts("dog", 2)


def test_openai_backend_end_to_end_with_malformed_then_good(clip_tok):
    good = _reply(["Photo of a single bus, yellow, three-quarter view", "Render of a single bus, red, side"])
    with ChatServer([("ok", '{"prompts": ["unterminated'), ("ok", good)]) as srv:
        backend = OpenAICompatibleBackend("llm", srv.base_url, api_key_env=None, backoff=0.01)
        out = PromptAgent(backend, tokenizer=clip_tok).prompts("bus", 2)
    assert len(out) == 2 and len(srv.requests) == 2
    assert srv.requests[0]["temperature"] == 0.9 and srv.requests[1]["seed"] == 1
