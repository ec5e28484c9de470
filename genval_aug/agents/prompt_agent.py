"""The prompt agent: category (+ definition) -> N diverse single-object prompts for Layer Diffusion.

The system prompt comes from a versioned YAML file (:mod:`genval_aug.agents.prompt_files`); the output
format is fixed in the user message so an optimized system prompt cannot break the parser. Each prompt
must fit the pipeline's CLIP text window (counted with the pipeline's own tokenizer), name the object,
and not be a near-duplicate of another.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from genval_aug.agents.backends.base import ChatBackend, Message
from genval_aug.agents.categories import CategoryDefinitions, display_name, head_name
from genval_aug.agents.parsing import OutputParseError, excerpt, extract_json_object, truncation_note
from genval_aug.agents.prompt_files import PromptFile, load_prompt
from genval_aug.errors import AgentOutputError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_TOKENIZER = "openai/clip-vit-large-patch14"  # SD 1.x / SDXL first text encoder

OUTPUT_FORMAT = ('Answer with JSON only, exactly in this shape (no other keys, no comments):\n'
                 '{"prompts": ["<prompt 1>", "<prompt 2>", ...]}')


def object_request(category: str, definition: str | None = None) -> str:
    """The paper's standard prompt: ``"An image of a single <name>, <definition>."``."""
    name = display_name(category)
    return f"An image of a single {name}, {definition.rstrip('.')}." if definition else f"An image of a single {name}."


# where the reply length limit is raised (named when a reply was cut at it)
TRUNCATION_SETTING = "max_tokens in PromptAgent(params={'max_tokens': ...}) (build config: prompts.params.params)"

_LIST_MARKER = re.compile(r"^(?:\d{1,3}[.)]|[-*\u2022])\s+")  # "1. ", "2) ", "- ", "* ", "\u2022 " kept by some LLMs


def parse_prompts(text: str) -> list[str]:
    """Strictly parse ``{"prompts": [str, ...]}``; raises :class:`OutputParseError`."""
    obj = extract_json_object(text)
    if "prompts" not in obj:
        raise OutputParseError("missing field 'prompts'")
    items = obj["prompts"]
    if not isinstance(items, list) or not items:
        raise OutputParseError("field 'prompts' must be a non-empty list")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise OutputParseError(f"prompts[{i}] is a {type(p).__name__}, not a string")
        p = _LIST_MARKER.sub("", " ".join(p.split()))
        if not p:
            raise OutputParseError(f"prompts[{i}] is empty")
        out.append(p)
    return out


_WORD = re.compile(r"[a-z0-9]+")


def _names_word(word: str, text: str) -> bool:
    """``word`` (or its plural in -s/-es) occurs in lower-case ``text`` as a whole word: "mug" is not named
    by "smugglers", nor "cat" by "locate", nor "cake" by "cupcake"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word)}(?:s|es)?(?![a-z0-9])", text) is not None


def _shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of word unigrams + bigrams (case and punctuation ignored)."""
    sa, sb = _shingles(a), _shingles(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def near_duplicates(prompts: list[str], threshold: float = 0.8, keep: list[str] | None = None) -> list[int]:
    """Indices of prompts that are near-duplicates of an earlier prompt (or of one in ``keep``)."""
    seen = [_shingles(p) for p in (keep or [])]
    dup = []
    for i, p in enumerate(prompts):
        s = _shingles(p)
        if any((len(s & t) / max(1, len(s | t))) >= threshold for t in seen):
            dup.append(i)
        else:
            seen.append(s)
    return dup


@dataclass
class PromptResult:
    """Everything one category's run produced: accepted prompts, rejected ones with reasons, failures."""

    category: str
    prompts: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (prompt, reason)
    failures: list[str] = field(default_factory=list)                # unparseable replies (reason: excerpt)
    attempts: int = 0
    raw: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "prompts": self.prompts, "rejected": [list(r) for r in self.rejected],
                "failures": self.failures, "attempts": self.attempts}


