"""ep_forward: one MoE layer with expert parallelism: route here, dispatch, local experts, combine.
With QuantizedMoEWeights the dispatch sends FP8 rows (dispatch_quantized, the weights' scheme), the local experts
run the FP8 backend's sorted-rows form and combine stays in the dispatcher's dtype."""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.ep.base import Dispatcher, group_size_and_rank
from moekit.ep.local_experts import check_backend_fits, check_fp8_fits, local_expert_forward, local_weights
from moekit.ep.own_rank_first import expert_out_with_own_rows, own_rank_rows
from moekit.ep.registry import DISPATCHERS
from moekit.ep.streams import join, on_stream, reused_side_stream
from moekit.experts import EXPERT_BACKENDS
from moekit.experts.mlp import swiglu_mlp
from moekit.kernels.availability import triton_on_cuda
from moekit.quantize import QuantizedMoEWeights
from moekit.registry import needs_grad
from moekit.routing import route
from moekit.validation import trusted_values
from moekit.weights import MoEWeights, router_logits


def shared_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, out: torch.Tensor | None = None):
    """swiglu_mlp(x [N, H]) -> [N, H] (into out when given), the activation as one Triton pass on CUDA."""
    if triton_on_cuda(x.device, x.dtype):
        from moekit.kernels.differentiable import swiglu  # the Triton pass, with its backward

        return torch.matmul(swiglu(x @ w_gate_up.T), w_down.T, out=out)
    y = swiglu_mlp(x, w_gate_up, w_down)
    return y if out is None else out.copy_(y)


def shared_experts(x: torch.Tensor, weights: MoEWeights, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, H] -> sum of the shared experts' outputs [T, H] in x.dtype (into out when given; several are
    summed in float32), or None without any."""
    if weights.shared_gate_up is None:
        return None
    if len(weights.shared_gate_up) == 1:
        return shared_expert(x, weights.shared_gate_up[0], weights.shared_down[0], out)
    total = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    for w_gate_up, w_down in zip(weights.shared_gate_up, weights.shared_down):
        total += shared_expert(x, w_gate_up, w_down)
    return total.to(x.dtype) if out is None else out.copy_(total)


def check_group_matches(dispatcher: Dispatcher, config: MoEConfig, weights: MoEWeights, group) -> None:
    """The group, the config and the weights must be the ones the dispatcher was set up for."""
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


def check_fused_combine(dispatcher: Dispatcher | type[Dispatcher], backend_name: str, own_first: bool) -> None:
    """fused_combine needs a dispatcher that fuses the down projection and moekit's grouped GEMM (the backend
    whose epilogue it extends); own_first's rows are computed apart from it."""
    if not dispatcher.fuses_down_projection:
        raise ValueError(f"fused_combine needs a dispatcher that fuses the down projection (symmetric_triton), "
                         f"got {dispatcher.name!r}")  # fmt: skip
    if backend_name != "triton_grouped":
        raise ValueError(f"fused_combine runs the experts in moekit's grouped GEMM: pass backend 'triton_grouped', "
                         f"got {backend_name!r}")  # fmt: skip
    if own_first:
        raise ValueError("fused_combine and own_first do not combine: pass one of them")


def local_hidden(recv_x: torch.Tensor, meta, weights: MoEWeights, dispatcher: Dispatcher) -> torch.Tensor:
    """recv_x [R, H] grouped by local expert -> silu(gate) * up [R, F], the local experts' first half."""
    from moekit.kernels.grouped_gemm import grouped_gemm

    return grouped_gemm(recv_x, local_weights(weights, dispatcher).w_gate_up, meta.local_expert_offsets, swiglu=True)


