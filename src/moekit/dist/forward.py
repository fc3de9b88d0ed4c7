"""ep_forward: one MoE layer with expert parallelism: route here, dispatch, local experts, combine."""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit.config import MoEConfig
from moekit.dist.base import Dispatcher, group_size_and_rank
from moekit.experts import EXPERT_BACKENDS
from moekit.experts.mlp import swiglu_mlp
from moekit.routing import route
from moekit.weights import MoEWeights, router_logits


def local_weights(weights: MoEWeights, dispatcher: Dispatcher) -> MoEWeights:
    """The routed experts this rank owns; no shared experts (the source rank computes those). The router
    tensors stay whole: the backends never read them."""
    experts = slice(dispatcher.expert_start, dispatcher.expert_start + dispatcher.num_local_experts)
    return replace(
        weights,
        w_gate_up=weights.w_gate_up[experts],
        w_down=weights.w_down[experts],
        shared_gate_up=None,
        shared_down=None,
    )


def shared_experts(x: torch.Tensor, weights: MoEWeights) -> torch.Tensor | None:
    """x [T, H] -> sum of the shared experts' outputs [T, H] in x.dtype, or None without any."""
    if weights.shared_gate_up is None:
        return None
    out = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    for w_gate_up, w_down in zip(weights.shared_gate_up, weights.shared_down):
        out += swiglu_mlp(x, w_gate_up, w_down)
    return out.to(x.dtype)


def ep_forward(
    x: torch.Tensor, weights: MoEWeights, config: MoEConfig, dispatcher: Dispatcher, backend_name: str, group=None
) -> torch.Tensor:
    """x [T, H] (this rank's tokens) -> y [T, H] in x.dtype.

    weights: the whole layer (every rank holds the router and the shared experts; only the local slice of
    the routed experts is read). The router runs here on x; the expert backend runs on the received rows
    with one "routing" column per row (its local expert, weight 1): the router weights are applied in
    combine. Every rank of the group calls this together.
    """
    world_size, rank = group_size_and_rank(group)
    if (world_size, rank) != (dispatcher.world_size, dispatcher.rank):
        raise ValueError(
            f"group is rank {rank} of {world_size}, "
            f"the dispatcher's is rank {dispatcher.rank} of {dispatcher.world_size}"
        )
    if config.num_experts != dispatcher.num_experts or weights.w_gate_up.shape[0] != dispatcher.num_experts:
        raise ValueError(
            f"config has {config.num_experts} experts and weights {weights.w_gate_up.shape[0]}, "
            f"the dispatcher was set up for num_experts={dispatcher.num_experts}"
        )
    backend = EXPERT_BACKENDS.get(backend_name)
    routing = route(router_logits(x, weights), config, weights.score_correction_bias)

    recv_x, meta, handle = dispatcher.dispatch(x, routing.topk_ids, routing.topk_weights)
    if meta.num_rows:
        local_ids = torch.repeat_interleave(
            torch.arange(dispatcher.num_local_experts, device=recv_x.device), meta.local_expert_counts
        )[:, None]
        ones = torch.ones(local_ids.shape, dtype=torch.float32, device=recv_x.device)
        expert_out = backend.fn(recv_x, local_ids, ones, local_weights(weights, dispatcher))
    else:
        expert_out = recv_x.new_zeros(0, recv_x.shape[1])
    return dispatcher.combine(expert_out, handle, shared_experts(x, weights))


__all__ = ["ep_forward", "local_weights", "shared_experts"]
