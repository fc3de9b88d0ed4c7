"""Expert parallelism under autograd: dispatch and combine as torch.autograd.Functions, each the other's backward.

  dispatch  recv_x[r] = x[t(r)]              dx[t] = sum of d_recv_x over t's rows r   (a combine, weights 1)
  combine   y[t] = sum_r w[r] expert_out[r]   d_expert_out[r] = w[r] dy[t(r)]          (a dispatch of dy)
                                              dw[t, k] = <dy[t], expert_out[r(t, k)]>  (float32 dots on the rank
                                                                                        that ran the expert)
r runs over the rows a rank received (one per (token, local expert) pair), t(r) is the row's source token.
dw goes home through one more combine: row r's dot sits in the column of its global expert (a token's experts
are distinct, so no two of its rows share a column), and the source reads column topk_ids[t, k]; E > H takes
ceil(E / H) such combines. The dots cross the wire in the dispatcher's dtype (bf16 rounds them to 8 bits).

The backward's exchanges go through the same dispatcher: every rank walks the same graph in the same order, so
the collectives match. The dispatch of dy lists its rows exactly as the forward's (the same topk_ids, the same
deterministic plan); kept for backward: the handle and routing of the step and expert_out [R, H].
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from moekit.ep.base import Dispatcher
from moekit.ep.handle import DispatchHandle, RecvMeta


def unit_weights(handle: DispatchHandle) -> DispatchHandle:
    """handle with every row weight 1: its combine sums rows as they are (dispatch's backward)."""
    return replace(handle, row_weight=torch.ones_like(handle.row_weight))


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, dispatcher: Dispatcher, step: SimpleNamespace):
        recv_x, step.meta, step.handle = dispatcher.dispatch(x, topk_ids, topk_weights)
        ctx.dispatcher, ctx.handle = dispatcher, step.handle
        return recv_x

    @staticmethod
    def backward(ctx, d_recv_x: torch.Tensor):
        dx = ctx.dispatcher.combine(d_recv_x.contiguous(), unit_weights(ctx.handle))
        return dx, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, topk_weights, topk_ids, dispatcher: Dispatcher, step: SimpleNamespace, *anchors):
        ctx.dispatcher, ctx.step = dispatcher, step
        ctx.save_for_backward(expert_out, topk_ids, topk_weights)
        ctx.num_anchors = len(anchors)
        return dispatcher.combine(expert_out, step.handle)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        expert_out, topk_ids, topk_weights = ctx.saved_tensors
        dispatcher, handle = ctx.dispatcher, ctx.step.handle
        recv_dy, _, _ = dispatcher.dispatch(dy.contiguous(), topk_ids, topk_weights)  # the forward's rows
        wide = recv_dy.to(dispatcher.accumulate_dtype)
        d_expert_out = (wide * handle.row_weight.to(wide.dtype)[:, None]).to(expert_out.dtype)
        # on every rank, whatever its own inputs need: the peers' router weights need this rank's dots
        dots = (wide * expert_out.to(wide.dtype)).sum(1)
        d_topk_weights = weight_grads_home(dots, ctx.step.meta, handle, topk_ids, dispatcher).to(topk_weights.dtype)
        return d_expert_out, d_topk_weights, None, None, None, *[None] * ctx.num_anchors


def weight_grads_home(
    dots: torch.Tensor, meta: RecvMeta, handle: DispatchHandle, topk_ids: torch.Tensor, dispatcher: Dispatcher
) -> torch.Tensor:
    """dots [R] (dw of each received row) -> d topk_weights [T, K] of this rank's tokens, in accumulate_dtype."""
    H, R = dispatcher.hidden, dots.shape[0]
    local = torch.arange(dispatcher.num_local_experts, device=dots.device)
    expert = dispatcher.expert_start + torch.repeat_interleave(local, meta.local_expert_counts.to(dots.device))
    rows = torch.arange(R, device=dots.device)
    ids = topk_ids.long()
    unit = unit_weights(handle)
    d_topk_weights = torch.zeros(ids.shape, dtype=dispatcher.accumulate_dtype, device=ids.device)
    for first in range(0, dispatcher.num_experts, H):  # every rank runs the same number of combines
        columns = torch.zeros(R, H, dtype=dispatcher.dtype, device=dots.device)
        here = (expert >= first) & (expert < first + H)
        columns[rows[here], expert[here] - first] = dots[here].to(dispatcher.dtype)
        back = dispatcher.combine(columns, unit)  # [T, H]
        mine = (ids >= first) & (ids < first + H)
        picked = back.gather(1, (ids - first).clamp(0, H - 1)).to(d_topk_weights.dtype)
        d_topk_weights += torch.where(mine, picked, 0)
    return d_topk_weights


def dispatch(x, topk_ids, topk_weights, dispatcher: Dispatcher) -> tuple[torch.Tensor, SimpleNamespace]:
    """dispatcher.dispatch with a backward to x -> (recv_x [R, H], step: its meta and handle, for combine)."""
    step = SimpleNamespace()
    recv_x = _Dispatch.apply(x, topk_ids, topk_weights.detach(), dispatcher, step)
    return recv_x, step


def combine(
    expert_out, topk_weights, topk_ids, dispatcher: Dispatcher, step: SimpleNamespace, anchors=()
) -> torch.Tensor:
    """dispatcher.combine of dispatch's step with a backward to expert_out [R, H] and topk_weights [T, K]
    (the weights the dispatch sent, which the combine applies) -> y [T, H].

    anchors: tensors that take no gradient here but keep the combine, and the dispatch before it, in the graph
    on every rank whose parameters train: a rank that received no rows, or has no tokens, must still run the
    backward's exchanges its peers run (pass recv_x and the trained weights)."""
    return _Combine.apply(expert_out, topk_weights, topk_ids, dispatcher, step, *anchors)


__all__ = ["combine", "dispatch", "unit_weights", "weight_grads_home"]
