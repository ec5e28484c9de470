"""Apply LayerDiffuse UNet weights ("transparent attention") to a diffusers ``UNet2DConditionModel``.

Accepted files (format detected from the keys, see shared/docs/layerdiffuse.md sections 2 and 5):

* ``forge``: Forge/ComfyUI patches on ldm keys, ``diffusion_model.<ldm key>::lora::0`` (up) / ``::lora::1``
  (down), ``::diff::0`` (full delta); e.g. ``layer_xl_transparent_attn.safetensors`` (rank-256 LoRA on all SDXL
  attention q/k/v/out) and ``layer_xl_transparent_conv.safetensors``.
* ``offsets``: already-merged weight offsets in diffusers UNet key space (``ld_diffusers_sdxl_attn.safetensors``).
* ``lora``: a diffusers/PEFT LoRA (``<module>.lora_A.weight`` / ``lora_B.weight`` or ``lora.down`` / ``lora.up``,
  optional ``unet.`` prefix and ``<module>.alpha``), e.g. rootonchair's ``diffuser_layer_xl_transparent_attn``.
* ``sd15_attention_sharing``: SD1.5 ``layer_sd15_transparent_attn.safetensors`` (``hookers.layers.<i>.…``): the
  LoRA is merged and a :class:`LayerDiffuseTemporalProcessor` is installed on each of the attention layers.

All weight-space patches are merged (``W += strength * dW``, computed in float32). Every patch must name an
existing UNet tensor of the right shape; anything else raises :class:`WeightsError` naming the file and key.
Merging changes this UNet copy permanently; load a fresh UNet for non-transparent generation.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .models.attention_sharing import LayerDiffuseTemporalProcessor
from .models.transparent_vae import WeightsError, check_state_dict

logger = logging.getLogger(__name__)

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _resnet_part(rest: str, key: str) -> str:
    for old, new in _RESNET.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise WeightsError(f"unknown ldm resnet parameter in {key!r}")


def ldm_to_diffusers_unet_key(key: str, layers_per_block: int) -> str:
    """Map an ldm (original Stable Diffusion) UNet parameter name to diffusers' ``UNet2DConditionModel`` name."""
    k = key
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    for old, new in _TOP.items():
        if k.startswith(old + "."):
            return new + k[len(old):]
    n = layers_per_block + 1
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", k)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // n, (i - 1) % n
        if sub == 0 and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if sub == 0:
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_part(rest, key)}"
        if sub == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", k)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub in (0, 2):
            return f"mid_block.resnets.{sub // 2}.{_resnet_part(rest, key)}"
        return f"mid_block.attentions.0.{rest}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", k)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        block, layer = i // n, i % n
        if rest.startswith("conv.") and sub in (1, 2):
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        if sub == 0:
            return f"up_blocks.{block}.resnets.{layer}.{_resnet_part(rest, key)}"
        if sub == 1:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    raise WeightsError(f"cannot map ldm UNet key {key!r} to diffusers")


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """``forge`` | ``sd15_attention_sharing`` | ``lora`` | ``offsets`` (see module docstring)."""
    keys = list(state_dict)
    if any("::" in k for k in keys):
        return "forge"
    if any(k.startswith("hookers.layers.") for k in keys):
        return "sd15_attention_sharing"
    if any(re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.", k) for k in keys):
        return "lora"
    return "offsets"


def _lora_delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    d = up.float().flatten(1) @ down.float().flatten(1)
    return d.reshape(shape)


def _forge_deltas(sd: dict, params: dict, layers_per_block: int, source: str) -> dict[str, torch.Tensor]:
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for k, v in sd.items():
        try:
            model_key, kind, idx = k.split("::")
            groups[model_key][kind][int(idx)] = v
        except ValueError as e:
            raise WeightsError(f"{source}: key {k!r} is not '<ldm key>::<patch type>::<index>'") from e
    deltas = {}
    for model_key, kinds in groups.items():
        name = ldm_to_diffusers_unet_key(model_key, layers_per_block)
        if name not in params:
            raise WeightsError(f"{source}: {model_key!r} -> {name!r} is not a parameter of this UNet")
        shape = params[name].shape
        for kind, parts in kinds.items():
            if kind == "lora":
                if 0 not in parts or 1 not in parts:
                    raise WeightsError(f"{source}: {model_key}::lora needs indices 0 (up) and 1 (down)")
                d = _lora_delta(parts[0], parts[1], shape)
                if 2 in parts and parts[2] is not None and parts[2].numel() == 1:  # optional alpha / rank
                    d = d * (float(parts[2]) / parts[1].shape[0])
            elif kind == "diff":
                d = parts[0].float()
            else:
                raise WeightsError(f"{source}: unsupported patch type {kind!r} for {model_key}")
            if d.shape != shape:
                raise WeightsError(
                    f"{source}: {model_key}::{kind} gives shape {tuple(d.shape)}, UNet {name} is {tuple(shape)}"
                )
            deltas[name] = deltas[name] + d if name in deltas else d
    return deltas


def _peft_deltas(sd: dict, params: dict, source: str) -> dict[str, torch.Tensor]:
    pat = re.compile(r"^(?:unet\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.default)?\.weight$")
    mods: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    alphas = {}
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            mods[m[1]]["down" if m[2] in ("lora_A", "lora.down", "lora_down") else "up"] = v
        elif k.endswith(".alpha"):
            alphas[k[: -len(".alpha")].removeprefix("unet.")] = float(v)
        else:
            raise WeightsError(f"{source}: unexpected key {k!r} in a LoRA file")
    deltas = {}
    for mod, parts in mods.items():
        name = mod.replace(".processor.", ".").replace("_lora", "") + ".weight"
        if name not in params:
            raise WeightsError(f"{source}: LoRA module {mod!r} -> {name!r} is not a parameter of this UNet")
        if set(parts) != {"up", "down"}:
            raise WeightsError(f"{source}: LoRA module {mod!r} needs both up/B and down/A weights")
        d = _lora_delta(parts["up"], parts["down"], params[name].shape)
        if mod in alphas:
            d = d * (alphas[mod] / parts["down"].shape[0])
        deltas[name] = d
    return deltas


def attention_sharing_targets(unet: nn.Module) -> list[str]:
    """Attention modules in the order of Forge's SD1.5 ``module_mapping_sd15``: input blocks, output blocks,
    then the middle block; per transformer block attn1 then attn2."""
    names = []
    for part in ("down_blocks", "up_blocks", "mid_block"):
        for name, _ in unet.named_modules():
            if name.startswith(part + ".") and re.search(r"\.transformer_blocks\.\d+\.attn[12]$", name):
                names.append(name)
    return names


def _install_attention_sharing(unet: nn.Module, sd: dict, strength: float, source: str) -> dict[str, torch.Tensor]:
    targets = attention_sharing_targets(unet)
    layer_ids = sorted({int(k.split(".")[2]) for k in sd})
    if layer_ids != list(range(len(targets))):
        raise WeightsError(
            f"{source}: holds {len(layer_ids)} attention layers, this UNet has {len(targets)} "
            "(SD1.5 transparent attention expects 32)"
        )
    params = dict(unet.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    processors = {}
    for i, name in enumerate(targets):
        pre = f"hookers.layers.{i}."
        attn = unet.get_submodule(name)
        for proj, mod in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            up, down = sd.get(f"{pre}{proj}_lora.0.up.weight"), sd.get(f"{pre}{proj}_lora.0.down.weight")
            if up is None or down is None:
                raise WeightsError(f"{source}: missing {pre}{proj}_lora.0.up/down.weight")
            pname = f"{name}.{mod}.weight"
            deltas[pname] = _lora_delta(up, down, params[pname].shape)
        proc = LayerDiffuseTemporalProcessor(attn.to_k.out_features)
        own = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and k[len(pre):].startswith("temporal_")}
        check_state_dict(proc, own, f"{source} [{pre}temporal_*]")
        proc.load_state_dict(own, strict=True)
        if strength != 1.0:
            with torch.no_grad():
                proc.temporal_o.weight.mul_(strength)
                proc.temporal_o.bias.mul_(strength)
        p = next(attn.parameters())
        processors[name] = proc.to(device=p.device, dtype=p.dtype)
    extra = [k for k in sd if not re.match(r"hookers\.layers\.\d+\.(to_(q|k|v|out)_lora\.0\.(up|down)|temporal_[inqkvo])\.(weight|bias)$", k)]
    if extra:
        raise WeightsError(f"{source}: unexpected keys {extra[:5]}")
    for name, proc in processors.items():
        unet.get_submodule(name).set_processor(proc)
    return deltas


@dataclass
class PatchReport:
    """What :func:`apply_layerdiffuse_weights` changed."""

    format: str
    source: str
    patched: list[str] = field(default_factory=list)
    processors: int = 0


@torch.no_grad()
def apply_layerdiffuse_weights(
    unet: nn.Module, state_dict: dict[str, torch.Tensor], *, strength: float = 1.0, source: str = "<state dict>"
) -> PatchReport:
    """Merge LayerDiffuse UNet weights into ``unet`` in place (any format of the module docstring)."""
    fmt = detect_format(state_dict)
    params = dict(unet.named_parameters())
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise WeightsError(f"{source}: UNets with per-block layers_per_block {lpb} are not supported")
    processors = 0
    if fmt == "forge":
        deltas = _forge_deltas(state_dict, params, lpb, source)
    elif fmt == "lora":
        deltas = _peft_deltas(state_dict, params, source)
    elif fmt == "sd15_attention_sharing":
        deltas = _install_attention_sharing(unet, state_dict, strength, source)
        processors = len(attention_sharing_targets(unet))
    else:
        deltas = {}
        for k, v in state_dict.items():
            if k not in params:
                raise WeightsError(f"{source}: offset {k!r} is not a parameter of this UNet")
            if v.shape != params[k].shape:
                raise WeightsError(
                    f"{source}: offset {k!r} has shape {tuple(v.shape)}, UNet has {tuple(params[k].shape)}"
                )
            deltas[k] = v.float()
    for name, d in deltas.items():
        p = params[name]
        p.copy_((p.float() + strength * d.to(p.device)).to(p.dtype))
    logger.info("LayerDiffuse %s weights from %s: %d tensors merged, %d processors", fmt, source, len(deltas), processors)
    return PatchReport(format=fmt, source=source, patched=sorted(deltas), processors=processors)
