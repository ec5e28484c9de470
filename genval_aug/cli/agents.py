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
    p.add_argument(f"{d}api-key-env", default="OPENAI_API_KEY",
                   help="NAME of the environment variable holding the API key (the key is never stored)")
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
