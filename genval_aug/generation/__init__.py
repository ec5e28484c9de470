"""Instance generators (Layer Diffusion). Importing this package is light; diffusers loads on first use.

Models (transparent VAE decoder, offset encoder) live in ``genval_aug.generation.models``, the UNet weight
loaders in ``genval_aug.generation.loaders`` and the generator pipeline in ``genval_aug.generation.pipeline``.
"""
from __future__ import annotations

from .output import add_to_bank
from .postprocess import alpha_box, crop_to_alpha, to_rgba_uint8
from .types import GeneratedInstance, InstanceGenerator

_LAZY = {
    "LayerDiffusionGenerator": "genval_aug.generation.pipeline",
    "TransparentVAEDecoder": "genval_aug.generation.models.transparent_vae",
    "LatentTransparencyOffsetEncoder": "genval_aug.generation.models.transparent_vae",
    "load_transparent_decoder": "genval_aug.generation.models.transparent_vae",
    "load_offset_encoder": "genval_aug.generation.models.transparent_vae",
    "WeightsError": "genval_aug.generation.models.transparent_vae",
    "apply_layerdiffuse_weights": "genval_aug.generation.loaders",
    "WeightsNotFoundError": "genval_aug.generation.hub",
    "encode_transparent": "genval_aug.generation.transparent_encode",
    "pad_rgb": "genval_aug.generation.transparent_encode",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genval_aug.generation' has no attribute {name!r}")


__all__ = ["GeneratedInstance", "InstanceGenerator", "add_to_bank", "alpha_box", "crop_to_alpha",
           "to_rgba_uint8", *_LAZY]
