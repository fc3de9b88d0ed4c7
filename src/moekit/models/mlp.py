"""The dense SwiGLU MLP of a transformer block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.mlp import swiglu_mlp
from moekit.models.config import DecoderConfig
from moekit.models.init import normal_parameter


class SwiGLU(nn.Module):
    """x [B, S, D] -> [B, S, D]; w_gate_up [2F, D] (gate rows first), w_down [D, F], as one routed expert."""

    def __init__(self, config: DecoderConfig, generator: torch.Generator) -> None:
        super().__init__()
        D, F = config.d_model, config.mlp_hidden_dim
        self.w_gate_up = normal_parameter((2 * F, D), D**-0.5, generator, config.dtype)
        self.w_down = normal_parameter((D, F), F**-0.5, generator, config.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, self.w_gate_up, self.w_down)
