"""DecoderConfig: the sizes, router, expert backend and dtype of the models in moekit.models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.config import MoEConfig


def _require_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only transformer, and the MoE layer its MoE blocks use. Defaults: the seed size.

    vocab_size V, d_model D (= the MoE hidden size H), n_heads (must divide D), n_layers blocks,
    mlp_hidden_dim F: the SwiGLU MLP's hidden size and each routed expert's ffn size,
    moe_n_experts E routed experts, moe_top_k K of them per token,
    router: a name in moekit.routing.ROUTERS; expert_backend: a name in moekit.experts.EXPERT_BACKENDS,
    dtype: of every weight and activation (norms and softmaxes compute in float32 or wider).
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    mlp_hidden_dim: int = 2048
    moe_n_experts: int = 8
    moe_top_k: int = 2
    router: str = "softmax_topk"
    expert_backend: str = "grouped_loop"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "mlp_hidden_dim", "moe_n_experts", "moe_top_k"):
            _require_positive(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model ({self.d_model}), got {self.n_heads}")
        if self.moe_top_k > self.moe_n_experts:
            raise ValueError(f"moe_top_k must be <= moe_n_experts ({self.moe_n_experts}), got {self.moe_top_k}")
        from moekit.experts import EXPERT_BACKENDS
        from moekit.routing import ROUTERS

        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS.names()}, got {self.router!r}")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert_backend must be one of {EXPERT_BACKENDS.names()}, got {self.expert_backend!r}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def moe_config(self) -> MoEConfig:
        """The MoEConfig of one MoE block: H = d_model, F = mlp_hidden_dim, E, K, router, dtype."""
        return MoEConfig(
            hidden_size=self.d_model,
            ffn_size=self.mlp_hidden_dim,
            num_experts=self.moe_n_experts,
            top_k=self.moe_top_k,
            router=self.router,
            dtype=self.dtype,
        )
