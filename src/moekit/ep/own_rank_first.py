"""Overlap (b): the local experts start on this rank's own tokens while the other ranks' tokens are still
on the wire. The own tokens' (token, local expert) rows are computed straight from x right after the
dispatch is issued; once it lands, the received rows that came from this rank take those results (matched
by token and local expert) and only the rows from other ranks are computed. The own rows still travel
through the dispatcher (a local copy inside the collective), so every dispatcher works unchanged, and an
assignment the dispatcher dropped (symmetric, overflow="drop") is simply not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.ep.base import Dispatcher
from moekit.ep.handle import RecvMeta
from moekit.ep.local_experts import run_local_experts
from moekit.weights import MoEWeights


@dataclass(frozen=True)
class OwnRows:
    """Expert outputs of this rank's own (token, local expert) assignments, computed before the dispatch lands.

    keys [N] int64: token * E_local + local expert of each row; out [N, H]: the expert's output (unweighted:
    combine applies the router weights); num_tokens: T of the chunk.
    """

    keys: torch.Tensor
    out: torch.Tensor
    num_tokens: int


def own_rank_rows(
    x: torch.Tensor, topk_ids: torch.Tensor, weights: MoEWeights, dispatcher: Dispatcher, backend_name: str
) -> OwnRows:
    """x [T, H], topk_ids [T, K] (global ids) -> OwnRows of the assignments to this rank's experts. Its
    size-less nonzero waits for the device: the dispatch already did, to size its receive buffers."""
    local = topk_ids.long() - dispatcher.expert_start
    token, slot = ((local >= 0) & (local < dispatcher.num_local_experts)).nonzero(as_tuple=True)
    local_ids = local[token, slot]
    out = run_local_experts(x.index_select(0, token), local_ids, weights, dispatcher, backend_name)
    return OwnRows(token * dispatcher.num_local_experts + local_ids, out, x.shape[0])


def expert_out_with_own_rows(
    recv_x: torch.Tensor,
    meta: RecvMeta,
    own: OwnRows,
    weights: MoEWeights,
    dispatcher: Dispatcher,
    backend_name: str,
) -> torch.Tensor:
    """recv_x [R, H] as dispatched -> expert outputs [R, H] (what local_expert_forward returns): rows from
    this rank copied from `own`, rows from other ranks computed now."""
    E_local, device = dispatcher.num_local_experts, recv_x.device
    row_expert = torch.repeat_interleave(torch.arange(E_local, device=device), meta.local_expert_counts)
    # row indices, not boolean masks: a mask index waits for the device each time it is used
    own_rows = (meta.src_rank == dispatcher.rank).nonzero().squeeze(1)
    remote_rows = (meta.src_rank != dispatcher.rank).nonzero().squeeze(1)
    position = torch.full((own.num_tokens * E_local,), -1, dtype=torch.int64, device=device)
    position[own.keys] = torch.arange(own.keys.numel(), device=device)
    own_keys = meta.src_token.index_select(0, own_rows) * E_local + row_expert.index_select(0, own_rows)
    expert_out = recv_x.new_empty(recv_x.shape)
    expert_out.index_copy_(0, own_rows, own.out.index_select(0, position.index_select(0, own_keys)))
    if remote_rows.numel():
        remote_x, remote_expert = recv_x.index_select(0, remote_rows), row_expert.index_select(0, remote_rows)
        remote_out = run_local_experts(remote_x, remote_expert, weights, dispatcher, backend_name)
        expert_out.index_copy_(0, remote_rows, remote_out)
    return expert_out


__all__ = ["OwnRows", "expert_out_with_own_rows", "own_rank_rows"]
