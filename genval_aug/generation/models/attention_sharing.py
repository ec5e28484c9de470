"""LayerDiffuse SD1.5 transparent-attention unit as a diffusers attention processor (single frame).

The SD1.5 weights (``layer_sd15_transparent_attn.safetensors``) hold, for each of the 32 attn1/attn2 layers, a
rank-256 LoRA on q/k/v/out plus a small "temporal" attention block. With one frame (foreground only) the unit
computes ``a = attention(h)`` with the LoRA-adapted projections and returns ``a + T(h + a)``, where
``T(x) = o(v(i(norm(x))))`` (attention over a single frame returns its values). The LoRA is merged into the
projections by the loader; this processor adds the ``T`` term.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


class LayerDiffuseTemporalProcessor(nn.Module):
    """Attention processor: default attention, plus LayerDiffuse's single-frame temporal block."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.temporal_n = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.temporal_i = nn.Linear(hidden_size, hidden_size)
        self.temporal_q = nn.Linear(hidden_size, hidden_size)  # unused with one frame, kept for strict loading
        self.temporal_k = nn.Linear(hidden_size, hidden_size)  # idem
        self.temporal_v = nn.Linear(hidden_size, hidden_size)
        self.temporal_o = nn.Linear(hidden_size, hidden_size)
        self._base = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        a = self._base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.ndim != 3:
            raise ValueError("LayerDiffuseTemporalProcessor expects (batch, tokens, channels) hidden states")
        x = (hidden_states + a).to(self.temporal_i.weight.dtype)
        x = self.temporal_o(self.temporal_v(self.temporal_i(self.temporal_n(x))))
        return a + x.to(a.dtype)
