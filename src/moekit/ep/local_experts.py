"""The routed experts a rank owns, run on the rows it received: the weights slice and the backend call."""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit.ep.base import Dispatcher
from moekit.ep.handle import RecvMeta
from moekit.experts import EXPERT_BACKENDS
from moekit.experts.registry import SORTED_ROWS
from moekit.validation import trusted_values
from moekit.weights import MoEWeights


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


def run_local_experts(
    rows: torch.Tensor, local_ids: torch.Tensor, weights: MoEWeights, dispatcher: Dispatcher, backend_name: str
) -> torch.Tensor:
    """rows [N, H] with their local expert ids [N] -> unweighted expert outputs [N, H] (one "routing" column per
    row, weight 1: combine applies the router weights)."""
    if not rows.shape[0]:
        return rows.new_zeros(0, rows.shape[1])
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    with trusted_values():  # ids built by moekit, in [0, num_local_experts)
        return EXPERT_BACKENDS.get(backend_name).fn(rows, local_ids[:, None], ones, local_weights(weights, dispatcher))


FIXED_SHAPE_BACKEND = "triton_grouped"


def check_backend_fits(dispatcher: Dispatcher | type[Dispatcher], backend_name: str, own_first: bool = False) -> None:
    """A fixed-shape dispatcher's padded rows need the backend that reads device-side offsets, and its
    counts stay on the device, where own_first cannot match rows by them. dispatcher: one, or its class
    (a layer checks before it makes one)."""
    EXPERT_BACKENDS.get(backend_name)  # an unknown name fails here
    if dispatcher.fixed_shapes and backend_name != FIXED_SHAPE_BACKEND:
        raise ValueError(
            f"dispatcher {dispatcher.name!r} returns padded rows with device-side expert offsets (fixed shapes, "
            f"no host sync); only expert backend {FIXED_SHAPE_BACKEND!r} runs on those, got {backend_name!r}"
        )
    if own_first and dispatcher.fixed_shapes:
        raise ValueError(
            f"own_first matches rows by their count, which dispatcher {dispatcher.name!r} keeps on the device: "
            "pass own_first=False"
        )


def local_expert_forward(
    recv_x: torch.Tensor, meta: RecvMeta, weights: MoEWeights, dispatcher: Dispatcher, backend_name: str
) -> torch.Tensor:
    """recv_x [R, H] grouped by local expert -> unweighted expert outputs [R, H] (a fixed-shape dispatcher's
    padding rows, past meta.local_expert_offsets[-1], stay unspecified). A backend with a sorted-rows form
    (moekit.experts.registry) runs the rows as they are; any other is given one routing column per row."""
    check_backend_fits(dispatcher, backend_name)
    sorted_rows = SORTED_ROWS.get(backend_name)
    if sorted_rows is not None and (recv_x.shape[0] or dispatcher.fixed_shapes):
        return sorted_rows(recv_x, meta.local_expert_offsets, local_weights(weights, dispatcher))
    local_ids = torch.repeat_interleave(
        torch.arange(dispatcher.num_local_experts, device=recv_x.device), meta.local_expert_counts
    )
    return run_local_experts(recv_x, local_ids, weights, dispatcher, backend_name)


__all__ = ["check_backend_fits", "local_expert_forward", "local_weights", "run_local_experts"]
