"""Write the expected tensor layout of LayerDiffuse's transparent VAE decoder / offset encoder as JSON.

The layout is derived by hand from the architecture table in shared/docs/layerdiffuse.md (section 3/4) and
the public diffusers parameter naming of the building blocks (ResnetBlock2D: norm1, conv1, norm2, conv2,
conv_shortcut when channels change; the spatial Attention of Attn*Block2D: group_norm, to_q, to_k, to_v,
to_out.0; Downsample2D / Upsample2D: conv). It deliberately does NOT import genval_aug or diffusers, so the
test that compares the module against this file is a real cross-check.

Run:  python tests/data/make_layerdiffuse_layout.py   (rewrites tests/data/layerdiffuse_*_layout.json)
"""
from __future__ import annotations

import json
from pathlib import Path

# Section 3 of layerdiffuse.md: UNet1024
IN_CH, OUT_CH = 3, 4
BLOCK_OUT = (32, 32, 64, 128, 256, 512, 512)
DOWN_TYPES = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3
UP_TYPES = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4
LAYERS_DOWN, LAYERS_UP = 2, 3
GROUPS = 4
LATENT_CH = 4
LATENT_LEVEL = 3  # latent added before down block 3 (1/8 resolution)


def conv(out_c: int, in_c: int, k: int) -> dict:
    return {"weight": [out_c, in_c, k, k], "bias": [out_c]}


def linear(out_f: int, in_f: int) -> dict:
    return {"weight": [out_f, in_f], "bias": [out_f]}


def norm(c: int) -> dict:
    return {"weight": [c], "bias": [c]}


def add(layout: dict, prefix: str, params: dict) -> None:
    for name, shape in params.items():
        layout[f"{prefix}.{name}"] = shape


def resnet(layout: dict, prefix: str, in_c: int, out_c: int) -> None:
    # no time embedding: no time_emb_proj
    add(layout, f"{prefix}.norm1", norm(in_c))
    add(layout, f"{prefix}.conv1", conv(out_c, in_c, 3))
    add(layout, f"{prefix}.norm2", norm(out_c))
    add(layout, f"{prefix}.conv2", conv(out_c, out_c, 3))
    if in_c != out_c:
        add(layout, f"{prefix}.conv_shortcut", conv(out_c, in_c, 1))


def attention(layout: dict, prefix: str, c: int) -> None:
    add(layout, f"{prefix}.group_norm", norm(c))
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        add(layout, f"{prefix}.{name}", linear(c, c))


def decoder_layout() -> dict:
    lay: dict = {}
    add(lay, "conv_in", conv(BLOCK_OUT[0], IN_CH, 3))
    add(lay, "latent_conv_in", conv(BLOCK_OUT[LATENT_LEVEL - 1], LATENT_CH, 1))
    # down path; skip channels are recorded for the up path
    skips = [BLOCK_OUT[0]]
    out_c = BLOCK_OUT[0]
    for i, kind in enumerate(DOWN_TYPES):
        in_c, out_c = out_c, BLOCK_OUT[i]
        for j in range(LAYERS_DOWN):
            resnet(lay, f"down_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c)
            if kind.startswith("Attn"):
                attention(lay, f"down_blocks.{i}.attentions.{j}", out_c)
            skips.append(out_c)
        if i < len(DOWN_TYPES) - 1:
            add(lay, f"down_blocks.{i}.downsamplers.0.conv", conv(out_c, out_c, 3))
            skips.append(out_c)
    # mid: resnet, attention, resnet at the deepest width
    c = BLOCK_OUT[-1]
    resnet(lay, "mid_block.resnets.0", c, c)
    attention(lay, "mid_block.attentions.0", c)
    resnet(lay, "mid_block.resnets.1", c, c)
    # up path: each resnet consumes the current features concatenated with one skip (popped from the end)
    rev = list(reversed(BLOCK_OUT))
    cur = rev[0]
    for i, kind in enumerate(UP_TYPES):
        out_c = rev[i]
        for j in range(LAYERS_UP):
            skip_c = skips.pop()
            resnet(lay, f"up_blocks.{i}.resnets.{j}", cur + skip_c, out_c)
            if kind.startswith("Attn"):
                attention(lay, f"up_blocks.{i}.attentions.{j}", out_c)
            cur = out_c
        if i < len(UP_TYPES) - 1:
            add(lay, f"up_blocks.{i}.upsamplers.0.conv", conv(out_c, out_c, 3))
    assert not skips, skips
    add(lay, "conv_norm_out", norm(BLOCK_OUT[0]))
    add(lay, "conv_out", conv(OUT_CH, BLOCK_OUT[0], 3))
    return lay


def encoder_layout() -> dict:
    # Section 4: Sequential of 9 convs (3x3) with SiLU between them -> indices 0, 2, ..., 16
    chans = [4, 32, 32, 64, 64, 128, 128, 256, 256, 4]
    lay: dict = {}
    for n in range(9):
        add(lay, f"blocks.{2 * n}", conv(chans[n + 1], chans[n], 3))
    return lay


def main() -> None:
    here = Path(__file__).resolve().parent
    for name, lay in (("decoder", decoder_layout()), ("encoder", encoder_layout())):
        n = 0
        for shape in lay.values():
            p = 1
            for s in shape:
                p *= s
            n += p
        doc = {
            "source": "shared/docs/layerdiffuse.md sections 3-4 + diffusers block parameter names",
            "num_tensors": len(lay),
            "num_parameters": n,
            "fp16_bytes": 2 * n,
            "tensors": lay,
        }
        (here / f"layerdiffuse_{name}_layout.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(name, len(lay), "tensors", n, "parameters", f"{2 * n / 1e6:.1f} MB fp16")


if __name__ == "__main__":
    main()
