"""Causal multi-head self-attention through torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.config import DecoderConfig
from moekit.models.init import normal_parameter


class CausalSelfAttention(nn.Module):
    """x [B, S, D] -> [B, S, D]: each position attends to itself and the positions before it.

    w_qkv [3D, D] (q rows, then k, then v), w_o [D, D].
    """

    def __init__(self, config: DecoderConfig, generator: torch.Generator) -> None:
        super().__init__()
        D = config.d_model
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.w_qkv = normal_parameter((3 * D, D), D**-0.5, generator, config.dtype)
        self.w_o = normal_parameter((D, D), D**-0.5, generator, config.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        qkv = F.linear(x, self.w_qkv).view(B, S, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, n_heads, S, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(out.transpose(1, 2).reshape(B, S, D), self.w_o)
