"""Seeded parameters for the models: normal draws with std 1/sqrt(fan_in), drawn on the device."""

from __future__ import annotations

import torch
from torch import nn


def normal_parameter(
    shape: tuple[int, ...], std: float, generator: torch.Generator, dtype: torch.dtype
) -> nn.Parameter:
    """A frozen parameter of `shape` drawn N(0, std^2) in float32 on the generator's device, then cast to dtype."""
    values = torch.randn(shape, generator=generator, device=generator.device) * std
    return nn.Parameter(values.to(dtype), requires_grad=False)


def ones_parameter(size: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A frozen parameter [size] of ones (the gain of a norm)."""
    return nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
