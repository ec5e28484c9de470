"""Tiny random components (no downloads) for tests, smoke runs and CPU benchmarks.

Recipes from shared/docs/tiny-models.md: byte-level CLIP tokenizer (514 tokens, empty merges), 2-layer CLIP text
encoders, a 2-level UNet, a 4-level VAE (latent = image / 8, like the real SD VAEs) and a 7-level transparent
decoder with narrow channels (so image sides stay multiples of 64, as for the real one).
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported where used: the tokenizers here must not need diffusers (the agents tests use them)
    from .models.transparent_vae import TransparentVAEDecoder


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_tokenizer(cls: Any, vocab: dict[str, int], **kwargs: Any) -> Any:
    """``cls`` (a byte-level BPE tokenizer class, e.g. ``CLIPTokenizer``) with ``vocab`` and no merges, in any
    transformers version: 4.x's slow tokenizers read vocabulary and merges from files only, 5.x takes the objects
    (and would swallow ``vocab_file=`` silently)."""
    if "vocab_file" not in inspect.signature(cls.__init__).parameters:
        return cls(vocab=vocab, merges=[], **kwargs)
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return cls(vocab_file, merges_file, **kwargs)


def tiny_clip_tokenizer(max_length: int = 16):
    """Byte-level CLIPTokenizer: every byte one token (+ ``</w>`` forms), start/end tokens added (514 tokens)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    tok = bpe_tokenizer(CLIPTokenizer, vocab, model_max_length=max_length, pad_token="!")
    if len(tok) != 514:
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected 514")
    return tok


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=514, max_position_embeddings=16, projection_dim=32, bos_token_id=0,
                          pad_token_id=1, eos_token_id=2, hidden_act="gelu", layer_norm_eps=1e-5)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8, 16, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         latent_channels=4, norm_num_groups=4, layers_per_block=1)


def tiny_pipeline(arch: str = "sdxl", seed: int = 0) -> Any:
    """A random tiny ``StableDiffusionXLPipeline`` (arch="sdxl") or ``StableDiffusionPipeline`` ("sd15")."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    common = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    if arch == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **common)
        sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
                                       tokenizer=tiny_clip_tokenizer(), unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if arch != "sdxl":
        raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")
    unet = UNet2DConditionModel(attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, **common)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config()),
                                     tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
                                     unet=unet, scheduler=sched)


TINY_DECODER_CONFIG = dict(block_out_channels=(4, 4, 8, 8, 8, 8, 8), layers_per_block=1, attention_head_dim=4)


def tiny_decoder(seed: int = 0, alpha_bias: float = 0.5) -> TransparentVAEDecoder:
    """Random narrow decoder of the published depth; ``alpha_bias`` lifts the alpha output so that random
    weights give a non-empty foreground."""
    from .models.transparent_vae import TransparentVAEDecoder

    torch.manual_seed(seed)
    dec = TransparentVAEDecoder(**TINY_DECODER_CONFIG)
    with torch.no_grad():
        dec.latent_conv_in.weight.normal_(0, 0.1)  # zero-init in the real model; make the latent matter here
        dec.conv_out.bias[0] = alpha_bias
    return dec.eval()
