"""MoEConfig: the sizes, router and dtype that describe one MoE layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: x [T, H] -> y [T, H] through E routed experts (top-K) plus shared experts.

    hidden_size H, ffn_size F (per routed expert), num_experts E, top_k K.
    num_shared_experts experts of shared_ffn_size (default F) see every token.
    router: a name in moekit.routing.ROUTERS, with its parameters:
      renormalize            softmax_topk: rescale the K weights to sum to 1;
      n_group, topk_group    grouped_topk: E experts in n_group groups, tokens pick from topk_group groups;
      routed_scaling_factor  grouped_topk: multiplies the final weights (DeepSeek-V3: 2.5);
      sinkhorn_iterations, sinkhorn_temperature  sinkhorn: balancing steps and logit temperature.
    capacity_factor: when set, each expert keeps at most ceil(capacity_factor * T * K / E) tokens;
      load statistics count the rest as dropped.
    dtype: the activation and weight dtype of the fast paths.
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None
    router: str = "softmax_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    sinkhorn_iterations: int = 8
    sinkhorn_temperature: float = 1.0
    capacity_factor: float | None = None
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        _require_int("hidden_size", self.hidden_size, 1)
        _require_int("ffn_size", self.ffn_size, 1)
        _require_int("num_experts", self.num_experts, 1)
        _require_int("top_k", self.top_k, 1)
        _require_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_ffn_size is not None:
            _require_int("shared_ffn_size", self.shared_ffn_size, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        from moekit.routing import ROUTERS  # routers import this module: import on use

        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS.names()}, got {self.router!r}")
        _require_int("n_group", self.n_group, 1)
        _require_int("topk_group", self.topk_group, 1)
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group must divide num_experts ({self.num_experts}), got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group must be <= n_group ({self.n_group}), got {self.topk_group}")
        if self.top_k > self.topk_group * self.experts_per_group:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= topk_group * experts per group "
                f"({self.topk_group} * {self.experts_per_group})"
            )
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        _require_int("sinkhorn_iterations", self.sinkhorn_iterations, 0)
        if not self.sinkhorn_temperature > 0:
            raise ValueError(f"sinkhorn_temperature must be > 0, got {self.sinkhorn_temperature}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point) or self.dtype.itemsize < 2:
            raise TypeError(
                f"dtype must be a floating torch.dtype of 16 bits or more, got {self.dtype!r} (FP8 weights: "
                "moekit.quantize_weights, or MoELayer(quantization=...))"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def shared_size(self) -> int:
        """FFN size of each shared expert."""
        return self.shared_ffn_size or self.ffn_size

    def expert_capacity(self, num_tokens: int) -> int | None:
        """Most tokens one expert keeps for a batch of num_tokens, or None without a capacity."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
