"""The routed experts a rank owns, run on the rows it received: the weights slice and the backend call.
FP8 (QuantizedMoEWeights, rows from an FP8 dispatch as QuantizedRows): the FP8 backend's sorted-rows form."""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit.ep.base import Dispatcher, fp8_dispatchers
from moekit.ep.handle import RecvMeta
from moekit.experts import EXPERT_BACKENDS, FP8_EXPERT_BACKENDS
from moekit.experts.registry import FP8_SORTED_ROWS, SORTED_ROWS
from moekit.quantize import QuantizedMoEWeights, QuantizedRows, QuantizedTensor
from moekit.validation import trusted_values
from moekit.weights import MoEWeights


def _expert_slice(w: torch.Tensor | QuantizedTensor, experts: slice) -> torch.Tensor | QuantizedTensor:
    """w [E, N, K] -> w[experts]; a QuantizedTensor's values and scale both sliced along dim 0."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.values[experts], w.scale[experts], w.scheme, w.block_size)
    return w[experts]


def local_weights(
    weights: MoEWeights | QuantizedMoEWeights, dispatcher: Dispatcher
) -> MoEWeights | QuantizedMoEWeights:
    """The routed experts this rank owns (FP8 ones with their scales); no shared experts (the source rank
    computes those). The router tensors stay whole: the backends never read them."""
    experts = slice(dispatcher.expert_start, dispatcher.expert_start + dispatcher.num_local_experts)
    return replace(
        weights,
        w_gate_up=_expert_slice(weights.w_gate_up, experts),
        w_down=_expert_slice(weights.w_down, experts),
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


def check_fp8_fits(
    dispatcher: Dispatcher | type[Dispatcher], backend_name: str, own_first: bool = False, fused_combine: bool = False
) -> None:
    """FP8 expert parallelism needs a dispatcher that sends FP8 rows and an FP8 backend with a sorted-rows form;
    own_first and fused_combine run unquantized kernels and are refused. dispatcher: one, or its class."""
    FP8_EXPERT_BACKENDS.get(backend_name)  # an unknown name fails here
    if not dispatcher.sends_fp8:
        raise ValueError(
            f"dispatcher {dispatcher.name!r} cannot send FP8 rows, which FP8 expert parallelism needs; "
            f"the ones that can: {fp8_dispatchers()}"
        )
    if backend_name not in FP8_SORTED_ROWS:
        raise ValueError(
            f"FP8 expert parallelism runs the received rows through an FP8 backend's sorted-rows form; "
            f"{backend_name!r} has none, {sorted(FP8_SORTED_ROWS)} do"
        )
    if own_first or fused_combine:
        raise ValueError("own_first and fused_combine are not built for FP8 expert parallelism: pass neither")


def local_expert_forward_fp8(
    rows: QuantizedRows, meta: RecvMeta, weights: QuantizedMoEWeights, dispatcher: Dispatcher, backend_name: str
) -> torch.Tensor:
    """rows [R, H] from an FP8 dispatch, grouped by local expert -> unweighted expert outputs [R, H] in the
    dispatcher's dtype, by the FP8 backend's sorted-rows form."""
    check_fp8_fits(dispatcher, backend_name)
    if not rows.values.shape[0]:
        return torch.zeros(0, dispatcher.hidden, dtype=dispatcher.dtype, device=rows.values.device)
    form = FP8_SORTED_ROWS[backend_name]
    return form(rows, meta.local_expert_offsets, local_weights(weights, dispatcher), dispatcher.dtype)


def local_expert_forward(
    recv_x: torch.Tensor | QuantizedRows,
    meta: RecvMeta,
    weights: MoEWeights | QuantizedMoEWeights,
    dispatcher: Dispatcher,
    backend_name: str,
) -> torch.Tensor:
    """recv_x [R, H] grouped by local expert -> unweighted expert outputs [R, H] (a fixed-shape dispatcher's
    padding rows, past meta.local_expert_offsets[-1], stay unspecified). A backend with a sorted-rows form
    (moekit.experts.registry) runs the rows as they are; any other is given one routing column per row.
    QuantizedRows (an FP8 dispatch) go to local_expert_forward_fp8."""
    if isinstance(recv_x, QuantizedRows):
        return local_expert_forward_fp8(recv_x, meta, weights, dispatcher, backend_name)
    check_backend_fits(dispatcher, backend_name)
    sorted_rows = SORTED_ROWS.get(backend_name)
    if sorted_rows is not None and (recv_x.shape[0] or dispatcher.fixed_shapes):
        return sorted_rows(recv_x, meta.local_expert_offsets, local_weights(weights, dispatcher))
    local_ids = torch.repeat_interleave(
        torch.arange(dispatcher.num_local_experts, device=recv_x.device), meta.local_expert_counts
    )
    return run_local_experts(recv_x, local_ids, weights, dispatcher, backend_name)


__all__ = [
    "check_backend_fits",
    "check_fp8_fits",
    "local_expert_forward",
    "local_expert_forward_fp8",
    "local_weights",
    "run_local_experts",
]
