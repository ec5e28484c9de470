"""Build a bank with Layer Diffusion and both Gen-n-Val agents (prompt LLM, validation VLLM) from a YAML config.

The config (default ``examples/build_lvis_rare.yaml``) names real models: SDXL base +
``LayerDiffusion/layerdiffusion-v1`` as the generator, Qwen2.5-7B-Instruct as the prompt agent and
Qwen2.5-VL-7B-Instruct as the validation agent, both behind OpenAI-compatible servers (vLLM, SGLang, TGI); the
YAML shows the in-process ``transformers`` alternative. Real run on one GPU (the two servers on other GPUs or
another machine):

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 &
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8001 &
    export LVIS_CATEGORIES=../shared/data/lvis_v1_categories.json
    python examples/build_bank_gpu.py --only ax,banjo,blimp --target 50 --bank cache/trial.lmdb \
        --sheet cache/trial_sheet.png                   # a trial: 3 rare classes, 50 instances each
    python examples/build_bank_gpu.py                    # the whole config: every rare class to 1000

It checks that the chat servers answer before loading SDXL, runs ``BankBuilder`` (resumable: run it again
after a crash and it continues; a finished config does nothing), prints the report (kept, rejected by reason,
per-stage throughput), a few kept instances with their prompt and verdict, and writes a contact sheet.
``genval-aug bank build --config ...`` runs the same build without the trial options; under ``torchrun`` it
splits the classes over GPUs (README, "Scale-out").

``--tiny`` builds the same pipeline, same YAML, on the CPU in seconds: the real ``LayerDiffusionGenerator``
on tiny random SD1.5 components, and the real prompt and validation agents talking HTTP to a loopback
OpenAI-compatible server that answers from a script (prompts naming the object; a verdict that rejects about
a third of the instances). Both come from the test suite's machinery (``tests/agents_support.py``,
``tests/genval_build_testplugins.py``), so ``--tiny`` needs a source checkout. The pre-filters are off in
``--tiny`` (64 px noise would fail ``min_area: 4096``); everything else is the YAML's.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "build_lvis_rare.yaml"
TINY_CLASSES = ["banjo", "blimp"]          # two rare LVIS classes


def backends(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat backend specs of the prompt maker and the validator (those that are agents)."""
    out = []
    for part in ("prompts", "validator"):
        comp = raw.get(part)
        if isinstance(comp, dict) and comp.get("kind") == "agent":
            out.append(comp.setdefault("params", {}).setdefault("backend", {}))
    return out


def check_servers(raw: dict[str, Any]) -> None:
    """Fail fast (before the diffusion model loads) when an OpenAI-compatible server does not answer."""
    import httpx

    for b in backends(raw):
        if b.get("kind", "openai") != "openai" or not b.get("base_url"):
            continue
        try:
            httpx.get(b["base_url"].rstrip("/") + "/models", timeout=5.0)   # any HTTP answer will do
        except httpx.TransportError as e:
            raise SystemExit(f"the chat server for {b.get('model')} at {b['base_url']} does not answer ({e}); "
                             "start it (e.g. `vllm serve <model> --port ...`) or fix base_url in the config") from None


def scripted_chat(body: dict[str, Any]) -> str:
    """The loopback server's answers in --tiny: prompts for the prompt agent, verdicts for the validator."""
    from agents_support import verdict_json

    user = body["messages"][-1]["content"]
    if isinstance(user, list):                              # the validator sends the instance as an image
        image = next(p["image_url"]["url"] for p in user if p.get("type") == "image_url")
        if hashlib.sha256(image.encode()).digest()[0] % 3 == 0:
            return verdict_json(fail=("single_object",))
        return verdict_json(confidence=0.8)
    name = re.search(r"An image of a single ([^,.]+)", user).group(1).strip()
    styles = ["wooden", "red", "vintage", "small"]
    return '{"prompts": [' + ", ".join(f'"a {s} {name}, isolated on a plain background"' for s in styles) + "]}"


