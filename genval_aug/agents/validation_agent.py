"""The validation agent: cheap alpha pre-filters, then a VLLM judges Gen-n-Val's criteria.

Criteria (each pass/fail with a short reason): ``single_object``, ``correct_category`` (the paper's
"wrong category" failure), ``single_view``, ``intact``, ``plain_background``. The reply is strict JSON;
a missing, mistyped, extra or contradictory field makes the verdict *invalid*, which is never a keep.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from genval_aug.agents.backends.base import ChatBackend, Message, image_part, text_part
from genval_aug.agents.categories import CategoryDefinitions, display_name
from genval_aug.agents.parsing import OutputParseError, excerpt, extract_json_object, truncation_note
from genval_aug.agents.prompt_files import PromptFile, load_prompt
from genval_aug.errors import ConfigError
from genval_aug.quality import QualityRules, alpha_stats, check_instance

logger = logging.getLogger(__name__)

CRITERIA = ("single_object", "correct_category", "single_view", "intact", "plain_background")

_SCHEMA = "{" + ", ".join(f'"{c}": {{"pass": true|false, "reason": "<one sentence>"}}' for c in CRITERIA) + "}"
OUTPUT_FORMAT = (
    "Answer with JSON only, exactly in this shape (no other keys):\n"
    '{"description": "<what the image shows, one sentence>",\n'
    f' "criteria": {_SCHEMA},\n'
    ' "keep": true|false,\n'
    ' "confidence": <number from 0 to 1>}\n'
    '"keep" must be true if and only if every criterion passes.'
)


# where the reply length limit is raised (named when a reply was cut at it)
TRUNCATION_SETTING = "max_tokens in ValidationAgent(params={'max_tokens': ...}) (build config: validator.params.params)"


@dataclass
class Verdict:
    """The validator's decision on one instance. ``status``: ``"judged"`` (the VLLM answered validly),
    ``"prefilter"`` (rejected by the alpha checks, no model call) or ``"invalid"`` (unparseable reply)."""

    keep: bool
    score: float
    criteria: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    model: str = ""
    prompt_version: str = ""
    status: str = "judged"
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for ``BankWriter.add(..., verdict=...)``."""
        d = {"keep": bool(self.keep), "score": float(self.score), "criteria": dict(self.criteria),
             "reasons": dict(self.reasons), "model": self.model, "prompt_version": self.prompt_version,
             "status": self.status}
        if self.description:
            d["description"] = self.description
        return d


def parse_verdict(text: str) -> tuple[bool, float, dict[str, bool], dict[str, str], str | None]:
    """Strictly parse a validator reply -> (keep, score, criteria, reasons, description).

    Raises :class:`OutputParseError` on anything that is not exactly the requested shape, including a
    ``keep`` that contradicts the criteria.
    """
    obj = extract_json_object(text)
    extra = set(obj) - {"description", "criteria", "keep", "confidence"}
    if extra:
        raise OutputParseError(f"unexpected fields {sorted(extra)}")
    crit = obj.get("criteria")
    if not isinstance(crit, dict):
        raise OutputParseError("field 'criteria' missing or not an object")
    missing = [c for c in CRITERIA if c not in crit]
    if missing:
        raise OutputParseError(f"criteria missing {missing}")
    unknown = set(crit) - set(CRITERIA)
    if unknown:
        raise OutputParseError(f"unknown criteria {sorted(unknown)}")
    passes: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for c in CRITERIA:
        item = crit[c]
        if not isinstance(item, dict) or set(item) != {"pass", "reason"}:
            raise OutputParseError(f"criteria.{c} must be an object with exactly 'pass' and 'reason'")
        if type(item["pass"]) is not bool:
            raise OutputParseError(f"criteria.{c}.pass must be true or false, got {item['pass']!r:.40}")
        if not isinstance(item["reason"], str) or not item["reason"].strip():
            raise OutputParseError(f"criteria.{c}.reason must be a non-empty string")
        passes[c] = item["pass"]
        reasons[c] = " ".join(item["reason"].split())[:500]
    keep = obj.get("keep")
    if type(keep) is not bool:
        raise OutputParseError(f"field 'keep' must be true or false, got {keep!r:.40}")
    if keep != all(passes.values()):
        failed = [c for c, v in passes.items() if not v]
        raise OutputParseError(f"contradictory verdict: keep={keep} but failed criteria {failed}")
    conf = obj.get("confidence")
    if conf is not None:
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= float(conf) <= 1.0:
            raise OutputParseError(f"field 'confidence' must be a number in [0, 1], got {conf!r:.40}")
        score = float(conf)
    else:
        score = sum(passes.values()) / len(passes)
    desc = obj.get("description")
    if desc is not None and not isinstance(desc, str):
        raise OutputParseError("field 'description' must be a string")
    return keep, score, passes, reasons, (" ".join(desc.split())[:500] if desc else None)