def check_trainable(dispatcher: Dispatcher, backend_name: str, weights, overlap: dict) -> None:
    """A training step needs a dispatcher and an expert backend registered with trains=True, bf16/fp32 weights
    and the synchronous layer (overlap: the ep_forward options that must be off)."""
    if not DISPATCHERS.get(dispatcher.name).trains:
        raise ValueError(f"dispatcher {dispatcher.name!r} has no backward; with inputs that require grad use one that "
                         f"trains: {DISPATCHERS.training_names()} (or run it under torch.no_grad())")  # fmt: skip
    if not EXPERT_BACKENDS.get(backend_name).trains:
        raise ValueError(f"expert backend {backend_name!r} has no backward; with inputs that require grad use one that "
                         f"trains: {EXPERT_BACKENDS.training_names()}")  # fmt: skip
    if isinstance(weights, QuantizedMoEWeights):
        raise ValueError("FP8 expert parallelism has no backward: train with bf16 or float32 weights")
    synchronous = dict(shared_overlap=False, chunks=1, own_first=False, fused_combine=False)
    on = [name for name, value in overlap.items() if value != synchronous[name]]
    if on:
        raise ValueError(f"a training step runs the synchronous expert-parallel layer; {on} overlap the forward "
                         "only: pass shared_overlap=False, chunks=1, own_first=False, fused_combine=False")  # fmt: skip


def trained_ep_forward(
    x: torch.Tensor, weights: MoEWeights, config: MoEConfig, dispatcher: Dispatcher, backend_name: str, *,
    check_values: bool = True,
) -> torch.Tensor:  # fmt: skip
    """ep_forward under autograd (moekit.ep.autograd): gradients to x, the router weight (through the top-k
    weights the combine applies), the local experts' weights and the shared experts'."""
    from moekit.ep import autograd

    routing = route(router_logits(x, weights), config, weights.score_correction_bias, check_values=check_values)
    with trusted_values():  # the router's ids are in range
        recv_x, step = autograd.dispatch(x, routing.topk_ids, routing.topk_weights, dispatcher)
        expert_out = local_expert_forward(recv_x, step.meta, weights, dispatcher, backend_name)
        anchors = [t for t in (recv_x, weights.w_gate_up, weights.w_down) if t.requires_grad]
        y = autograd.combine(expert_out, routing.topk_weights, routing.topk_ids, dispatcher, step, anchors)
    shared = shared_experts(x, weights)
    return y if shared is None else y + shared


