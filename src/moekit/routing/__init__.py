"""Routers: logits [T, E] -> topk_ids [T, K] int32 and topk_weights [T, K].

Ties are broken deterministically: among equal scores the expert with the lower index is chosen
(every router selects with a stable descending sort), and the same rule picks groups in grouped_topk.
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig

# registration order is table order, the naive baseline first (I001 is off for this file)
from moekit.routing import softmax_topk, topk_softmax, grouped_topk, sinkhorn, fused_select  # noqa: F401
from moekit.routing.load_stats import LoadStats, load_stats, tokens_per_expert
from moekit.routing.losses import load_balancing_loss, router_z_loss, update_correction_bias
from moekit.routing.registry import ROUTERS, Routing
from moekit.routing.skew import apply_skew, skew_bias
from moekit.validation import check_finite, check_tensor

__all__ = [
    "ROUTERS",
    "LoadStats",
    "Routing",
    "apply_skew",
    "check_router_inputs",
    "load_balancing_loss",
    "load_stats",
    "route",
    "router_z_loss",
    "skew_bias",
    "tokens_per_expert",
    "update_correction_bias",
]


def check_router_inputs(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None, *, finite: bool
) -> None:
    """Shape and dtype checks for a router call; finite=True also rejects NaN/inf (a device sync)."""
    check_tensor("logits", logits, shape=(None, config.num_experts), floating=True)
    if correction_bias is not None:
        if config.router != "grouped_topk":
            raise ValueError(f"correction_bias is used by grouped_topk only, got router {config.router!r}")
        check_tensor("correction_bias", correction_bias, shape=(config.num_experts,), floating=True)
    if finite:
        check_finite("logits", logits)


def route(
    logits: torch.Tensor,
    config: MoEConfig,
    correction_bias: torch.Tensor | None = None,
    *,
    check_values: bool = True,
) -> Routing:
    """Route logits [T, E] with config.router (correction_bias [E]: grouped_topk only).

    check_values=False skips the NaN check, the only one that waits for the device (hot paths, graphs).
    Raises ValueError when the router's supports() refuses the logits' device or dtype.
    """
    impl = ROUTERS.get(config.router)
    check_router_inputs(logits, config, correction_bias, finite=check_values)
    ok, reason = impl.supports(logits.device, logits.dtype)
    if not ok:
        raise ValueError(f"router {config.router!r} cannot run on {logits.device} with {logits.dtype}: {reason}")
    return impl.fn(logits, config, correction_bias)
