"""RGBA -> SD latent with LayerDiffuse's latent-transparency offset (for img2img / inpainting of transparent
images; plain foreground generation does not need it). See shared/docs/layerdiffuse.md section 4."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from .models.transparent_vae import LatentTransparencyOffsetEncoder


def pad_rgb(rgba: np.ndarray, shrink: float = 1.2) -> np.ndarray:
    """Colour of an RGBA uint8 image with transparent areas filled from an alpha-weighted image pyramid.

    Returns float32 HxWx3 in [0, 1]: opaque pixels keep their colour, transparent ones take the colour of the
    nearby foreground (premultiplied colour and alpha are shrunk by ``shrink`` per level down to one pixel, then
    composited back up level by level).
    """
    x = np.asarray(rgba, dtype=np.float32) / 255.0
    alpha = x[..., 3:]
    levels = [(x[..., :3] * alpha, alpha)]
    while min(levels[-1][1].shape[:2]) > 1:
        h, w = levels[-1][1].shape[:2]
        size = (max(int(w / shrink), 1), max(int(h / shrink), 1))
        c = cv2.resize(levels[-1][0], size, interpolation=cv2.INTER_AREA)
        a = cv2.resize(levels[-1][1], size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], 1)
        levels.append((c, a))
    top_c, top_a = levels[-1]
    fg = top_c.sum(axis=(0, 1), keepdims=True) / max(float(top_a.sum()), 1e-8)
    for c, a in reversed(levels):
        fg = cv2.resize(fg, (c.shape[1], c.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(c.shape)
        fg = c + fg * (1.0 - a)
    return fg


@torch.no_grad()
def encode_transparent(
    vae,
    encoder: LatentTransparencyOffsetEncoder,
    rgbas: Sequence[np.ndarray],
    *,
    offset_scale: float = 300.0,
) -> torch.Tensor:
    """VAE-space latents (not multiplied by the scaling factor) of RGBA uint8 images of one size:
    ``mean + std * offset_scale * encoder(alpha, pad_rgb)`` of the SD-VAE posterior of ``(rgb * 2 - 1) * alpha``."""
    batch = np.stack([np.asarray(r) for r in rgbas]).astype(np.float32) / 255.0
    rgb, a = batch[..., :3], batch[..., 3:]
    feed = torch.from_numpy((rgb * 2.0 - 1.0) * a).permute(0, 3, 1, 2)
    dist = vae.encode(feed.to(vae.device, vae.dtype)).latent_dist
    padded = np.stack([pad_rgb(r) for r in rgbas])
    off_in = torch.from_numpy(np.concatenate([a, padded], axis=-1)).permute(0, 3, 1, 2)
    offset = encoder(off_in.to(dist.mean.device)) * offset_scale
    return dist.mean + dist.std * offset.to(dist.std)