def render_for_judge(rgba: np.ndarray, size: int = 448, background: tuple[int, int, int] = (128, 128, 128),
                     margin: float = 0.08) -> np.ndarray:
    """Crop to the alpha box (plus a margin), alpha-composite on a flat ``background`` and resize so the
    longer side is ``size``. Returns HxWx3 uint8 RGB."""
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected HxWx4 uint8 RGBA, got shape {rgba.shape} dtype {rgba.dtype}")
    a = rgba[..., 3]
    ys, xs = np.nonzero(a)
    if len(xs):
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        m = int(round(margin * max(x1 - x0, y1 - y0)))
        h, w = a.shape
        rgba = rgba[max(0, y0 - m):min(h, y1 + m), max(0, x0 - m):min(w, x1 + m)]
    alpha = rgba[..., 3:4].astype(np.float32) * (1.0 / 255.0)
    bg = np.asarray(background, np.float32).reshape(1, 1, 3)
    out = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    h, w = out.shape[:2]
    scale = size / max(h, w)
    if scale != 1.0:
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = cv2.resize(out, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return out


class ValidationAgent:
    """VLLM validation agent.

    Args:
        backend: a vision-capable :class:`ChatBackend`.
        prompt_version: system-prompt version (``None`` = shipped default, ``"latest"``, ``"v3"`` or a path).
        rules: alpha pre-filter thresholds (:class:`genval_aug.quality.QualityRules`); the default also
            rejects objects touching the canvas border (cut off), which suits generated instances on their
            own canvas; pass ``QualityRules()`` for crops cut tight around the object.
        definitions: category definitions shown to the judge.
        image_size: longer side of the image shown to the judge.
        background: RGB of the flat canvas the instance is composited on.
        max_retries: extra model calls for replies that do not parse; then the verdict is ``invalid``.
        chunk_size: instances sent per ``chat_batch`` call (bounds memory for long lists).
    """

    agent_name = "validation_agent"

    def __init__(self, backend: ChatBackend, prompt_version: str | os.PathLike | None = None,
                 rules: QualityRules | None = None, *, prompt_dir: str | os.PathLike | None = None,
                 definitions: CategoryDefinitions | None = None, image_size: int = 448,
                 background: tuple[int, int, int] = (128, 128, 128), max_retries: int = 1,
                 params: dict[str, Any] | None = None, system_prompt: str | None = None,
                 chunk_size: int = 64):
        self.backend = backend
        self.chunk_size = max(1, int(chunk_size))
        self.prompt_file: PromptFile = load_prompt(self.agent_name, prompt_version, prompt_dir)
        self.system_prompt = system_prompt if system_prompt is not None else self.prompt_file.system
        self.rules = rules if rules is not None else QualityRules(reject_border=True)
        self.definitions = definitions if definitions is not None else CategoryDefinitions.from_env()
        if image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {image_size}")
        self.image_size = int(image_size)
        self.background = tuple(int(v) for v in background)
        self.max_retries = int(max_retries)
        self.params = {"temperature": 0.0, "max_tokens": 1024, **(params or {})}

    @property
    def prompt_version(self) -> str:
        return self.prompt_file.id

    def prefilter(self, rgba: np.ndarray, truncated: bool | None = None) -> list[str]:
        """Alpha-only rejection reasons (``[]`` = send to the VLLM)."""
        return check_instance(rgba, self.rules, truncated=truncated)

    def messages(self, rgba: np.ndarray, category: str, definition: str | None = None) -> list[Message]:
        definition = definition if definition is not None else self.definitions.get(category)
        name = display_name(category)
        req = f"Named category: {name}" + (f" (definition: {definition})" if definition else "") + "."
        image = render_for_judge(rgba, self.image_size, self.background)
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": [image_part(image), text_part(f"{req}\n\n{OUTPUT_FORMAT}")]}]

    def _invalid(self, why: str) -> Verdict:
        return Verdict(False, 0.0, {}, {"error": why}, self.backend.model, self.prompt_version, status="invalid")

    def validate(self, rgbas: list[np.ndarray], categories: list[str],
                 definitions: list[str | None] | None = None,
                 truncated: list[bool | None] | None = None) -> list[Verdict]:
        """One :class:`Verdict` per instance, in order. Survivors of the pre-filters go to the VLLM in one
        ``chat_batch`` per round; unparseable replies are retried, then become ``invalid`` (rejects)."""
        if len(rgbas) != len(categories):
            raise ConfigError(f"{len(rgbas)} instances but {len(categories)} categories")
        defs = list(definitions) if definitions is not None else [None] * len(rgbas)
        verdicts: list[Verdict | None] = [None] * len(rgbas)
        todo: list[int] = []
        for i, rgba in enumerate(rgbas):
            reasons = self.prefilter(rgba, truncated[i] if truncated else None)
            if reasons:
                stats = alpha_stats(rgba, self.rules.alpha_threshold)
                verdicts[i] = Verdict(False, 0.0, {}, {"prefilter": ", ".join(reasons)}, "prefilter",
                                      self.prompt_version, status="prefilter",
                                      description=f"alpha stats {stats.to_dict()}")
            else:
                todo.append(i)
        for start in range(0, len(todo), self.chunk_size):  # bounds the encoded images held at once
            self._judge(todo[start:start + self.chunk_size], rgbas, categories, defs, verdicts)
        return [v for v in verdicts if v is not None]

    def _judge(self, todo: list[int], rgbas, categories, defs, verdicts: list[Verdict | None]) -> None:
        messages = {i: self.messages(rgbas[i], categories[i], defs[i]) for i in todo}
        errors: dict[int, str] = {}
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            replies = self.backend.chat_batch([messages[i] for i in todo], **{**self.params, "seed": attempt})
            retry = []
            for i, reply in zip(todo, replies, strict=True):
                try:
                    keep, score, crit, reasons, desc = parse_verdict(reply)
                except OutputParseError as e:
                    cut = truncation_note(reply, self.backend.model, TRUNCATION_SETTING)
                    errors[i] = f"{cut} ({e}): {excerpt(reply)!r}" if cut else f"{e}: {excerpt(reply)!r}"
                    if cut:
                        logger.warning("validation agent: %s", cut)
                    retry.append(i)
                    continue
                verdicts[i] = Verdict(keep, score, crit, reasons, self.backend.model, self.prompt_version,
                                      description=desc)
            todo = retry
        for i in todo:
            logger.info("validation agent: invalid reply for instance %d (%s): %s", i, categories[i], errors[i])
            verdicts[i] = self._invalid(errors[i])

    def validate_one(self, rgba: np.ndarray, category: str, definition: str | None = None) -> Verdict:
        return self.validate([rgba], [category], [definition])[0]


def store_verdicts(writer, rgbas: list[np.ndarray], categories: list[str], verdicts: list[Verdict],
                   sources: list[dict[str, Any] | None] | None = None,
                   category_ids: list[int | None] | None = None,
                   keep_prefiltered: bool = True) -> tuple[list[str], list[str]]:
    """Write kept instances to the bank (with their verdict) and rejected ones to its audit table.

    Rejection reasons are also counted in the bank statistics (``BankWriter.record_rejections``): the
    pre-filter reasons as they are, VLLM rejections as ``vllm_<criterion>`` per failed criterion, and
    unparseable replies as ``vllm_invalid``. Instances with an empty alpha are only counted (the bank
    cannot store them); ``keep_prefiltered=False`` counts every pre-filter rejection without storing it.
    Returns (kept ids, rejected ids).
    """
    kept, rejected = [], []
    counts: dict[str, int] = {}
    for i, (rgba, cat, v) in enumerate(zip(rgbas, categories, verdicts, strict=True)):
        src = sources[i] if sources else None
        if v.keep:
            kept.append(writer.add(rgba, category=cat, category_id=category_ids[i] if category_ids else None,
                                   source=src, verdict=v.to_dict()))
            continue
        if v.status == "prefilter":
            reasons = [r.strip() for r in v.reasons.get("prefilter", "").split(",") if r.strip()]
        elif v.status == "invalid":
            reasons = ["vllm_invalid"]
        else:
            reasons = [f"vllm_{c}" for c, ok in v.criteria.items() if not ok]
        for r in reasons:
            counts[r] = counts.get(r, 0) + 1
        storable = np.asarray(rgba)[..., 3].any() and (v.status != "prefilter" or keep_prefiltered)
        if storable:
            rejected.append(writer.add_rejected(rgba, category=cat, source=src, verdict=v.to_dict()))
    if counts:
        writer.record_rejections(counts)
    return kept, rejected
