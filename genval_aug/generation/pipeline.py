"""LayerDiffusionGenerator: prompts -> transparent RGBA instances with SDXL (or SD1.5) + LayerDiffuse.

Flow per batch: the diffusers text-to-image pipeline (LayerDiffuse weights merged into its UNet) produces latents
(``output_type="latent"``); the SD-VAE decodes them to RGB in [0, 1]; the transparent decoder turns (RGB, latent)
into (alpha, RGB) with 1 or 8 test-time-augmentation passes; the result is cropped to its alpha box and returned
as :class:`GeneratedInstance` objects carrying full provenance.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError
from ..quality import ALPHA_THRESHOLD
from .hub import WeightsNotFoundError, resolve_weight_file
from .loaders import apply_layerdiffuse_weights
from .models.transparent_vae import (
    TransparentVAEDecoder,
    WeightsError,
    check_state_dict,
    load_safetensors,
)
from .postprocess import crop_to_alpha, to_rgba_uint8
from .types import GeneratedInstance

logger = logging.getLogger(__name__)

ARCHS = ("sdxl", "sd15")
DEFAULT_REPO = "LayerDiffusion/layerdiffusion-v1"
# repo -> arch -> (UNet weights, transparent decoder); see shared/docs/layerdiffuse.md section 2
KNOWN_WEIGHTS: dict[str, dict[str, tuple[str, str]]] = {
    "LayerDiffusion/layerdiffusion-v1": {
        "sdxl": ("layer_xl_transparent_attn.safetensors", "vae_transparent_decoder.safetensors"),
        "sd15": ("layer_sd15_transparent_attn.safetensors", "layer_sd15_vae_transparent_decoder.safetensors"),
    },
    "lllyasviel/LayerDiffuse_Diffusers": {
        "sdxl": ("ld_diffusers_sdxl_attn.safetensors", "ld_diffusers_sdxl_vae_transparent_decoder.safetensors"),
    },
}
# reference settings (layerdiffuse.md section 6)
ARCH_DEFAULTS = {
    "sdxl": {"size": 1024, "guidance_scale": 7.0, "scheduler": "dpmpp_2m_sde_karras"},
    "sd15": {"size": 512, "guidance_scale": 7.0, "scheduler": "dpmpp_2m_karras"},
}


def default_weight_names(repo_or_dir: str | Path, arch: str) -> tuple[str, str]:
    """(UNet weights, decoder) file names for a known hub repo, or the first known pair present in a directory."""
    key = str(repo_or_dir)
    if key in KNOWN_WEIGHTS:
        if arch not in KNOWN_WEIGHTS[key]:
            raise ConfigError(f"{key} has no LayerDiffuse weights for arch={arch!r}")
        return KNOWN_WEIGHTS[key][arch]
    d = Path(key).expanduser()
    candidates = [names[arch] for names in KNOWN_WEIGHTS.values() if arch in names]
    if d.is_dir():
        for pair in candidates:
            if all((d / n).is_file() for n in pair):
                return pair
    return candidates[0]


def make_scheduler(name: str, config: dict) -> Any:
    """Scheduler by short name: ``dpmpp_2m_sde_karras`` | ``dpmpp_2m_karras`` | ``euler`` | ``ddim``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "dpmpp_2m_sde_karras":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        )
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise ConfigError(f"unknown scheduler {name!r}; choose dpmpp_2m_sde_karras, dpmpp_2m_karras, euler or ddim")


def _scheduler_info(scheduler: Any) -> dict[str, Any]:
    cfg = dict(scheduler.config)
    keep = ("algorithm_type", "use_karras_sigmas", "timestep_spacing", "prediction_type", "beta_schedule")
    return {"class": type(scheduler).__name__, **{k: cfg[k] for k in keep if k in cfg}}


