"""``genval-aug agents ...``: evaluate the validation agent on a labeled set; optimize the agents' prompts."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_backend_args(p: argparse.ArgumentParser, prefix: str = "", default_kind: str = "openai",
                     what: str = "model") -> None:
    """Backend selection flags (``--backend``, ``--model``, ``--base-url``, ...), optionally prefixed."""
    from genval_aug.agents.backends import BACKEND_KINDS

    d = f"--{prefix}" if prefix else "--"
    p.add_argument(f"{d}backend", choices=BACKEND_KINDS, default=default_kind,
                   help=f"{what}: openai = any OpenAI-compatible server; transformers(-vision) = local model")
    p.add_argument(f"{d}model", required=not prefix, default=None,
                   help=f"{what}: model name (server) or hub id / local path (transformers)")
    p.add_argument(f"{d}base-url", default=None, help="server URL incl. /v1 (default $OPENAI_BASE_URL or OpenAI)")
    p.add_argument(f"{d}api-key-env", default="auto",
                   help="NAME of the environment variable holding the API key (the key is never stored); "
                        "auto (default): $OPENAI_API_KEY for api.openai.com only, no key for other servers; "
                        "NONE: no key")
    p.add_argument(f"{d}device", default=None, help="transformers: cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(f"{d}dtype", default="auto", help="transformers: auto, float32, float16, bfloat16")
    p.add_argument(f"{d}concurrency", type=int, default=4, help="openai: parallel requests")
    p.add_argument(f"{d}timeout", type=float, default=120.0, help="openai: seconds per request")


def backend_from_args(args: argparse.Namespace, prefix: str = ""):
    from genval_aug.agents.backends import load_backend

    def g(name):
        return getattr(args, f"{prefix.replace('-', '_')}{name}")

    kind, model = g("backend"), g("model")
    extra = {"concurrency": g("concurrency"), "timeout": g("timeout")} if kind == "openai" else {}
    cache = False if args.no_cache else (args.cache or True)
    return load_backend(kind, model, base_url=g("base_url"), api_key_env=g("api_key_env"), device=g("device"),
                        dtype=g("dtype"), cache=cache, **extra)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, help="response cache file (default $GENVAL_AUG_CACHE/responses.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")


def register(subparsers) -> None:
    p = subparsers.add_parser("agents", help="prompt and validation agents (evaluate, optimize)")
    sub = p.add_subparsers(dest="agents_command", metavar="SUBCOMMAND")

    ev = sub.add_parser("eval-validator", help="precision / recall of the validation agent on a labeled set")
    ev.add_argument("--labels", required=True, help="labels.csv (image, category, keep[, criteria...])")
    ev.add_argument("--images", default=None, help="directory of the RGBA images (default: the CSV's directory)")
    ev.add_argument("--prompt-version", default=None, help="validator prompt version (v1, latest, or a YAML path)")
    ev.add_argument("--prompt-dir", default=None, help="extra directory of prompt files")
    ev.add_argument("--lvis", default=None, help="LVIS category JSON for definitions")
    ev.add_argument("--image-size", type=int, default=448)
    ev.add_argument("--json", default=None, help="also write the metrics and verdicts to this JSON file")
    add_backend_args(ev, default_kind="openai", what="vision-language model")
    _add_cache_args(ev)
    ev.set_defaults(func=_eval_validator)

    op = sub.add_parser("optimize", help="optimize an agent's system prompt with TextGrad")
    op.add_argument("--agent", required=True, choices=("prompt", "validator"))
    op.add_argument("--steps", type=int, default=4, help="TextGrad steps (mini-batches)")
    op.add_argument("--train", required=True,
                    help="prompt: categories (.txt one per line, .csv with a category column, .json list); "
                         "validator: labels.csv")
    op.add_argument("--val", required=True, help="validation set, same format as --train")
    op.add_argument("--images", default=None, help="validator: image directory (default: each CSV's directory)")
    op.add_argument("--batch-size", type=int, default=3)
    op.add_argument("--n-prompts", type=int, default=4, help="prompt: prompts asked per category")
    op.add_argument("--tokenizer", default=None,
                    help="prompt: CLIP tokenizer (hub id or path) of the generation pipeline "
                         "(default openai/clip-vit-large-patch14 from the local cache)")
    op.add_argument("--metric", default="f1", choices=("f1", "precision", "recall", "accuracy"),
                    help="validator: validation metric that decides whether a step is kept")
    op.add_argument("--from-version", default=None, help="start from this prompt version (default: shipped v1)")
    op.add_argument("--prompt-dir", default=None, help="extra directory of prompt files to read")
    op.add_argument("--out-dir", default=None,
                    help="where the new version is written (default $GENVAL_AUG_PROMPTS or ~/.cache/genval-aug/prompts)")
    op.add_argument("--lvis", default=None, help="LVIS category JSON for definitions")
    op.add_argument("--seed", type=int, default=0)
    add_backend_args(op, default_kind="openai", what="task model (the agent's LLM / VLLM)")
    add_backend_args(op, prefix="optimizer-", default_kind="openai",
                     what="optimizer / evaluator LLM (default: the task backend)")
    _add_cache_args(op)
    op.set_defaults(func=_optimize)
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])


def _definitions(path):
    from genval_aug.agents.categories import CategoryDefinitions

    return CategoryDefinitions.from_lvis(path) if path else None


def _eval_validator(args) -> int:
    from genval_aug.agents.evaluation import evaluate, format_metrics, load_labels
    from genval_aug.agents.validation_agent import ValidationAgent

    labels = load_labels(args.labels, args.images)
    agent = ValidationAgent(backend_from_args(args), args.prompt_version, prompt_dir=args.prompt_dir,
                            definitions=_definitions(args.lvis), image_size=args.image_size)
    verdicts = agent.validate([lab.load_rgba() for lab in labels], [lab.category for lab in labels],
                              [lab.definition for lab in labels])
    metrics = evaluate(verdicts, labels)
    print(f"validator {agent.backend.model} / {agent.prompt_version} on {args.labels}")
    print(format_metrics(metrics))
    if args.json:
        out = {"model": agent.backend.model, "prompt_version": agent.prompt_version, "metrics": metrics,
               "verdicts": [{"image": str(lab.image), "label": lab.keep, **v.to_dict()}
                            for lab, v in zip(labels, verdicts, strict=True)]}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def read_categories(path: str | Path) -> list[str]:
    """Category names from a .txt (one per line, # comments), .csv (column category or name) or .json list."""
    import csv

    from genval_aug.errors import DatasetError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read categories: {e}") from e
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise DatasetError(f"{path}: expected a JSON list of category names")
        cats = data
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        col = next((c for c in ("category", "name") if rows and c in rows[0]), None)
        if col is None:
            raise DatasetError(f"{path}: needs a 'category' or 'name' column")
        cats = [r[col] for r in rows]
    else:
        cats = [ln.split("#", 1)[0] for ln in text.splitlines()]
    cats = [c.strip() for c in cats if c and c.strip()]
    if not cats:
        raise DatasetError(f"{path}: no categories")
    return cats


def _optimize(args) -> int:
    from genval_aug.agents import optimize as opt

    task = backend_from_args(args)
    optimizer = backend_from_args(args, "optimizer-") if args.optimizer_model else task
    defs = _definitions(args.lvis)

    def on_step(rec):
        state = "accepted" if rec.accepted else "reverted"
        score = "-" if rec.val_score is None else f"{rec.val_score:.3f}"
        print(f"step {rec.step}: val {score} {state}{' (' + rec.note + ')' if rec.note else ''}", flush=True)

    common = dict(steps=args.steps, batch_size=args.batch_size, start_version=args.from_version,
                  prompt_dir=args.prompt_dir, out_dir=args.out_dir, seed=args.seed, progress=True, on_step=on_step)
    if args.agent == "prompt":
        from genval_aug.agents.prompt_agent import PromptAgent

        tokenizer = PromptAgent(task, tokenizer=args.tokenizer).tokenizer  # loads (or fails clearly) up front
        res = opt.optimize_prompt_agent(task, optimizer, read_categories(args.train), read_categories(args.val),
                                        tokenizer=tokenizer, n_prompts=args.n_prompts, definitions=defs, **common)
    else:
        from genval_aug.agents.evaluation import load_labels

        res = opt.optimize_validation_agent(task, optimizer, load_labels(args.train, args.images),
                                            load_labels(args.val, args.images), metric=args.metric,
                                            agent_kwargs={"definitions": defs} if defs else None, **common)
    print(res.summary_table())
    if res.prompt_file is not None:
        print(f"wrote {res.prompt_file.path} (version {res.prompt_file.version}, parent {res.parent.version})")
    else:
        print("no step improved the validation score; no new version written")
    return 0
