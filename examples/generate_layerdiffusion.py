"""Generate transparent single-object instances with SDXL (or SD1.5) + LayerDiffuse and bank them.

Real use needs a CUDA GPU and the weights on disk (download them ahead of time on offline machines), e.g.:

    huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0          # or Juggernaut-XL-v6 (the paper's base)
    huggingface-cli download LayerDiffusion/layerdiffusion-v1 \
        layer_xl_transparent_attn.safetensors vae_transparent_decoder.safetensors
    HF_HUB_OFFLINE=1 python examples/generate_layerdiffusion.py \
        --base-model stabilityai/stable-diffusion-xl-base-1.0 --local-files-only \
        --category dog --prompt "a photo of a dog, full body, high quality" --n 8 \
        --bank cache/dog.lmdb --png-dir cache/dog_png

SD1.5: ``--arch sd15 --base-model <SD1.5 diffusers dir>`` (512x512 by default). LayerDiffuse weights are
licensed creativeml-openrail-m. ``--tiny`` runs random tiny models built in code on the CPU in seconds (the
output is noise; this is the smoke test of the whole path, bank included).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="stabilityai/stable-diffusion-xl-base-1.0",
                   help="hub id, local diffusers directory or single .safetensors checkpoint")
    p.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    p.add_argument("--layerdiffuse-repo", default="LayerDiffusion/layerdiffusion-v1",
                   help="hub repo id or local directory holding the LayerDiffuse files")
    p.add_argument("--vae", default=None, help="optional VAE (e.g. madebyollin/sdxl-vae-fp16-fix for fp16 SDXL)")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--n", type=int, default=1, help="instances per prompt")
    p.add_argument("--seed", type=int, default=0, help="first seed; instance i gets seed + i")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None, help="multiples of 64")
    p.add_argument("--tta-passes", type=int, choices=[1, 8], default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 (CUDA) or float32; default by device")
    p.add_argument("--device", default=None)
    p.add_argument("--category", required=True)
    p.add_argument("--bank", type=Path, help="LMDB bank to add the instances to")
    p.add_argument("--png-dir", type=Path, help="also write each instance as an RGBA PNG here")
    p.add_argument("--tiny", action="store_true", help="random tiny models on CPU (smoke test, output is noise)")
    return p.parse_args(argv)


def build_generator(args: argparse.Namespace):
    from genval_aug.generation.pipeline import LayerDiffusionGenerator

    w, h = args.size or (None, None)
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, tta_passes=args.tta_passes,
                    batch_size=args.batch_size, width=w, height=h)
    if args.tiny:
        from genval_aug.generation.tiny import tiny_decoder, tiny_pipeline

        settings.update(width=w or 64, height=h or 64)
        return LayerDiffusionGenerator(tiny_pipeline(args.arch), tiny_decoder(), arch=args.arch,
                                       base_model=f"tiny-random-{args.arch}", device="cpu", **settings)
    return LayerDiffusionGenerator.from_pretrained(
        args.base_model, layerdiffuse_repo=args.layerdiffuse_repo, arch=args.arch, device=args.device,
        dtype=args.dtype, local_files_only=args.local_files_only, vae=args.vae, **settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        print("give at least one --prompt or --prompts-file", file=sys.stderr)
        return 2
    all_prompts = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    gen = build_generator(args)
    t0 = time.perf_counter()
    instances = gen.generate(all_prompts, seeds, negative_prompt=args.negative or None)
    dt = time.perf_counter() - t0
    print(f"{len(instances)} instances in {dt:.2f} s ({len(instances) / dt:.3f} instances/s) "
          f"on {gen.device} {gen.dtype}")
    if args.png_dir:
        import cv2

        args.png_dir.mkdir(parents=True, exist_ok=True)
        for inst in instances:
            cv2.imwrite(str(args.png_dir / f"{args.category}_{inst.seed}.png"),
                        cv2.cvtColor(inst.rgba, cv2.COLOR_RGBA2BGRA))
    if args.bank:
        from genval_aug.generation import add_to_bank

        ids = add_to_bank(args.bank, instances, args.category)
        print(f"banked {sum(i is not None for i in ids)} of {len(ids)} instances in {args.bank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
