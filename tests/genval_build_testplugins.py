"""Plug-ins for tests/test_build*.py, resolved by import path ("genval_build_testplugins:...").

They live in a module (not in a test function) so the spawned top-up worker can import them too.
"""
from __future__ import annotations

import hashlib

import numpy as np


class HashValidator:
    """Deterministic stand-in for the VLM judge: keeps an instance iff a hash of its pixels falls
    under ``keep_rate``; the verdict has the shape of genval_aug.agents.Verdict.to_dict()."""

    name = "hash-validator"

    def __init__(self, keep_rate: float = 0.75):
        self.keep_rate = keep_rate
        self.calls = 0

    def validate(self, rgbas, categories):
        self.calls += 1
        out = []
        for rgba, cat in zip(rgbas, categories, strict=True):
            h = hashlib.sha256(cat.encode() + np.ascontiguousarray(rgba).tobytes()).digest()
            u = int.from_bytes(h[:4], "little") / 2**32
            keep = u < self.keep_rate
            out.append({"keep": keep, "score": round(1.0 - u, 4), "criteria": {"plausible": keep},
                        "reasons": {} if keep else {"plausible": "hash says no"}, "model": self.name,
                        "prompt_version": "test"})
        return out


def make_validator(spec, config, device=None):  # noqa: ARG001
    return HashValidator(**spec.params)


class CountingPrompts:
    """Prompt maker that records how often it was asked (prompts must be cached in the bank)."""

    name = "counting"
    calls = 0

    def prompts(self, cls, n):
        CountingPrompts.calls += 1
        return [f"a photo of a {cls.name}, variant {i}" for i in range(n)]


def make_prompts(spec, config, device=None):  # noqa: ARG001
    return CountingPrompts()


class TinyRandomGenerator:
    """A tiny random conv net as an ``InstanceGenerator``: the prompt and the seed drive the noise,
    the (fixed, seeded) weights turn it into colours; alpha is a seeded soft ellipse.
    Per-unit deterministic: each instance is computed alone, whatever the batch."""

    name = "tiny-random"

    def __init__(self, size: int = 48):
        import torch

        g = torch.Generator().manual_seed(1234)
        self.size = size
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 3, 3, padding=1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = 0

    def generate(self, prompts, seeds, negative_prompt=None):  # noqa: ARG002
        import cv2
        import torch

        from genval_aug.build.sources import _stable_int

        self.calls += 1
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            g = torch.Generator().manual_seed(_stable_int(prompt, seed) & 0x7FFFFFFF)
            x = torch.randn(1, 4, self.size, self.size, generator=g)
            with torch.no_grad():
                rgb = torch.sigmoid(self.net(x))[0].permute(1, 2, 0).numpy()
            rng = np.random.default_rng(seed)
            s = self.size
            mask = np.zeros((4 * s, 4 * s), np.uint8)
            axes = (int(rng.uniform(0.25, 0.4) * 4 * s), int(rng.uniform(0.15, 0.4) * 4 * s))
            cv2.ellipse(mask, (2 * s, 2 * s), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
            alpha = cv2.resize(mask, (s, s), interpolation=cv2.INTER_AREA)
            rgba = np.dstack([(rgb * 255).round().astype(np.uint8), alpha])
            out.append(type("Generated", (), {"rgba": rgba, "prompt": prompt, "seed": seed,
                                               "provenance": {"kind": "tiny-random", "model": "tiny-conv"}})())
        return out


def make_tiny_generator(spec, config, device=None):  # noqa: ARG001
    from genval_aug.build.sources import GeneratorSource

    return GeneratorSource(TinyRandomGenerator(**spec.params), name="tiny-random")


def make_tiny_layerdiffusion(spec, config, device=None):  # noqa: ARG001
    """The real LayerDiffusionGenerator on tiny random SD1.5 components (no downloads)."""
    from genval_aug.build.sources import GeneratorSource
    from genval_aug.generation.pipeline import LayerDiffusionGenerator
    from genval_aug.generation.tiny import tiny_decoder, tiny_pipeline

    gen = LayerDiffusionGenerator(tiny_pipeline("sd15"), tiny_decoder(), arch="sd15", height=64, width=64,
                                  num_inference_steps=2, tta_passes=1, batch_size=spec.batch_size)
    return GeneratorSource(gen, negative_prompt=spec.params.get("negative_prompt"), name="layerdiffusion")


class PickyPrompts(CountingPrompts):
    """Batched prompt maker that has nothing to say about kites."""

    def prompts_many(self, classes, n):
        CountingPrompts.calls += 1
        return {c.name: ([] if c.name == "kite" else self.prompts(c, n)) for c in classes}

    def prompts(self, cls, n):
        if cls.name == "kite":
            raise RuntimeError("no idea what a kite is")
        return [f"a photo of a {cls.name}, variant {i}" for i in range(n)]


def make_picky_prompts(spec, config, device=None):  # noqa: ARG001
    return PickyPrompts()


def make_slow_loading_source(spec, config, device=None):  # noqa: ARG001
    """A source whose 'model load' takes ``load_s`` seconds (an SDXL load); touches ``marker`` when it starts."""
    import time
    from pathlib import Path

    from genval_aug.build.sources import ShapesSource

    Path(spec.params["marker"]).touch()
    time.sleep(float(spec.params.get("load_s", 120)))
    return ShapesSource(size=48)


class DeadServerPrompts:
    """Prompt maker whose LLM server is down: every call fails after the backend's own retries."""

    calls = 0

    def _fail(self):
        from genval_aug.errors import BackendUnavailableError  # what the HTTP backend raises: server down

        DeadServerPrompts.calls += 1
        raise BackendUnavailableError("POST http://127.0.0.1:9/v1/chat/completions (model 'llm') failed after 5 attempts")

    def prompts_many(self, classes, n):  # noqa: ARG002
        self._fail()

    def prompts(self, cls, n):  # noqa: ARG002
        self._fail()


def make_dead_server_prompts(spec, config, device=None):  # noqa: ARG001
    return DeadServerPrompts()