def chunk_bounds(num_tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `chunks` nearly equal pieces of range(num_tokens); some may be empty."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    edges = [num_tokens * i // chunks for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def ep_forward(
    x: torch.Tensor,
    weights: MoEWeights | QuantizedMoEWeights,
    config: MoEConfig,
    dispatcher: Dispatcher,
    backend_name: str,
    group=None,
    *,
    shared_overlap: bool = False,
    chunks: int = 1,
    own_first: bool = False,
    fused_combine: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """x [T, H] (this rank's tokens) -> y [T, H] in x.dtype: route, dispatch, local experts, combine
    (+ shared experts, computed here on x). Every rank of the group calls this together.

    weights: the whole layer (every rank holds the router and the shared experts; only the local slice of
    the routed experts is read). QuantizedMoEWeights: FP8 expert parallelism (a dispatcher with sends_fp8, an FP8
    backend with a sorted-rows form; shared_overlap and chunks as below, own_first and fused_combine refused).
    Overlap, each switchable so it can be measured against the synchronous
    layer (both off) in the same run:
      shared_overlap: the shared experts run while the routed tokens are in flight, in two pieces: beside
          the first dispatch (on CUDA on a side stream, issued first, so the host's waits inside the
          dispatch do not hold it back) and beside the last combine (between combine_async and combine_wait, which reads
          shared_out only then): that piece is the second half of the last chunk's tokens, so every
          earlier chunk's combine finds its rows done. The exchanges progress on the backend's stream or thread;
      chunks = n > 1: the tokens are cut into n chunks, pipelined: chunk i's experts run while chunk i+1
          is dispatched and chunk i-1 combined. Every rank must pass the same n (empty chunks are fine);
      own_first: the local experts compute this rank's own tokens while the dispatch is in flight, and
          only the other ranks' rows once it lands (moekit.ep.own_rank_first).
    fused_combine: the down projection's epilogue stores each row where combine sends it (a dispatcher with
      fuses_down_projection, symmetric_triton, and backend triton_grouped: moekit's grouped GEMM).
    check_values=False skips the router's NaN check (a host sync): with a fixed-shape dispatcher
    (nvshmem_triton_graph, symmetric_triton_graph) nothing else waits for the host, and the forward can be
    captured in a CUDA graph.
    Training: with x or the weights requiring grad in grad mode, the synchronous layer runs under autograd
    (trained_ep_forward; dispatcher and backend registered with trains=True, overlap off, bf16/fp32 weights).
    """
    check_group_matches(dispatcher, config, weights, group)
    if torch.is_grad_enabled() and needs_grad((x, weights)):
        overlap = dict(shared_overlap=shared_overlap, chunks=chunks, own_first=own_first, fused_combine=fused_combine)
        check_trainable(dispatcher, backend_name, weights, overlap)  # on every rank alike, before any communication
        return trained_ep_forward(x, weights, config, dispatcher, backend_name, check_values=check_values)
    quantized = isinstance(weights, QuantizedMoEWeights)
    if quantized:  # before any communication
        check_fp8_fits(dispatcher, backend_name, own_first, fused_combine)
    else:
        check_backend_fits(dispatcher, backend_name, own_first)
    if fused_combine:
        check_fused_combine(dispatcher, backend_name, own_first)
    bounds = chunk_bounds(x.shape[0], chunks)
    routing = route(router_logits(x, weights), config, weights.score_correction_bias, check_values=check_values)

    own = [None] * len(bounds)

    def start_dispatch(i: int):
        start, stop = bounds[i]
        ids = routing.topk_ids[start:stop]
        args = (x[start:stop], ids, routing.topk_weights[start:stop])
        with trusted_values():  # the router's ids are in range: no host sync for the dispatch's range check
            if quantized:
                pending = dispatcher.dispatch_quantized_async(*args, weights.scheme)
            else:
                pending = dispatcher.dispatch_async(*args)
        if own_first:  # while chunk i is on the wire
            own[i] = own_rank_rows(x[start:stop], ids, weights, dispatcher, backend_name)
        return pending

    overlap_shared = shared_overlap and weights.shared_gate_up is not None
    shared = torch.empty_like(x) if overlap_shared else shared_experts(x, weights)
    late = (bounds[-1][0] + bounds[-1][1]) // 2  # shared rows from here on run beside the last combine
    side = reused_side_stream(x.device) if overlap_shared else None
    if side is not None:  # issued before chunk 0's dispatch: its host waits cannot hold the piece back
        with on_stream(side):
            shared_experts(x[:late], weights, out=shared[:late])
    pending_dispatch = start_dispatch(0)
    if overlap_shared and side is None:  # off CUDA: while chunk 0 is on the wire
        shared_experts(x[:late], weights, out=shared[:late])

    def combine_wait(pending):
        join(side)  # combine_wait reads the shared rows
        return dispatcher.combine_wait(pending)

    pieces: list[torch.Tensor] = []
    pending_combine = None
    for i, (start, stop) in enumerate(bounds):
        recv_x, meta, handle = dispatcher.dispatch_wait(pending_dispatch)
        if i + 1 < len(bounds):
            pending_dispatch = start_dispatch(i + 1)
        if fused_combine:
            hidden = local_hidden(recv_x, meta, weights, dispatcher)
        elif own_first:
            expert_out = expert_out_with_own_rows(recv_x, meta, own[i], weights, dispatcher, backend_name)
        else:
            expert_out = local_expert_forward(recv_x, meta, weights, dispatcher, backend_name)
        if pending_combine is not None:
            pieces.append(combine_wait(pending_combine))
        shared_rows = None if shared is None else shared[start:stop]
        if fused_combine:
            w_down = local_weights(weights, dispatcher).w_down
            pending_combine = dispatcher.combine_down_async(hidden, w_down, meta, handle, shared_rows)
        else:
            pending_combine = dispatcher.combine_async(expert_out, handle, shared_rows)
    if overlap_shared:
        shared_experts(x[late:], weights, out=shared[late:])  # while the last chunk travels back
    pieces.append(combine_wait(pending_combine))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


__all__ = [
    "check_fused_combine",
    "check_group_matches",
    "check_trainable",
    "chunk_bounds",
    "ep_forward",
    "shared_expert",
    "shared_experts",
    "trained_ep_forward",
]
