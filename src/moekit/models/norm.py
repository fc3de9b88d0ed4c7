"""RMSNorm: x / rms(x) * weight over the last dim, computed in float32 (or wider)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.models.init import ones_parameter


class RMSNorm(nn.Module):
    """x [..., D] -> [..., D] in x.dtype."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = ones_parameter(dim, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = acc * torch.rsqrt(acc.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight
