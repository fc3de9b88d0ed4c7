"""Synthetic routing skew: bias the logits of the first experts so they draw more tokens."""

import torch


def skew_bias(num_experts: int, skew_experts: int, amount: float) -> torch.Tensor:
    """[E] float32: `amount` on experts 0 .. skew_experts-1, 0 elsewhere."""
    if not 0 <= skew_experts <= num_experts:
        raise ValueError(f"skew_experts must be in [0, {num_experts}], got {skew_experts}")
    bias = torch.zeros(num_experts)
    bias[:skew_experts] = amount
    return bias


def apply_skew(logits: torch.Tensor, skew_experts: int, amount: float) -> torch.Tensor:
    """logits [T, E] -> logits + skew_bias, a new tensor."""
    return logits + skew_bias(logits.shape[1], skew_experts, amount).to(logits.device, logits.dtype)
