"""Generation throughput: instances/s of LayerDiffusionGenerator at a batch size, against batch size 1
measured in the same run.

    python benchmarks/generate.py --tiny --arch sdxl --batch-size 4 --n 8            # CPU, tiny random models
    python benchmarks/generate.py --base-model <sdxl dir> --local-files-only --batch-size 4 --n 16   # GPU, real

Goal (issue 6): >= 1 validated instance/s on one H100 with real SDXL weights (validation not included here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv):
    p = argparse.ArgumentParser(description="LayerDiffusionGenerator instances/s")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--arch", choices=["sdxl", "sd15"], default="sdxl")
    p.add_argument("--base-model", default="stabilityai/stable-diffusion-xl-base-1.0")
    p.add_argument("--layerdiffuse-repo", default="LayerDiffusion/layerdiffusion-v1")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="instances per measurement")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--tta-passes", type=int, choices=[1, 8], default=8)
    p.add_argument("--warmup", type=int, default=1, help="warm-up batches before timing")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny runs)")
    return p.parse_args(argv)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(gen, n, warmup):
    prompts = ["a red apple"] * n
    for _ in range(warmup):
        gen.generate(prompts[: gen.batch_size], list(range(gen.batch_size)))
    _sync()
    t = time.perf_counter()
    gen.generate(prompts, list(range(n)))
    _sync()
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from genval_aug.generation.pipeline import LayerDiffusionGenerator

    settings = dict(num_inference_steps=args.steps, tta_passes=args.tta_passes, batch_size=args.batch_size)
    if args.tiny:
        from genval_aug.generation.tiny import tiny_decoder, tiny_pipeline

        size = args.size or 64
        gen = LayerDiffusionGenerator(tiny_pipeline(args.arch), tiny_decoder(), arch=args.arch, device="cpu",
                                      height=size, width=size, **settings)
    else:
        gen = LayerDiffusionGenerator.from_pretrained(
            args.base_model, layerdiffuse_repo=args.layerdiffuse_repo, arch=args.arch,
            local_files_only=args.local_files_only, height=args.size, width=args.size, **settings)
    dev = torch.cuda.get_device_name() if gen.device.type == "cuda" else f"CPU ({args.threads} threads)"
    print(f"device: {dev}, dtype {gen.dtype}, {gen.width}x{gen.height}, {args.steps} steps, "
          f"TTA {args.tta_passes}, pipeline {'tiny-random-' + args.arch if args.tiny else args.base_model}")
    gen.batch_size = 1
    base = _rate(gen, args.n, args.warmup)
    gen.batch_size = args.batch_size
    rate = _rate(gen, args.n, args.warmup)
    print(f"batch 1 (baseline): {base:.3f} instances/s")
    print(f"batch {args.batch_size}: {rate:.3f} instances/s  (x{rate / base:.2f} vs batch 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