class PromptAgent:
    """LLM prompt agent.

    Args:
        backend: a text :class:`ChatBackend`.
        prompt_version: system-prompt version (``None`` = shipped default, ``"latest"``, ``"v3"`` or a path).
        tokenizer: the generation pipeline's CLIP tokenizer (``pipe.tokenizer``), a hub id / path, or
            ``None`` to load ``openai/clip-vit-large-patch14`` from the local Hugging Face cache on first use.
        definitions: :class:`CategoryDefinitions` (default: ``$GENVAL_AUG_LVIS_CATEGORIES`` if set).
        max_tokens: token budget including the start/end tokens (77 for CLIP).
        max_retries: extra model calls when replies do not parse or too few prompts survive.
        dedup_threshold: word-shingle Jaccard similarity at which two prompts count as duplicates.
        params: generation parameters for the backend (default temperature 0.9).
        system_prompt: override the file's text (used by the optimizer).
    """

    agent_name = "prompt_agent"

    def __init__(self, backend: ChatBackend, prompt_version: str | os.PathLike | None = None, tokenizer: Any = None,
                 *, prompt_dir: str | os.PathLike | None = None, definitions: CategoryDefinitions | None = None,
                 max_tokens: int = 77, max_retries: int = 2, dedup_threshold: float = 0.8,
                 params: dict[str, Any] | None = None, seed: int = 0, system_prompt: str | None = None):
        self.backend = backend
        self.prompt_file: PromptFile = load_prompt(self.agent_name, prompt_version, prompt_dir)
        self.system_prompt = system_prompt if system_prompt is not None else self.prompt_file.system
        self._tokenizer = tokenizer
        self.definitions = definitions if definitions is not None else CategoryDefinitions.from_env()
        self.max_tokens = int(max_tokens)
        self.max_retries = int(max_retries)
        self.dedup_threshold = float(dedup_threshold)
        self.params = {"temperature": 0.9, "max_tokens": 1024, **(params or {})}
        self.seed = int(seed)

    @property
    def prompt_version(self) -> str:
        return self.prompt_file.id

    # --- tokens -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            src = str(self._tokenizer or DEFAULT_CLIP_TOKENIZER)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(src)
            except Exception as e:  # noqa: BLE001 - hub/OS errors vary
                raise ConfigError(f"cannot load the CLIP tokenizer {src!r} ({e}); pass tokenizer=pipe.tokenizer "
                                  f"of your generation pipeline") from e
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the text encoder sees them, start and end tokens included."""
        return len(self.tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"])

    # --- messages -----------------------------------------------------------------------------------
    def definition_for(self, category: str, definition: str | None = None) -> str | None:
        return definition if definition is not None else self.definitions.get(category)

    def messages(self, category: str, n: int, definition: str | None = None,
                 avoid: list[str] | None = None) -> list[Message]:
        user = [f"Object request: {object_request(category, definition)}",
                f"Write {n} different prompts for this object, each under {self.max_tokens - 2} CLIP tokens."]
        if avoid:
            user.append("Do not repeat or paraphrase these prompts you already wrote:\n" +
                        "\n".join(f"- {p}" for p in avoid))
        user.append(OUTPUT_FORMAT)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": "\n\n".join(user)}]

    # --- checks -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, category: str) -> str | None:
        """Why a single prompt is unusable (``None`` = fine): token budget, object not named."""
        n = self.count_tokens(prompt)
        if n > self.max_tokens:
            return f"too long: {n} tokens > {self.max_tokens}"
        names = {head_name(category), *(head_name(s) for s in self.definitions.synonyms(category))}
        low = prompt.lower()
        if not any(all(_names_word(w, low) for w in nm.split()) for nm in names if nm):
            return f"does not name the object {display_name(category)!r}"
        return None

    def _accept(self, result: PromptResult, candidates: list[str], n: int) -> None:
        for p in candidates:
            if len(result.prompts) >= n:
                break
            reason = self.check_prompt(p, result.category)
            if reason is None and near_duplicates([p], self.dedup_threshold, keep=result.prompts):
                reason = "near-duplicate"
            if reason is None:
                result.prompts.append(p)
            else:
                result.rejected.append((p, reason))

    # --- running ------------------------------------------------------------------------------------
    def run_many(self, categories: list[str], n: int, definitions: dict[str, str] | None = None,
                 existing: dict[str, list[str]] | None = None) -> list[PromptResult]:
        """Prompts for several categories; each round batches every unfinished category in one
        ``chat_batch`` call. Never raises on bad model output: see :attr:`PromptResult.failures`.
        ``existing``: prompts a category already has (kept first, not re-checked); only the missing ones are
        asked for, and the model is told not to repeat them."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        results = [PromptResult(c, prompts=list((existing or {}).get(c) or [])) for c in categories]
        defs = {c: self.definition_for(c, (definitions or {}).get(c)) for c in categories}
        for attempt in range(self.max_retries + 1):
            todo = [r for r in results if len(r.prompts) < n]
            if not todo:
                break
            batch = [self.messages(r.category, n - len(r.prompts), defs[r.category], avoid=r.prompts or None)
                     for r in todo]
            replies = self.backend.chat_batch(batch, **{**self.params, "seed": self.seed + attempt})
            for r, reply in zip(todo, replies, strict=True):
                r.attempts += 1
                r.raw.append(reply)
                try:
                    candidates = parse_prompts(reply)
                except OutputParseError as e:
                    cut = truncation_note(reply, self.backend.model, TRUNCATION_SETTING)
                    why = f"{cut} ({e})" if cut else str(e)
                    r.failures.append(f"attempt {attempt + 1}: {why}: {excerpt(reply)!r}")
                    (logger.warning if cut else logger.info)("prompt agent: unparseable reply for %r (%s)",
                                                             r.category, why)
                    continue
                self._accept(r, candidates, n)
        for r in results:
            if len(r.prompts) < n:
                logger.warning("prompt agent: %r got %d/%d prompts after %d attempts (%d unparseable replies, "
                               "%d prompts rejected)", r.category, len(r.prompts), n, r.attempts,
                               len(r.failures), len(r.rejected))
        return results

    def run(self, category: str, n: int, definition: str | None = None) -> PromptResult:
        return self.run_many([category], n, {category: definition} if definition else None)[0]

    def prompts(self, category: str, n: int, definition: str | None = None) -> list[str]:
        """``n`` (or fewer, with a warning) usable prompts; raises :class:`AgentOutputError` when the model
        produced none after its retries."""
        r = self.run(category, n, definition)
        if not r.prompts:
            detail = "; ".join(r.failures[-2:]) or "; ".join(f"{p!r}: {why}" for p, why in r.rejected[-3:])
            raise AgentOutputError(f"prompt agent ({self.backend.model}, {self.prompt_version}) produced no usable "
                                   f"prompt for {category!r} in {r.attempts} attempts: {detail}")
        return r.prompts