def resolve_device_dtype(device: str | torch.device | None, dtype: torch.dtype | str | None):
    """CUDA when available; float16 on CUDA (bfloat16 allowed), float32 on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        try:
            dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[dtype]
        except KeyError as e:
            raise ConfigError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32") from e
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu" and dtype != torch.float32:
        logger.warning("dtype %s requested on CPU: using float32 (half precision is for CUDA)", dtype)
        dtype = torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"unsupported dtype {dtype}")
    return dev, dtype


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Recent diffusers name the argument ``dtype`` (``torch_dtype`` is deprecated); older ones ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:  # pragma: no cover
        pass
    return {"torch_dtype": dtype}


def load_base_pipeline(
    base_model: str | Path,
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    **kwargs: Any,
):
    """A diffusers SDXL / SD1.5 text-to-image pipeline from a hub id, a local diffusers directory or a single
    ``.safetensors`` checkpoint (single files need the model config cached locally or ``config=<dir>``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra: dict[str, Any] = dict(kwargs)
    if arch == "sd15":
        extra.setdefault("safety_checker", None)
        extra.setdefault("requires_safety_checker", False)
    p = Path(str(base_model)).expanduser()
    try:
        if p.is_file():
            if p.suffix != ".safetensors":
                raise WeightsError(f"{p}: only .safetensors checkpoints are accepted (no pickle formats)")
            return cls.from_single_file(str(p), local_files_only=local_files_only, **_dtype_kwarg(dtype), **extra)
        if p.is_dir():
            if not (p / "model_index.json").is_file():
                raise WeightsNotFoundError(f"{p / 'model_index.json'}: not a diffusers pipeline directory")
            return cls.from_pretrained(str(p), use_safetensors=True, local_files_only=True, **_dtype_kwarg(dtype),
                                       **extra)
        return cls.from_pretrained(
            str(base_model), use_safetensors=True, local_files_only=local_files_only, **_dtype_kwarg(dtype),
            revision=revision, cache_dir=str(cache_dir) if cache_dir else None, **extra,
        )
    except (WeightsError, WeightsNotFoundError):
        raise
    except OSError as e:
        raise WeightsNotFoundError(
            f"base model {base_model}: could not be loaded ({e}). Download it ahead of time or pass a local "
            "diffusers directory (safetensors weights)."
        ) from e


class LayerDiffusionGenerator:
    """Transparent single-object instances from prompts (an :class:`InstanceGenerator`).

    Build with :meth:`from_pretrained` (real weights) or directly from a diffusers ``StableDiffusionXLPipeline``
    / ``StableDiffusionPipeline`` whose UNet already carries the LayerDiffuse weights and a
    :class:`TransparentVAEDecoder`.
    """

    name = "layerdiffusion"

    def __init__(
        self,
        pipe: Any,
        decoder: TransparentVAEDecoder,
        *,
        arch: str = "sdxl",
        base_model: str = "<in memory>",
        layerdiffuse: dict[str, Any] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        tta_passes: int = 8,
        batch_size: int = 4,
        mask_threshold: int = ALPHA_THRESHOLD,
        crop_threshold: int = 8,
        crop_pad: int = 2,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        progress: bool = False,
    ):
        if arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {arch!r}")
        if tta_passes not in (1, 8):
            raise ConfigError(f"tta_passes must be 1 or 8, got {tta_passes}")
        if batch_size < 1 or num_inference_steps < 1:
            raise ConfigError("batch_size and num_inference_steps must be >= 1")
        if not 0 < mask_threshold <= 255 or not 0 < crop_threshold <= 255:
            raise ConfigError("mask_threshold and crop_threshold must be in 1..255")
        self.arch = arch
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        defaults = ARCH_DEFAULTS[arch]
        self.height = int(height or defaults["size"])
        self.width = int(width or defaults["size"])
        m = decoder.size_multiple
        if self.height % m or self.width % m:
            raise ConfigError(f"height and width must be multiples of {m}, got {self.height}x{self.width}")
        if decoder.config.latent_scale_factor != pipe.vae_scale_factor:
            raise ConfigError(
                f"decoder latent_scale_factor {decoder.config.latent_scale_factor} != VAE scale factor "
                f"{pipe.vae_scale_factor}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else defaults["guidance_scale"])
        self.tta_passes = tta_passes
        self.batch_size = int(batch_size)
        self.mask_threshold = int(mask_threshold)
        self.crop_threshold = int(crop_threshold)
        self.crop_pad = int(crop_pad)
        self.base_model = str(base_model)
        self.layerdiffuse = dict(layerdiffuse or {})
        self.pipe = pipe.to(self.device)
        if pipe.unet.dtype != self.dtype:  # avoid diffusers' cast warning when nothing changes
            self.pipe.to(dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=not progress)
        vae = self.pipe.vae
        # SDXL's VAE overflows in float16 unless it is the fp16-fix VAE (config force_upcast=False)
        self.vae_dtype = (
            torch.float32 if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else vae.dtype
        )
        if self.vae_dtype != vae.dtype:
            vae.to(self.vae_dtype)
            logger.info("VAE upcast to float32 for decoding (config force_upcast=True)")
        self.decoder = decoder.to(self.device).eval()
        if decoder.dtype != self.dtype:
            self.decoder.to(dtype=self.dtype)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | Path,
        *,
        layerdiffuse_repo: str | Path = DEFAULT_REPO,
        arch: str = "sdxl",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool = False,
        unet_weights: str | None = None,
        decoder_weights: str | None = None,
        decoder_config: dict | None = None,
        strength: float = 1.0,
        scheduler: str | Any | None = "default",
        vae: Any = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        **settings: Any,
    ) -> LayerDiffusionGenerator:
        """Load a base pipeline, merge the LayerDiffuse UNet weights, load the transparent decoder strictly.

        ``base_model``: hub id, local diffusers directory or single ``.safetensors`` file (the paper used
        Juggernaut-XL-v6). ``layerdiffuse_repo``: hub repo id or local directory with the LayerDiffuse files;
        ``unet_weights`` / ``decoder_weights`` override the file names (or give paths). ``scheduler``:
        ``"default"`` (arch reference: DPM++ 2M SDE Karras for SDXL, DPM++ 2M Karras for SD1.5), a short name of
        :func:`make_scheduler`, a scheduler instance, or None to keep the pipeline's. ``vae``: an
        ``AutoencoderKL`` (or its hub id / directory) to use instead of the base model's (e.g.
        ``madebyollin/sdxl-vae-fp16-fix`` for fp16 without upcasting).
        Other keyword arguments go to the constructor (height, width, num_inference_steps, tta_passes, ...).
        LayerDiffuse files are resolved first, so a missing file fails before the base model loads.
        """
        if arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {arch!r}")
        dev, dt = resolve_device_dtype(device, dtype)
        unet_name, dec_name = default_weight_names(layerdiffuse_repo, arch)
        hub = {"local_files_only": local_files_only, "revision": None, "cache_dir": cache_dir}
        unet_path = resolve_weight_file(layerdiffuse_repo, unet_weights or unet_name, **hub)
        dec_path = resolve_weight_file(layerdiffuse_repo, decoder_weights or dec_name, **hub)

        dec_sd = load_safetensors(dec_path)
        with torch.device("meta"):
            decoder = TransparentVAEDecoder(**(decoder_config or {}))
        check_state_dict(decoder, dec_sd, str(dec_path))
        decoder = decoder.to_empty(device="cpu")
        decoder.load_state_dict(dec_sd, strict=True)
        del dec_sd

        if isinstance(vae, (str, Path)):
            from diffusers import AutoencoderKL

            try:
                vae = AutoencoderKL.from_pretrained(str(vae), local_files_only=local_files_only, use_safetensors=True,
                                                    **_dtype_kwarg(dt))
            except OSError as e:
                raise WeightsNotFoundError(f"VAE {vae}: could not be loaded ({e})") from e
        extra = {"vae": vae} if vae is not None else {}
        pipe = load_base_pipeline(
            base_model, arch, dtype=dt, local_files_only=local_files_only, revision=revision,
            cache_dir=cache_dir, **extra,
        )
        report = apply_layerdiffuse_weights(pipe.unet, load_safetensors(unet_path), strength=strength,
                                            source=str(unet_path))
        if scheduler == "default":
            scheduler = ARCH_DEFAULTS[arch]["scheduler"]
        if isinstance(scheduler, str):
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        elif scheduler is not None:
            pipe.scheduler = scheduler
        info = {
            "repo": str(layerdiffuse_repo),
            "unet_weights": Path(unet_path).name,
            "unet_format": report.format,
            "strength": float(strength),
            "decoder_weights": Path(dec_path).name,
        }
        return cls(pipe, decoder, arch=arch, base_model=str(base_model), layerdiffuse=info, device=dev, dtype=dt,
                   **settings)

    # ------------------------------------------------------------------ generation
    def _latents(self, prompts: list[str], seeds: list[int], negative_prompt: str | None) -> torch.Tensor:
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=prompts,
            negative_prompt=[negative_prompt or ""] * len(prompts),
            height=self.height,
            width=self.width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=gens,
            output_type="latent",
        )
        return out.images

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Diffusion latents (B,4,h,w) -> RGBA uint8 (B,H,W,4) at full size (soft alpha, not cropped)."""
        vae = self.pipe.vae
        z = latents.to(self.device, self.vae_dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std_t / vae.config.scaling_factor + mean_t
        else:
            z = z / vae.config.scaling_factor
        pixel = (vae.decode(z).sample * 0.5 + 0.5).clamp(0, 1)
        y = self.decoder.decode(pixel.to(self.dtype), z.to(self.dtype), tta_passes=self.tta_passes)
        return to_rgba_uint8(y.float().cpu().numpy())

    def provenance(self, prompt: str, seed: int, negative_prompt: str | None) -> dict[str, Any]:
        return {
            "kind": "layerdiffusion",
            "generator": f"genval_aug {__version__} LayerDiffusionGenerator",
            "arch": self.arch,
            "base_model": self.base_model,
            "layerdiffuse": dict(self.layerdiffuse),
            "prompt": prompt,
            "negative_prompt": negative_prompt or "",
            "seed": int(seed),
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "scheduler": _scheduler_info(self.pipe.scheduler),
            "width": self.width,
            "height": self.height,
            "tta_passes": self.tta_passes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            "mask_threshold": self.mask_threshold,
        }

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], negative_prompt: str | None = None
    ) -> list[GeneratedInstance]:
        """One instance per (prompt, seed), in order, generated ``batch_size`` at a time."""
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds):
            raise ConfigError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        results: list[GeneratedInstance] = []
        for start in range(0, len(prompts), self.batch_size):
            p, s = prompts[start : start + self.batch_size], seeds[start : start + self.batch_size]
            with torch.inference_mode():
                rgbas = self.decode_latents(self._latents(p, s, negative_prompt))
            for prompt, seed, rgba in zip(p, s, rgbas, strict=True):
                crop, box = crop_to_alpha(rgba, self.crop_threshold, self.crop_pad)
                prov = self.provenance(prompt, seed, negative_prompt)
                prov["crop_box"] = list(box) if box is not None else None
                results.append(GeneratedInstance(crop, prompt, seed, prov, self.mask_threshold))
        return results