def make_tiny(raw: dict[str, Any], stack: ExitStack, work: Path) -> dict[str, Any]:
    """Rewrite the config for tiny random models and a loopback chat server (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from agents_support import ChatServer, tiny_clip_tokenizer

    server = stack.enter_context(ChatServer([scripted_chat]))
    for b in backends(raw):                                 # same agents, same protocol, loopback server
        b.update(kind="openai", base_url=server.base_url, api_key_env=None, cache=False)
    tok = work / "clip-tokenizer"                           # the prompt agent counts tokens with the
    tiny_clip_tokenizer().save_pretrained(str(tok))         # generator's tokenizer: the tiny one here
    if raw.get("prompts", {}).get("kind") == "agent":
        raw["prompts"]["params"]["tokenizer"] = str(tok)
        raw["prompts"]["n"] = min(int(raw["prompts"].get("n", 4)), 4)
    src = raw["source"]
    raw["source"] = {"kind": "genval_build_testplugins:make_tiny_layerdiffusion",
                     "batch_size": min(int(src.get("batch_size", 2)), 4),
                     "params": {"negative_prompt": src.get("params", {}).get("negative_prompt")}}
    raw["prefilter"] = None
    raw.setdefault("pipeline", {})["progress"] = False
    shared = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    lvis = os.environ.get("LVIS_CATEGORIES") or str(shared / "lvis_v1_categories.json")
    if "table" in raw.get("classes", {}) and Path(lvis).is_file():
        os.environ["LVIS_CATEGORIES"] = lvis
    else:                                                   # no category table here: plain names
        raw["classes"] = {"names": list(TINY_CLASSES), "target": 3}
    return raw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--bank", type=Path, default=None, help="output bank (default: output.bank of the config)")
    p.add_argument("--only", default=None, help="comma-separated class names: build just these (a trial)")
    p.add_argument("--target", type=int, default=None, help="with --only: instances per class")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dry-run", action="store_true", help="print the per-class deficits and exit")
    p.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG of the built classes")
    p.add_argument("--tiny", action="store_true", help="tiny random models + loopback chat server (CPU smoke run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    raw = yaml.safe_load(args.config.read_text())
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genval-build-example-")))
        if args.tiny:
            import diffusers
            import torch
            import transformers

            torch.set_num_threads(1)
            transformers.logging.set_verbosity_error()     # the tiny CLIP's 16-token window truncates prompts:
            diffusers.utils.logging.set_verbosity_error()  # expected here, not worth a warning per batch
            raw = make_tiny(raw, stack, work)
            if "table" in raw["classes"]:
                args.only, args.target = args.only or ",".join(TINY_CLASSES), args.target or 3
            args.bank = args.bank or work / "tiny.lmdb"
            args.device = "cpu"
        if args.only:
            only = [c.strip() for c in args.only.split(",") if c.strip()]
            raw["classes"] = {**raw["classes"], "only": only}
            if args.target is not None:
                raw["classes"]["targets"] = {c: args.target for c in only}
        elif args.target is not None:
            raise SystemExit("--target goes with --only (the config's own targets apply otherwise)")

        from genval_aug.build import BankBuilder, parse_config

        cfg = parse_config(raw, where=str(args.config), base_dir=args.config.resolve().parent)
        bank = str(args.bank or cfg.output.bank)
        builder = BankBuilder(cfg, bank=bank, device=args.device)
        deficits = {k: v for k, v in builder.deficits().items() if v > 0}
        print(f"config {args.config.name}: {len(cfg.classes)} classes, {len(deficits)} below target, "
              f"{sum(deficits.values())} instances missing -> {bank}")
        print(f"  prompts: {cfg.prompts.kind} {cfg.prompts.params.get('backend', {}).get('model', '')}")
        print(f"  source: {cfg.source.kind} {cfg.source.params.get('base_model', '')}")
        print(f"  validator: {cfg.validator.kind} {cfg.validator.params.get('backend', {}).get('model', '')}")
        if args.dry_run or not deficits:
            return 0
        if not args.tiny:
            check_servers(raw)
        report = builder.run()
        print(report.summary())
        show(bank, [c.name for c in cfg.classes], args.sheet)
    return 0


def show(bank_path: str, classes: list[str], sheet: Path | None) -> None:
    from genval_aug.bank import InstanceBank

    bank = InstanceBank(bank_path, refresh_interval=None)
    counts = bank.categories()
    print(f"bank {bank_path}: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in classes))
    for c in classes:
        for meta in list(bank.iter_meta(c))[:2]:
            v = meta.get("verdict") or {}
            print(f"  {c}: prompt {meta['source'].get('prompt')!r}, seed {meta['source'].get('seed')}, "
                  f"verdict keep={v.get('keep')} score={meta.get('score')} by {v.get('model')}")
    if sheet is not None:
        from genval_aug.viz import contact_sheet

        sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(bank, sheet)
        print(f"contact sheet: {sheet}")


if __name__ == "__main__":
    sys.exit(main())
