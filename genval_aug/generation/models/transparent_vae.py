"""LayerDiffuse transparent VAE decoder (latent + RGB -> RGBA) and latent-transparency offset encoder.

Written from the architecture in shared/docs/layerdiffuse.md (sections 3-4; paper arXiv 2402.17113) so that the
published ``vae_transparent_decoder.safetensors`` / ``vae_transparent_encoder.safetensors`` (and their SD1.5 and
``lllyasviel/LayerDiffuse_Diffusers`` counterparts) load strictly, key for key and shape for shape.

The decoder is a 7-level image-to-image UNet built from diffusers blocks without time embedding. Its input is the
standard SD-VAE decoding in [0, 1] at full resolution; the diffusion latent enters through a zero-initialised 1x1
conv added before the down block that works at the latent's resolution. Output channel 0 is alpha, 1-3 the
foreground RGB, all clipped to [0, 1].
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

from ...errors import ConfigError, GenValAugError

logger = logging.getLogger(__name__)

# (flip horizontally, quarter turns) of the published 8-pass test-time augmentation
TTA_TRANSFORMS: tuple[tuple[bool, int], ...] = tuple((f, k) for f in (False, True) for k in range(4))


class WeightsError(GenValAugError, ValueError):
    """A weight file does not match the module it is loaded into (names the file and the keys at fault)."""


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TransparentVAEDecoder(ModelMixin, ConfigMixin):
    """LayerDiffuse ``UNet1024``: (RGB in [0,1], latent) -> (alpha, RGB) in [0,1].

    Defaults are the published architecture (~104 M parameters). ``latent_scale_factor`` (a power of two) says at
    which level the latent is injected: 8 for the SD/SDXL VAEs (before down block 3, as published); tiny test
    VAEs may use another factor. Image sides must be multiples of ``2 ** (len(block_out_channels) - 1)`` (64).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        latent_channels: int = 4,
        down_block_types: Sequence[str] = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
        up_block_types: Sequence[str] = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4,
        block_out_channels: Sequence[int] = (32, 32, 64, 128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        attention_head_dim: int = 8,
        latent_scale_factor: int = 8,
    ):
        super().__init__()
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ConfigError(
                f"TransparentVAEDecoder: down_block_types ({len(down_block_types)}), up_block_types "
                f"({len(up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        level = int(round(math.log2(latent_scale_factor))) if latent_scale_factor > 0 else -1
        if 2**level != latent_scale_factor or not 1 <= level < n:
            raise ConfigError(
                f"TransparentVAEDecoder: latent_scale_factor={latent_scale_factor} must be a power of two "
                f"between 2 and 2**{n - 1}"
            )
        self.latent_level = level
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        # zero init: the decoder starts as a pure image-to-image net and learns how much latent to use
        self.latent_conv_in = _zero_(nn.Conv2d(latent_channels, block_out_channels[level - 1], kernel_size=1))

        self.down_blocks = nn.ModuleList()
        out_c = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_c, out_c = out_c, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    kind,
                    num_layers=layers_per_block,
                    in_channels=in_c,
                    out_channels=out_c,
                    temb_channels=None,
                    add_downsample=i < n - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                    resnet_time_scale_shift="default",
                    downsample_type="conv",
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            temb_channels=None,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            output_scale_factor=1.0,
            resnet_time_scale_shift="default",
            attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups,
            attn_groups=None,
            add_attention=True,
        )
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_c = rev[0]
        for i, kind in enumerate(up_block_types):
            prev_c, out_c = out_c, rev[i]
            self.up_blocks.append(
                get_up_block(
                    kind,
                    num_layers=layers_per_block + 1,
                    in_channels=rev[min(i + 1, n - 1)],
                    out_channels=out_c,
                    prev_output_channel=prev_c,
                    temb_channels=None,
                    add_upsample=i < n - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    resnet_time_scale_shift="default",
                    upsample_type="conv",
                )
            )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for the published decoder)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """pixel (B,3,H,W) in [0,1], latent (B,C,H/f,W/f) -> raw (B,4,H,W); channel 0 alpha (not clipped)."""
        h, w = pixel.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ConfigError(f"TransparentVAEDecoder: image size {h}x{w} is not a multiple of {m}")
        f = self.config.latent_scale_factor
        if latent.shape[-2:] != (h // f, w // f):
            raise ConfigError(
                f"TransparentVAEDecoder: latent size {tuple(latent.shape[-2:])} does not match image "
                f"{h}x{w} / {f}"
            )
        dtype = self.conv_in.weight.dtype
        pixel = pixel.to(dtype)
        sample = self.conv_in(pixel)
        sample_latent = self.latent_conv_in(latent.to(dtype))
        skips: tuple[torch.Tensor, ...] = (sample,)
        for i, block in enumerate(self.down_blocks):
            if i == self.latent_level:
                sample = sample + sample_latent
            sample, res = block(hidden_states=sample, temb=None)
            skips += res
        sample = self.mid_block(sample, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            sample = block(sample, res, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))

    @torch.no_grad()
    def decode(self, pixel: torch.Tensor, latent: torch.Tensor, tta_passes: int = 8) -> torch.Tensor:
        """(alpha, RGB) in [0, 1], shape (B,4,H,W).

        ``tta_passes=8``: the published test-time augmentation (4 rotations x optional horizontal flip, each
        undone, per-pixel median). ``tta_passes=1``: a single forward pass.
        """
        if tta_passes == 1:
            return self(pixel, latent).clamp(0, 1)
        if tta_passes != 8:
            raise ConfigError(f"tta_passes must be 1 or 8, got {tta_passes}")
        outs = []
        for flip, k in TTA_TRANSFORMS:
            p, z = pixel, latent
            if flip:
                p, z = p.flip(3), z.flip(3)
            y = self(p.rot90(k, dims=(2, 3)), z.rot90(k, dims=(2, 3))).clamp(0, 1)
            y = y.rot90(-k, dims=(2, 3))
            outs.append(y.flip(3) if flip else y)
        return torch.stack(outs).median(dim=0).values


class LatentTransparencyOffsetEncoder(ModelMixin, ConfigMixin):
    """LayerDiffuse offset encoder: (alpha, padded RGB) in [0,1] at full size -> latent offset (B,4,H/8,W/8).

    Eight 3x3 convs (4->32->32->64->64->128->128->256->256, three with stride 2) with SiLU, then a zero-initialised
    3x3 conv to 4 channels. Multiply the output by ``offset_scale`` (300 as published) and use it as the
    deterministic perturbation ``mean + std * offset`` of the SD-VAE posterior. Needed only for img2img /
    inpainting of transparent images.
    """

    @register_to_config
    def __init__(self, channels: Sequence[int] = (32, 32, 64, 64, 128, 128, 256, 256), latent_channels: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        in_c = 4
        for i, c in enumerate(channels):
            stride = 2 if i in (2, 4, 6) else 1
            layers += [nn.Conv2d(in_c, c, kernel_size=3, padding=1, stride=stride), nn.SiLU()]
            in_c = c
        layers.append(_zero_(nn.Conv2d(in_c, latent_channels, kernel_size=3, padding=1)))
        self.blocks = nn.Sequential(*layers)

    def forward(self, alpha_rgb: torch.Tensor) -> torch.Tensor:
        return self.blocks(alpha_rgb.to(self.blocks[0].weight.dtype))


def check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightsError` naming ``source`` and the offending keys unless the match is exact."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches: {head(wrong)}")
        raise WeightsError(
            f"{source}: does not match {type(module).__name__} "
            f"({len(expected)} tensors expected, {len(state_dict)} in file): " + "; ".join(parts)
        )


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file on CPU; anything else is refused (no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors weight files are accepted (no pickle formats)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type on a corrupt header
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def _load_strict(module: nn.Module, path: str | Path) -> nn.Module:
    sd = load_safetensors(path)
    check_state_dict(module, sd, str(path))
    module.load_state_dict(sd, strict=True)
    return module.eval()


def load_transparent_decoder(
    path: str | Path,
    *,
    config: dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransparentVAEDecoder:
    """Build a :class:`TransparentVAEDecoder` (published architecture unless ``config``) and load ``path`` strictly."""
    with torch.device("meta"):
        model = TransparentVAEDecoder(**(config or {}))
    model = model.to_empty(device="cpu")
    _load_strict(model, path)
    return _to(model, device, dtype)


def load_offset_encoder(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LatentTransparencyOffsetEncoder:
    """Build a :class:`LatentTransparencyOffsetEncoder` and load ``path`` strictly."""
    model = LatentTransparencyOffsetEncoder()
    _load_strict(model, path)
    return _to(model, device, dtype)


def _to(model: ModelMixin, device: str | torch.device, dtype: torch.dtype) -> ModelMixin:
    model = model.to(device)
    return model.to(dtype=dtype) if model.dtype != dtype else model
