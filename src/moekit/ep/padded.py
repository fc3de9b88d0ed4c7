"""padded: fixed-message-size all-to-all. Every pair of ranks exchanges M token slots, zero-padded.

Wire format, per step:
  1. counts: all_reduce(SUM) of a [W, W] int64 matrix in which each rank fills its row with its
     send_counts: every rank learns every pair's count (the host reads it). M = the largest entry
     (the agreed maximum), or the fixed `capacity` given at construction; a pair above a fixed capacity
     raises ValueError on every rank before any row is sent (never a silent drop).
  2. rows: all_to_all_single with equal splits of [W * M, H] in the dispatcher's dtype; slot q * M + i
     holds the i-th token this rank sends to rank q (tokens ascending), padding slots are zero.
  3. metadata: all_to_all_single with equal splits of [W * M, 1 + 2K] int64 = (source token index, the K
     global expert ids, the K router weights as weight_dtype bits); padding slots have token and ids -1.
  combine: all_to_all_single with equal splits of [W * M, H] in the dispatcher's dtype, the same slots.
padding_fraction = padded slots / all slots over every pair, (W*W*M - sum of counts) / (W*W*M), is on
the handle and on the dispatcher (last_padding_fraction) for the benchmark. Step 1 is skipped on one
rank; steps 2, 3 and combine are skipped when M = 0 (no rank sends anything) or on one rank.

The send and receive buffers are allocated once in the constructor for W * (capacity or max_tokens)
slots (the metadata buffers on the first call, when K is known) and reused; each step writes the whole
W * M prefix it uses (padding included), so rows of an earlier step never leak into a later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.ep.base import (
    Dispatcher,
    PendingCombine,
    _require_int,
    expand_received,
    meta_padding,
    pack_meta,
    plan_sends,
)
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS

DISPATCH, COMBINE = 0, 1  # the stages that exchange: rows and metadata out, rows back


@dataclass
class PendingDispatch:
    works: list
    recv_rows: torch.Tensor  # [W*M, H] view of the receive buffer
    recv_meta: torch.Tensor  # [W*M, 1+2K] view
    send_counts: torch.Tensor  # [W] int64, CPU
    recv_counts: torch.Tensor  # [W] int64, CPU
    send_token_idx: torch.Tensor
    send_slots: torch.Tensor
    slots_per_peer: int
    padding_fraction: float
    num_tokens: int


@DISPATCHERS.register("padded", trains=True)
class PaddedDispatcher(Dispatcher):
    """Fixed-size messages: M slots per pair, M agreed per step or fixed by capacity."""

    name = "padded"

    def __init__(self, group, num_experts, hidden, max_tokens, dtype, device, *, capacity: int | None = None):
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device)
        if capacity is not None:
            _require_int("capacity", capacity, 0)
        self.capacity = capacity
        self.max_slots = self.world_size * (capacity if capacity is not None else max_tokens)
        size = self.max_slots * hidden

        def buffer() -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, device=self.device)

        self._send_rows, self._back_send = buffer(), buffer()
        self._allocate_receive_buffers(size)
        self._send_meta: torch.Tensor | None = None
        self._recv_meta: torch.Tensor | None = None
        self._top_k: int | None = None
        self.last_padding_fraction: float | None = None

    def _allocate_receive_buffers(self, size: int) -> None:
        """The flat buffers (size elements) that dispatch's rows and combine's back rows arrive in."""
        self._recv_rows = torch.zeros(size, dtype=self.dtype, device=self.device)
        self._back_recv = torch.zeros(size, dtype=self.dtype, device=self.device)

    def _meta_buffers(self, top_k: int) -> torch.Tensor:
        """The metadata send buffer for top_k (the receive buffer beside it), reallocated when top_k changes."""
        if self._top_k != top_k:
            size = self.max_slots * (1 + 2 * top_k)
            self._send_meta = torch.empty(size, dtype=torch.int64, device=self.device)
            self._recv_meta = torch.empty(size, dtype=torch.int64, device=self.device)
            self._top_k = top_k
        return self._send_meta

    def _exchange(self, stage: int, sends: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Equal splits: block q (of W) of each send [W*M, width] goes to rank q -> (what arrived, the same
        shapes, block p from rank p; works whose .wait() orders what follows after the arrival). DISPATCH
        sends rows and metadata, COMBINE the back rows. Nothing moves on one rank or when M = 0."""
        if self.world_size == 1 or sends[0].numel() == 0:
            return sends, []
        buffers = [self._recv_rows, self._recv_meta] if stage == DISPATCH else [self._back_recv]
        received = [buffer[: send.numel()].view_as(send) for buffer, send in zip(buffers, sends)]
        works = [dist.all_to_all_single(r, send, group=self.group, async_op=True) for r, send in zip(received, sends)]
        return received, works

    def _count_matrix(self, send_counts: torch.Tensor) -> torch.Tensor:
        """[W, W] int64 on the host: entry (p, q) = tokens rank p sends to rank q this step."""
        if self.world_size == 1:
            return send_counts.cpu()[None]
        matrix = torch.zeros(self.world_size, self.world_size, dtype=torch.int64, device=send_counts.device)
        matrix[self.rank] = send_counts
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM, group=self.group)
        return matrix.cpu()

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        W, K, H = self.world_size, topk_ids.shape[1], self.hidden
        send_meta_buf = self._meta_buffers(K)  # before the counts go out: a path may refuse this K
        plan = plan_sends(topk_ids, self.num_local_experts, W)
        matrix = self._count_matrix(plan.send_counts)
        largest = int(matrix.max())
        if self.capacity is not None:
            if largest > self.capacity:
                src, dst = divmod(int(matrix.argmax()), W)
                raise ValueError(
                    f"rank {src} would send {largest} tokens to rank {dst}, above the fixed capacity "
                    f"{self.capacity} of the padded dispatcher; nothing was sent"
                )
            M = self.capacity
        else:
            M = largest
        slots = W * M
        total_slots = W * slots
        padding_fraction = (total_slots - int(matrix.sum())) / total_slots if total_slots else 0.0
        self.last_padding_fraction = padding_fraction

        # slot of each sent row: q * M + (its rank among the tokens sent to q)
        counts = plan.send_counts
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        within = torch.arange(plan.send_dest.numel(), device=counts.device) - starts[plan.send_dest]
        send_slots = plan.send_dest * M + within

        width = 1 + 2 * K
        send_rows = self._send_rows[: slots * H].view(slots, H).zero_()
        send_rows.index_copy_(0, send_slots, x.index_select(0, plan.send_token_idx))
        send_meta = send_meta_buf[: slots * width].view(slots, width)
        meta_padding(send_meta, K)
        send_meta.index_copy_(0, send_slots, pack_meta(plan.send_token_idx, topk_ids, topk_weights, self.weight_dtype))

        (recv_rows, recv_meta), works = self._exchange(DISPATCH, [send_rows, send_meta])
        return PendingDispatch(
            works,
            recv_rows,
            recv_meta,
            matrix[self.rank].clone(),
            matrix[:, self.rank].clone(),
            plan.send_token_idx,
            send_slots,
            M,
            padding_fraction,
            x.shape[0],
        )

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        for work in pending.works:
            work.wait()
        M, device = pending.slots_per_peer, pending.recv_rows.device
        slots = self.world_size * M
        src_rank_of_slot = torch.arange(slots, device=device) // max(M, 1)
        expansion = expand_received(
            pending.recv_meta, src_rank_of_slot, self.expert_start, self.num_local_experts, self.weight_dtype
        )
        recv_x = pending.recv_rows.index_select(0, expansion.slot_of_row)  # a copy: the buffer is reused
        handle = DispatchHandle(
            send_counts=pending.send_counts,
            recv_counts=pending.recv_counts,
            send_token_idx=pending.send_token_idx,
            send_slots=pending.send_slots,
            recv_slot_of_row=expansion.slot_of_row,
            row_weight=expansion.meta.weight,
            num_send_slots=slots,
            num_recv_slots=slots,
            num_tokens=pending.num_tokens,
            hidden=self.hidden,
            slots_per_peer=M,
            padding_fraction=pending.padding_fraction,
        )
        return recv_x, expansion.meta, handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        self.check_combine_inputs(expert_out, handle, shared_out)
        if handle.slots_per_peer is None:
            raise ValueError("handle comes from another dispatch path (no slots_per_peer); pass the padded one's")
        slots, H = handle.num_recv_slots, self.hidden
        if slots > self.max_slots:
            raise ValueError(f"handle has {slots} slots, above the {self.max_slots} this dispatcher holds")
        send = self._back_send[: slots * H].view(slots, H)
        send.copy_(self.reduce_rows(expert_out, handle))
        (back,), works = self._exchange(COMBINE, [send])
        return PendingCombine(works, back, handle, shared_out)
