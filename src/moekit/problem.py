"""A seeded MoE problem: tokens and weights for one layer, reproducible on any machine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.config import MoEConfig
from moekit.routing.skew import skew_bias
from moekit.weights import MoEWeights, init_weights, router_logits


@dataclass(frozen=True)
class MoEProblem:
    """x [T, H] in config.dtype, weights (expert weights in config.dtype), on one device."""

    config: MoEConfig
    x: torch.Tensor
    weights: MoEWeights

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def router_logits(self) -> torch.Tensor:
        """logits [T, E] float32 (float64 when x is float64)."""
        return router_logits(self.x, self.weights)


def make_problem(
    config: MoEConfig,
    num_tokens: int,
    *,
    seed: int = 0,
    skew_experts: int = 0,
    skew_amount: float = 0.0,
    device: torch.device | str = "cpu",
) -> MoEProblem:
    """Draw x ~ N(0, 1) [T, H] and the layer's weights from seed on device; skew biases the first
    experts' logits. The same seed on the same kind of device gives the same problem."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    bias = skew_bias(config.num_experts, skew_experts, skew_amount) if skew_experts else None
    weights = init_weights(config, seed=seed, device=device, logit_bias=bias)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(num_tokens, config.hidden_size, generator=g, device=device).to(config.dtype)
    return MoEProblem(config, x, weights)
