"""What dispatch hands to the receiver (RecvMeta) and what combine needs to send results back
(DispatchHandle). W = world size, E_local = experts per rank, T = tokens of the source rank,
S = rows this rank put on the wire (one per (token, destination rank) pair), R = rows after expansion
on the receiver (one per (received token, local expert) pair)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecvMeta:
    """Everything the receiving rank gets besides the rows recv_x [R, H].

    local_expert_counts  [E_local]   int64: rows of each local expert
    local_expert_offsets [E_local+1] int64: recv_x[offsets[e]:offsets[e+1]] are local expert e's rows
    src_rank  [R] int64: the rank the row's token came from
    src_token [R] int64: the token's index on its source rank
    weight    [R] float32 (float64 for a float64 dispatcher): the router weight of that (token, expert) pair
              (applied in combine)

    Rows are grouped by local expert; within an expert, by source rank, then source token order.
    """

    local_expert_counts: torch.Tensor
    local_expert_offsets: torch.Tensor
    src_rank: torch.Tensor
    src_token: torch.Tensor
    weight: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.src_token.numel()


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to send expert outputs back to where their tokens came from.

    send_counts [W] int64 (CPU): tokens this rank sent to each rank (each token once per destination)
    recv_counts [W] int64 (CPU): tokens this rank received from each rank (the symmetric paths: pairs;
        symmetric_triton_graph keeps both on the device)
    send_token_idx [S] int64: source token of each row this rank sent, in send order (destination rank,
        then token index)
    send_slots [S] int64: wire slot of each sent row in the send buffer (nccl: 0..S-1; padded: q*M + i;
        symmetric_triton: every pair's, -1 where the capacity dropped it)
    recv_slot_of_row [R] int64: wire slot (in the receive buffer) of the token each expanded row came from
        (symmetric_triton_graph: -1 for its padding rows)
    row_weight [R] float32 (float64 for a float64 dispatcher): the router weight of each expanded row
        (RecvMeta.weight)
    num_send_slots: rows of the dispatch send buffer = rows combine gets back
    num_recv_slots: rows of the dispatch receive buffer = rows combine sends back
    num_tokens: T of the source rank; hidden: H
    slots_per_peer: M of the padded path (every pair exchanges M slots), None for variable-size paths
    padding_fraction: padded slots / all slots over every pair this step (padded path), None otherwise
    """

    send_counts: torch.Tensor
    recv_counts: torch.Tensor
    send_token_idx: torch.Tensor
    send_slots: torch.Tensor
    recv_slot_of_row: torch.Tensor
    row_weight: torch.Tensor
    num_send_slots: int
    num_recv_slots: int
    num_tokens: int
    hidden: int
    slots_per_peer: int | None = None
    padding_fraction: float | None = None

    @property
    def num_rows(self) -> int:
        """R: expanded rows on this rank (rows of expert_out that combine takes)."""
        return self.recv_slot_of_row.numel()
