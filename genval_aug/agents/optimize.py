"""TextGrad optimization of the agents' system prompts (Gen-n-Val refines both with TextGrad).

* :func:`textgrad_engine` adapts any :class:`ChatBackend` to a TextGrad ``EngineLM`` (``__call__`` and
  ``generate``; images in TextGrad's multimodal content become data-URL parts).
* The agents' forward passes (including the VLLM's) run through our own backends inside TextGrad
  ``StringBasedFunction`` nodes, so TextGrad only ever sees text and its multimodal model-name whitelist
  does not apply.
* :func:`optimize_prompt_agent`: loss = an evaluator LLM's critique of the generated prompts plus hard checks
  computed here (parse failures, token budget, object named, near-duplicates).
* :func:`optimize_validation_agent`: loss from the misjudged examples of a labeled set.
* Each step is scored on a validation set and reverted when it scores worse than the current prompt.
  The best prompt is written as a new versioned YAML file (parent version, scores, optimizer model, date,
  step history) that the agents load by version. The file is created exclusively: two runs that finish
  together get two versions, never one overwritten by the other.
* An error at step *k* (a server that goes down, ...) raises :class:`OptimizationStopped` naming the step and
  the cause, after saving the best prompt of steps < *k* (its history ends with the failed step).

TextGrad is imported by :func:`import_textgrad` with its import side effects neutralized: its log directory
goes to a temporary directory unless ``$TEXTGRAD_LOG_DIR`` is set, and litellm uses its bundled model cost map
instead of fetching one; both environment variables are restored right after the import.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genval_aug.agents.backends.base import ChatBackend, text_part
from genval_aug.agents.categories import CategoryDefinitions, display_name
from genval_aug.agents.evaluation import LabeledInstance, evaluate
from genval_aug.agents.parsing import OutputParseError, excerpt, extract_json_object, truncation_note
from genval_aug.agents.prompt_agent import PromptAgent, PromptResult, object_request
from genval_aug.agents.prompt_files import PromptFile, load_prompt, next_version, user_prompt_dir, utc_now
from genval_aug.agents.validation_agent import CRITERIA, ValidationAgent, Verdict
from genval_aug.errors import AgentError, ConfigError

logger = logging.getLogger(__name__)

# --- textgrad import and engine --------------------------------------------------------------------------


def import_textgrad():
    """Import ``textgrad`` without its side effects (``./logs/`` in the CWD, litellm's network fetch)."""
    if "textgrad" in sys.modules:
        return sys.modules["textgrad"]
    temporary = {}
    if not os.environ.get("TEXTGRAD_LOG_DIR"):
        temporary["TEXTGRAD_LOG_DIR"] = tempfile.mkdtemp(prefix="genval-aug-textgrad-logs-")
    if not (os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP") or os.environ.get("LITELLM_OFFLINE_MODE")):
        temporary["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.update(temporary)
    try:
        import textgrad
    except ImportError as e:
        raise ConfigError("TextGrad is not installed: pip install 'genval-aug[agents]'") from e
    finally:
        for k in temporary:
            os.environ.pop(k, None)
    return textgrad


_ENGINE_CLS = None


def textgrad_engine(backend: ChatBackend, **params: Any):
    """A TextGrad ``EngineLM`` that sends every call through ``backend`` (``params`` go with each call)."""
    global _ENGINE_CLS
    tg = import_textgrad()
    if _ENGINE_CLS is None:

        class BackendEngine(tg.EngineLM):
            """TextGrad engine over a genval_aug ChatBackend."""

            def __init__(self, backend: ChatBackend, params: dict[str, Any]):
                self.backend = backend
                self.params = params
                self.model_string = backend.model
                self.calls = 0

            def generate(self, content, system_prompt: str | None = None, **kwargs: Any) -> str:
                if isinstance(content, (list, tuple)):
                    parts = [text_part(c) if isinstance(c, str) else _bytes_image_part(c) for c in content]
                else:
                    parts = str(content)
                messages = [{"role": "system", "content": system_prompt or self.system_prompt},
                            {"role": "user", "content": parts}]
                self.calls += 1
                # a plain str: TextGrad's Variable accepts exactly str/int/bytes, not our ChatReply subclass
                return str(self.backend.chat(messages, **{**self.params, **kwargs}))

            def __call__(self, content, system_prompt: str | None = None, **kwargs: Any) -> str:
                return self.generate(content, system_prompt=system_prompt, **kwargs)

        _ENGINE_CLS = BackendEngine
    return _ENGINE_CLS(backend, dict(params))


def _bytes_image_part(data: bytes) -> dict[str, Any]:
    mime = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg" if data[:2] == b"\xff\xd8" else "webp"
    return {"type": "image_url", "image_url": {"url": f"data:image/{mime};base64,{base64.b64encode(data).decode()}"}}


@contextlib.contextmanager
def _explicit_backward_engine():
    """TextGrad refuses ``backward(engine)`` while a global backward engine is set: park the user's global
    engine for the duration of our run and put it back afterwards."""
    tg = import_textgrad()
    single = tg.config.SingletonBackwardEngine()
    saved = single.get_engine()
    single.engine = None
    try:
        yield
    finally:
        single.engine = saved


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: int
    batch: list[str]
    val_score: float | None
    accepted: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batch": self.batch, "val_score": self.val_score, "accepted": self.accepted,
                "note": self.note}


@dataclass
class OptimizationResult:
    """What a run produced: the best prompt, its scores, the step history and the written file (if any)."""

    agent: str
    parent: PromptFile
    system: str
    val_before: float
    val_after: float
    history: list[StepRecord] = field(default_factory=list)
    metrics_before: dict[str, Any] = field(default_factory=dict)
    metrics_after: dict[str, Any] = field(default_factory=dict)
    prompt_file: PromptFile | None = None

    @property
    def changed(self) -> bool:
        return self.system.strip() != self.parent.system.strip()

    def summary_table(self) -> str:
        lines = [f"{'step':>4}  {'val score':>9}  {'result':8}  batch / note"]
        lines.append(f"{0:>4}  {self.val_before:>9.3f}  {'start':8}  {self.parent.id}")
        for h in self.history:
            score = "-" if h.val_score is None else f"{h.val_score:.3f}"
            res = "accepted" if h.accepted else "reverted"
            lines.append(f"{h.step:>4}  {score:>9}  {res:8}  {', '.join(h.batch)[:50]}{' | ' + h.note if h.note else ''}")
        lines.append(f"best val score {self.val_after:.3f} (start {self.val_before:.3f})")
        for k in ("precision", "recall"):
            if k in self.metrics_before:
                b, a = self.metrics_before.get(k), self.metrics_after.get(k)
                lines.append(f"{k:9} before {_fmt(b)}  after {_fmt(a)}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _check_schedule(steps: int, batch_size: int) -> None:
    """``batch_size`` 0 made empty mini-batches, whose empty loss list crashed the step with an IndexError."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _batches(items: Sequence[Any], size: int, steps: int, seed: int) -> list[list[Any]]:
    """``steps`` mini-batches cycling over a seeded shuffle of ``items`` (epochs as needed)."""
    import random

    rng = random.Random(seed)
    order: list[Any] = []
    out = []
    for _ in range(steps):
        batch = []
        while len(batch) < min(size, len(items)):
            if not order:
                order = list(items)
                rng.shuffle(order)
            batch.append(order.pop())
        out.append(batch)
    return out


def _save(result: OptimizationResult, out_dir: str | os.PathLike | None, optimizer_model: str, task_model: str,
          extra_scores: dict[str, Any], notes: str) -> PromptFile | None:
    """Write the best prompt as the next free version. Created exclusively: when another run takes the same
    version first, the next one is used (never overwritten)."""
    if not result.changed:
        logger.info("no step improved the validation score; no new prompt version written")
        return None
    out = Path(out_dir) if out_dir is not None else user_prompt_dir()
    pf = PromptFile(agent=result.agent, version="", system=result.system,
                    parent=result.parent.version, created=utc_now(), optimizer_model=optimizer_model,
                    task_model=task_model,
                    scores={"val_before": round(result.val_before, 6), "val_after": round(result.val_after, 6),
                            **extra_scores},
                    history=[h.to_dict() for h in result.history], notes=notes)
    floor = 0
    for _ in range(1000):
        number = max(int(next_version(result.agent, out)[1:]), floor + 1)
        pf.version = f"v{number}"
        try:
            pf.save(out, exclusive=True)
            break
        except FileExistsError:   # another optimization wrote this version between our look and our write
            logger.info("%s exists already (written by another run); trying v%d", pf.id, number + 1)
            floor = number
    else:  # pragma: no cover - a thousand concurrent writers
        raise ConfigError(f"{out}: could not find a free version for {result.agent}")
    result.prompt_file = pf
    return pf


class OptimizationStopped(AgentError):
    """An optimization failed at a step (a server went down, ...). The best prompt found before it was saved
    (``result.prompt_file``, unless no step had improved it); ``step`` is the step that failed."""

    def __init__(self, message: str, result: OptimizationResult, step: int):
        super().__init__(message)
        self.result = result
        self.step = step


def _stopped(result: OptimizationResult, error: BaseException, step: int, steps: int, batch: list[str],
             save: Callable[[str], PromptFile | None] | None, label: str) -> OptimizationStopped:
    """Record the failed step, save the best prompt so far and build the error that says where it stopped."""
    why = f"{type(error).__name__}: {error}"[:400]
    result.history.append(StepRecord(step, batch, None, False, f"failed: {why}"))
    best_step = max((h.step for h in result.history if h.accepted), default=None)
    pf = save(f"stopped at step {step} of {steps}: {why}") if save is not None else None
    if pf is not None:
        kept = (f"the best prompt so far (val {result.val_after:.3f}, step {best_step}) was saved as {pf.path} "
                f"(version {pf.version})")
    elif result.changed:
        kept = f"the best prompt so far (val {result.val_after:.3f}, step {best_step}) is in the error's result"
    else:
        kept = "no earlier step had improved the prompt; nothing saved"
    return OptimizationStopped(f"{label} optimization stopped at step {step} of {steps} ({why}); {kept}",
                               result, step)


def _tgd_step(tg, optimizer, param, losses) -> str | None:
    """backward + TGD step; returns an error note instead of raising when the optimizer reply is unusable."""
    if not losses:
        return "no loss to optimize"
    total = tg.sum(losses) if len(losses) > 1 else losses[0]
    try:
        total.backward(optimizer.engine)
        optimizer.step()
    except IndexError:
        return "optimizer reply had no <IMPROVED_VARIABLE> tags"
    if not param.value.strip():
        return "optimizer returned an empty prompt"
    return None


def _guarded_step(tg, optimizer, system, losses, evaluate: Callable[[str], tuple[float, Any]], best: float,
                  what: str = "") -> tuple[bool, float | None, Any, str]:
    """One TGD step kept only if the validation score does not drop; reverted otherwise.

    ``evaluate(prompt) -> (score, details)``. Returns ``(accepted, score, details, note)``; ``score`` is None
    when the step itself failed (note says why).
    """
    previous = system.value
    note = _tgd_step(tg, optimizer, system, losses) or ""
    score = details = None
    if not note:
        score, details = evaluate(system.value)
        if score < best:
            note = f"val {what}{score:.3f} < {best:.3f}"
    if note:
        system.set_value(previous)
    return not note, score, details, note


def _end_step(result: OptimizationResult, rec: StepRecord, best: float, bar, on_step, label: str, refused: str) -> None:
    """Record a step, log it, report it to ``on_step`` and the progress bar."""
    result.history.append(rec)
    logger.info("%s step %d: %s", label, rec.step, "accepted" if rec.accepted else f"{refused} ({rec.note})")
    if on_step:
        on_step(rec)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(best=f"{best:.3f}")


@contextlib.contextmanager
def _keep_progress(result: OptimizationResult, where: Callable[[], tuple[int, list[str]]], steps: int,
                   save: Callable[[str], PromptFile | None] | None, label: str):
    """Turn an error inside the step loop into :class:`OptimizationStopped` after saving the best prompt so far
    (a Ctrl-C saves it too and stays a KeyboardInterrupt)."""
    try:
        yield
    except BaseException as e:
        step, batch = where()
        try:
            stopped = _stopped(result, e, step, steps, batch, save, label)
        except Exception as save_error:  # noqa: BLE001 - the original error matters more than the failed save
            logger.error("%s optimization: could not save the best prompt after the failure: %s", label, save_error)
            raise e from None
        logger.error("%s", stopped)
        if isinstance(e, Exception):
            raise stopped from e
        raise


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


# --- prompt agent ----------------------------------------------------------------------------------------

PROMPT_EVALUATOR = (
    "You evaluate text-to-image prompts written to generate ONE isolated object on a transparent canvas for "
    "a detection training set. Criticise them concisely against these criteria: exactly one object of the "
    "requested category; no background, scene, surface or other objects; variety across the set (viewpoint, "
    "colour, material, lighting, style, medium); short enough for a 77-token CLIP text encoder. Name concrete "
    "problems and say what the instructions that produced them should change."
)

RATING_INSTRUCTION = (
    "Rate this set of text-to-image prompts for generating a single isolated {name} (no background, no other "
    "objects, diverse, short) from 0 (useless) to 10 (excellent).\n\nPrompts:\n{prompts}\n\n"
    'Answer with JSON only: {{"score": <integer 0-10>}}'
)

PROMPT_AGENT_CONSTRAINTS = [
    "The text stays a system prompt for an assistant that writes text-to-image prompts of one isolated object.",
    "Do not prescribe an output format (the user message fixes the JSON format).",
    "Keep it under 400 words.",
]


def _prompt_report(category: str, res: PromptResult, n: int) -> str:
    lines = [f"Object request: {object_request(category)}", f"Prompts accepted ({len(res.prompts)} of {n}):"]
    lines += [f"- {p}" for p in res.prompts] or ["(none)"]
    if res.rejected:
        lines.append("Prompts rejected by the checks:")
        lines += [f"- {p} [{why}]" for p, why in res.rejected]
    if res.failures:
        lines.append("Replies that were not the requested JSON:")
        lines += [f"- {f}" for f in res.failures]
    return "\n".join(lines)


def _hard_checks(res: PromptResult, n: int) -> str:
    too_long = [w for _, w in res.rejected if w.startswith("too long")]
    dups = sum(w == "near-duplicate" for _, w in res.rejected)
    unnamed = sum(w.startswith("does not name") for _, w in res.rejected)
    parts = [f"{len(res.prompts)} of {n} requested prompts usable ({len(res.prompts) / n:.0%})."]
    if res.failures:
        parts.append(f"{len(res.failures)} replies were not valid JSON.")
    if too_long:
        parts.append(f"{len(too_long)} prompts exceeded the CLIP token budget ({'; '.join(too_long)}).")
    if dups:
        parts.append(f"{dups} prompts were near-duplicates of another.")
    if unnamed:
        parts.append(f"{unnamed} prompts did not name the object.")
    if len(parts) == 1 and len(res.prompts) == n:
        parts.append("All hard checks passed.")
    return " ".join(parts)


class PromptAgentObjective:
    """Scores a prompt-agent system prompt on categories: mean over categories of
    ``(1 - evaluator_weight) * usable_fraction + evaluator_weight * rating / 10``."""

    def __init__(self, task_backend: ChatBackend, evaluator_backend: ChatBackend | None, *, tokenizer: Any,
                 n_prompts: int = 4, definitions: CategoryDefinitions | None = None, evaluator_weight: float = 0.5,
                 agent_kwargs: dict[str, Any] | None = None):
        self.task_backend = task_backend
        self.evaluator_backend = evaluator_backend
        self.tokenizer = tokenizer
        self.n = int(n_prompts)
        self.definitions = definitions if definitions is not None else CategoryDefinitions.from_env()
        self.evaluator_weight = float(evaluator_weight) if evaluator_backend is not None else 0.0
        self.agent_kwargs = {"max_retries": 0, **(agent_kwargs or {})}

    def agent(self, system_prompt: str) -> PromptAgent:
        return PromptAgent(self.task_backend, tokenizer=self.tokenizer, definitions=self.definitions,
                           system_prompt=system_prompt, **self.agent_kwargs)

    def run(self, system_prompt: str, categories: Sequence[str]) -> list[PromptResult]:
        return self.agent(system_prompt).run_many(list(categories), self.n)

    def rating(self, results: list[PromptResult]) -> list[float]:
        if self.evaluator_backend is None:
            return [0.0] * len(results)
        batch = [[{"role": "user", "content": RATING_INSTRUCTION.format(
            name=display_name(r.category), prompts="\n".join(f"- {p}" for p in r.prompts) or "(none)")}]
            for r in results]
        out = []
        for r, reply in zip(results, self.evaluator_backend.chat_batch(batch, temperature=0.0), strict=True):
            if not r.prompts:
                out.append(0.0)
                continue
            try:
                s = extract_json_object(reply).get("score")
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 10:
                    raise OutputParseError(f"score {s!r} not in 0..10")
                out.append(float(s) / 10.0)
            except OutputParseError as e:
                cut = truncation_note(reply, self.evaluator_backend.model)
                (logger.warning if cut else logger.info)("evaluator rating for %r unusable (%s): %r", r.category,
                                                         f"{cut} ({e})" if cut else e, excerpt(reply))
                out.append(0.0)
        return out

    def score(self, system_prompt: str, categories: Sequence[str]) -> float:
        results = self.run(system_prompt, categories)
        usable = [len(r.prompts) / self.n for r in results]
        ratings = self.rating(results)
        w = self.evaluator_weight
        return float(sum((1 - w) * u + w * r for u, r in zip(usable, ratings, strict=True)) / max(1, len(results)))


def optimize_prompt_agent(task_backend: ChatBackend, optimizer_backend: ChatBackend, train: Sequence[str],
                          val: Sequence[str], *, tokenizer: Any, steps: int = 4, batch_size: int = 3,
                          n_prompts: int = 4, start_version: str | None = None,
                          prompt_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                          evaluator_backend: ChatBackend | None = None, definitions: CategoryDefinitions | None = None,
                          evaluator_weight: float = 0.5, seed: int = 0, save: bool = True,
                          progress: bool = False,
                          on_step: Callable[[StepRecord], None] | None = None) -> OptimizationResult:
    """Optimize the prompt agent's system prompt with TextGrad on ``train`` categories, scored on ``val``.

    ``evaluator_backend`` (default: the optimizer's) writes the critique (the textual loss) and the 0-10
    rating used in the validation score; the hard checks are computed here.
    """
    if not train or not val:
        raise ConfigError("optimize_prompt_agent needs non-empty train and val category lists")
    _check_schedule(steps, batch_size)
    tg = import_textgrad()
    evaluator_backend = evaluator_backend or optimizer_backend
    start = load_prompt("prompt_agent", start_version, prompt_dir)
    objective = PromptAgentObjective(task_backend, evaluator_backend, tokenizer=tokenizer, n_prompts=n_prompts,
                                     definitions=definitions, evaluator_weight=evaluator_weight,
                                     agent_kwargs={"seed": seed})
    opt_engine = textgrad_engine(optimizer_backend, temperature=0.0)
    eval_engine = textgrad_engine(evaluator_backend, temperature=0.0)
    system = tg.Variable(start.system, requires_grad=True,
                         role_description="system prompt of an LLM that writes text-to-image prompts for one "
                                          "isolated object of a given category")
    best = objective.score(start.system, val)
    result = OptimizationResult("prompt_agent", start, start.system, best, best)
    n = objective.n
    notes = (f"TextGrad TGD, {steps} steps, batch {batch_size}, {n_prompts} prompts per category, "
             f"evaluator {evaluator_backend.model}")

    def write(extra_note: str = "") -> PromptFile | None:
        result.val_after = best
        return _save(result, out_dir, optimizer_backend.model, task_backend.model, {"val_categories": len(val)},
                     notes=f"{notes}; {extra_note}" if extra_note else notes)

    step, batch = 0, []
    with _explicit_backward_engine(), _progress(steps, progress, "optimize prompt agent") as bar, \
            _keep_progress(result, lambda: (step, batch), steps, write if save else None, "prompt agent"):
        optimizer = tg.TGD(parameters=[system], engine=opt_engine, constraints=PROMPT_AGENT_CONSTRAINTS)
        critique = tg.TextLoss(PROMPT_EVALUATOR, engine=eval_engine)
        for step, batch in enumerate(_batches(list(train), batch_size, steps, seed), start=1):
            optimizer.zero_grad()
            results = {r.category: r for r in objective.run(system.value, batch)}
            losses = []
            for cat in batch:
                run_fn = tg.autograd.StringBasedFunction(
                    lambda system_prompt, request, _r=results[cat]: _prompt_report(_r.category, _r, n),
                    "An LLM with this system prompt turns the object request into text-to-image prompts; "
                    "code then checks the JSON, the CLIP token budget, the object name and near-duplicates.")
                request = tg.Variable(object_request(cat, objective.definitions.get(cat)), requires_grad=False,
                                      role_description="object request given to the prompt agent")
                output = run_fn(inputs={"system_prompt": system, "request": request},
                                response_role_description=f"text-to-image prompts produced for {display_name(cat)}")
                check_fn = tg.autograd.StringBasedFunction(
                    lambda prompts, _r=results[cat]: _hard_checks(_r, n),
                    "Hard checks computed by code: usable prompts, invalid JSON replies, token budget, "
                    "duplicates, object named.")
                losses.append(critique(output))
                losses.append(check_fn(inputs={"prompts": output}))
            accepted, score, _, note = _guarded_step(
                tg, optimizer, system, losses, lambda prompt: (objective.score(prompt, val), None), best)
            if accepted:
                best = score
                result.system = system.value
                result.val_after = best
            rec = StepRecord(step, list(batch), score, accepted, note)
            _end_step(result, rec, best, bar, on_step, "prompt agent", "reverted")
    result.val_after = best
    if save:
        write()
    return result


# --- validation agent ------------------------------------------------------------------------------------

VALIDATOR_CONSTRAINTS = [
    "The text stays a system prompt for a vision-language model that inspects one cut-out object image.",
    "Keep the five criteria named exactly: " + ", ".join(CRITERIA) + ".",
    "Do not prescribe an output format (the user message fixes the JSON format).",
    "Keep it under 500 words.",
]


def _verdict_text(v: Verdict) -> str:
    if v.status == "invalid":
        return f"The agent's reply was not the requested JSON ({v.reasons.get('error', '')[:300]})."
    if v.status == "prefilter":
        return f"Rejected by the alpha pre-filters before the model saw it ({v.reasons.get('prefilter')})."
    crit = "; ".join(f"{c}: {'pass' if v.criteria.get(c) else 'FAIL'} ({v.reasons.get(c, '')})" for c in CRITERIA)
    return (f"Image description by the agent: {v.description or '(none)'}\nCriteria: {crit}\n"
            f"Decision: {'KEEP' if v.keep else 'REJECT'}")


def _label_text(lab: LabeledInstance) -> str:
    crit = ", ".join(f"{c}: {'pass' if ok else 'FAIL'}" for c, ok in lab.criteria.items())
    return f"Human label: {'KEEP' if lab.keep else 'REJECT'}" + (f" ({crit})" if crit else "")


def _comparison(v: Verdict, lab: LabeledInstance) -> str:
    if v.keep == lab.keep:
        return "Correct decision."
    what = "kept an instance that should be rejected (a bad training sample got in)" if v.keep else \
        "rejected an instance that should be kept"
    wrong = [c for c, ok in lab.criteria.items() if v.status == "judged" and v.criteria.get(c) != ok]
    detail = f" Criteria judged differently from the human: {', '.join(wrong)}." if wrong else ""
    return f"WRONG: the agent {what}. {_label_text(lab)}.{detail}"


class ValidatorObjective:
    """Scores a validator system prompt on labeled instances (``metric`` of :func:`evaluate`)."""

    def __init__(self, task_backend: ChatBackend, *, metric: str = "f1", agent_kwargs: dict[str, Any] | None = None):
        if metric not in ("f1", "precision", "recall", "accuracy"):
            raise ConfigError(f"metric must be f1, precision, recall or accuracy, got {metric!r}")
        self.task_backend = task_backend
        self.metric = metric
        self.agent_kwargs = dict(agent_kwargs or {})
        self._images: dict[Path, Any] = {}

    def rgba(self, lab: LabeledInstance):
        if lab.image not in self._images:
            self._images[lab.image] = lab.load_rgba()
        return self._images[lab.image]

    def verdicts(self, system_prompt: str, labels: Sequence[LabeledInstance]) -> list[Verdict]:
        agent = ValidationAgent(self.task_backend, system_prompt=system_prompt, **self.agent_kwargs)
        return agent.validate([self.rgba(lab) for lab in labels], [lab.category for lab in labels],
                              [lab.definition for lab in labels])

    def metrics(self, system_prompt: str, labels: Sequence[LabeledInstance]) -> dict[str, Any]:
        return evaluate(self.verdicts(system_prompt, labels), list(labels))

    def value(self, metrics: dict[str, Any]) -> float:
        v = metrics.get(self.metric)
        return float(v) if v is not None else 0.0


def optimize_validation_agent(task_backend: ChatBackend, optimizer_backend: ChatBackend,
                              train: Sequence[LabeledInstance], val: Sequence[LabeledInstance], *, steps: int = 4,
                              batch_size: int = 4, metric: str = "f1", start_version: str | None = None,
                              prompt_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                              seed: int = 0, save: bool = True, progress: bool = False,
                              agent_kwargs: dict[str, Any] | None = None,
                              on_step: Callable[[StepRecord], None] | None = None) -> OptimizationResult:
    """Optimize the validation agent's system prompt on a labeled set (keep/reject, optional per criterion).

    The VLLM runs through ``task_backend``; TextGrad sees its verdicts as text. The loss of a mini-batch is
    built from the misjudged examples only (a batch without mistakes makes no step). Steps that lower the
    validation ``metric`` are reverted; precision and recall before and after are in the result.
    """
    if not train or not val:
        raise ConfigError("optimize_validation_agent needs non-empty train and val label sets")
    _check_schedule(steps, batch_size)
    tg = import_textgrad()
    start = load_prompt("validation_agent", start_version, prompt_dir)
    objective = ValidatorObjective(task_backend, metric=metric, agent_kwargs=agent_kwargs)
    opt_engine = textgrad_engine(optimizer_backend, temperature=0.0)
    system = tg.Variable(start.system, requires_grad=True,
                         role_description="system prompt of a vision-language model that decides whether a "
                                          "cut-out object image is a valid training sample of its category")
    metrics_before = objective.metrics(start.system, val)
    best = objective.value(metrics_before)
    result = OptimizationResult("validation_agent", start, start.system, best, best, metrics_before=metrics_before,
                                metrics_after=metrics_before)
    def write(extra_note: str = "") -> PromptFile | None:
        result.val_after = best
        mb, ma = result.metrics_before, result.metrics_after
        notes = f"TextGrad TGD, {steps} steps, batch {batch_size}, loss from misjudged examples"
        return _save(result, out_dir, optimizer_backend.model, task_backend.model,
                     {"metric": metric, "val_instances": len(val),
                      "precision_before": mb.get("precision"), "recall_before": mb.get("recall"),
                      "precision_after": ma.get("precision"), "recall_after": ma.get("recall")},
                     notes=f"{notes}; {extra_note}" if extra_note else notes)

    step, batch = 0, []
    with _explicit_backward_engine(), _progress(steps, progress, "optimize validation agent") as bar, \
            _keep_progress(result, lambda: (step, [lab.image.name for lab in batch]), steps,
                           write if save else None, "validation agent"):
        optimizer = tg.TGD(parameters=[system], engine=opt_engine, constraints=VALIDATOR_CONSTRAINTS)
        for step, batch in enumerate(_batches(list(train), batch_size, steps, seed), start=1):
            optimizer.zero_grad()
            verdicts = objective.verdicts(system.value, batch)
            losses = []
            for lab, v in zip(batch, verdicts, strict=True):
                if v.keep == lab.keep:
                    continue
                example = tg.Variable(f"Image of a {display_name(lab.category)!r} "
                                      f"({lab.definition or 'no definition'}) [{lab.image.name}]",
                                      requires_grad=False, role_description="instance shown to the agent")
                judge = tg.autograd.StringBasedFunction(
                    lambda system_prompt, instance, _v=v: _verdict_text(_v),
                    "A vision-language model with this system prompt judges the image against the criteria and "
                    "decides keep or reject (the image itself is not shown here).")
                verdict = judge(inputs={"system_prompt": system, "instance": example},
                                response_role_description="the validation agent's verdict")
                label = tg.Variable(_label_text(lab), requires_grad=False, role_description="human label")
                compare = tg.autograd.StringBasedFunction(
                    lambda verdict, label, _v=v, _l=lab: _comparison(_v, _l),
                    "Compares the agent's decision with the human label.")
                losses.append(compare(inputs={"verdict": verdict, "label": label}))
            names = [lab.image.name for lab in batch]
            if not losses:
                rec = StepRecord(step, names, None, False, "no misjudged example in the batch; no step")
            else:
                def evaluate(prompt: str) -> tuple[float, dict[str, Any]]:
                    m = objective.metrics(prompt, val)
                    return objective.value(m), m

                accepted, score, metrics, note = _guarded_step(tg, optimizer, system, losses, evaluate, best,
                                                               f"{metric} ")
                if accepted:
                    best = score
                    result.system = system.value
                    result.metrics_after = metrics
                    result.val_after = best
                rec = StepRecord(step, names, score, accepted, note or f"{len(losses)} misjudged")
            _end_step(result, rec, best, bar, on_step, "validator", "not taken")
    result.val_after = best
    if save:
        write()
    return result
