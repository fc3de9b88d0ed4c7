"""symmetric: the FlashMoE layout. One buffer of the same shape on every rank, indexed by
(source rank, local expert, slot, hidden) per stage (dispatch, combine), allocated once.

A rank sends one row per (token, expert) pair. Pair (t, k) with global expert g = topk_ids[t, k] takes
slot s = its rank among this rank's pairs of expert g (tokens ascending), so it lands at
recv[this rank, g mod E_local, s] on rank g // E_local: a position every rank computes from its own
routing, so nothing about addresses or offsets is exchanged before rows are sent. Seen from the
sender the same position is row g * C + s of its send buffer, which makes the destination-major send
buffer [W, E_local, C, H] one equal-split all_to_all_single away from the receiver's buffer.

Here the puts are that all_to_all_single (any backend: gloo, NCCL); symmetric_triton
(moekit.ep.symmetric_triton) stores the rows into the peers' symmetric buffers directly, at the same
positions. SymmetricLayout is what both share. Alongside the rows travel, per slot,
(source token, router weight bits at the dispatcher's weight_dtype), and each rank's per-expert pair
counts [E] (an all_gather, sent concurrently with the rows, never waited on before sending): the receiver
reads the first min(count, C) slots of each (source rank, expert), and every rank sees every overflow.

capacity C per (source rank, expert): the default, max_tokens, never overflows (a token picks an
expert at most once) but takes E * C * H elements per buffer (4 buffers). Pairs above C:
overflow="raise" raises ValueError on every rank once the step's counts have arrived; overflow="drop"
drops them (their router weight is lost, not renormalised) and counts them: last_dropped (this rank's
pairs) and last_dropped_total (the group's). Combine sends the weighted rows back to the very slots they
came from; the source sums its pairs per token in float32 (or wider).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.ep.base import Dispatcher, PendingCombine, _require_int, weight_bits, weights_of_bits
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS

OVERFLOW_POLICIES = ("raise", "drop")
# torch 2.13 renamed all_gather_into_tensor (the GPU machine's torch 2.11 has only the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class PairSlots:
    """Where this rank's (token, expert) pairs go; pair p = t * K + k, P = T * K.

    expert [P] int64: its global expert g; slot [P] int64: its rank among this rank's pairs of g (tokens
    ascending), so it goes to position g * C + slot of the sender's view when slot < C; counts [E] int64:
    this rank's pairs per expert, before the capacity.
    """

    expert: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor


def pair_slots(topk_ids: torch.Tensor, num_experts: int) -> PairSlots:
    """topk_ids [T, K] -> PairSlots, computed on topk_ids' device without waiting for it."""
    expert = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    order = torch.sort(expert, stable=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(expert)
    slot[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    return PairSlots(expert, slot, counts)


def pair_summary(counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """counts int64 [..., E] (pairs per expert of one rank) -> int64 [..., 4]: (pairs above the capacity, the
    fullest expert, its pairs, pairs kept): what every rank must know of every rank to account the overflow."""
    kept = counts.clamp(max=capacity)
    return torch.stack([(counts - kept).sum(-1), counts.argmax(-1), counts.amax(-1), kept.sum(-1)], dim=-1)


@dataclass(frozen=True)
class Arrivals:
    """A step's pairs as every rank of the symmetric layout can tell them, on the host (lists over the
    source ranks p): dropped[p] pairs above the capacity, p's fullest expert worst_expert[p] with
    worst_count[p] pairs, kept[p] pairs p sent in all; pairs_to_me int64 [W, E_local]: the pairs each rank
    sent to this rank's experts (at most C each); pairs_i_sent int64 [W]: this rank's pairs kept per rank."""

    dropped: list[int]
    worst_expert: list[int]
    worst_count: list[int]
    kept: list[int]
    pairs_to_me: torch.Tensor
    pairs_i_sent: torch.Tensor

    @classmethod
    def of(cls, summary: torch.Tensor, pairs_to_me: torch.Tensor, pairs_i_sent: torch.Tensor) -> Arrivals:
        """summary [W, 4] on the host: pair_summary of every rank's counts."""
        dropped, worst_expert, worst_count, kept = summary.T.tolist()
        return cls(dropped, worst_expert, worst_count, kept, pairs_to_me, pairs_i_sent)


class SymmetricLayout(Dispatcher):
    """What the paths of the symmetric layout share: capacity C per (source rank, expert), the overflow
    policy and its accounting, and the step's handle. Subclasses move and list the rows."""

    rows_on_the_wire = "pair"

    def __init__(
        self,
        group,
        num_experts,
        hidden,
        max_tokens,
        dtype,
        device,
        *,
        capacity: int | None = None,
        overflow: str = "raise",
    ):
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device)
        capacity = max_tokens if capacity is None else capacity
        _require_int("capacity", capacity, 0)
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.capacity = capacity
        self.overflow = overflow
        self.num_slots = num_experts * capacity  # per stage and rank: W * E_local * C
        self._drops = (0, 0)
        self.last_padding_fraction: float | None = None

    def _account_overflow(self, arrivals: Arrivals) -> None:
        """Raise on every rank (overflow="raise"; every rank sees the same arrivals) or record the drops."""
        if self.overflow == "raise" and sum(arrivals.dropped):
            src = max(range(self.world_size), key=lambda p: arrivals.dropped[p] > 0 and arrivals.worst_count[p])
            raise ValueError(
                f"rank {src} routed {arrivals.worst_count[src]} tokens to expert {arrivals.worst_expert[src]}, "
                f"above the capacity {self.capacity} per (rank, expert) of the {self.name} dispatcher; the "
                "step's results are discarded. Pass a larger capacity, or overflow='drop' to drop and count them"
            )
        self._drops = (arrivals.dropped[self.rank], sum(arrivals.dropped))

    @property
    def last_dropped(self) -> int:
        """Pairs this rank routed above the capacity in the last dispatch (dropped, not sent)."""
        return self._last_drops()[0]

    @property
    def last_dropped_total(self) -> int:
        """Pairs the whole group routed above the capacity in the last dispatch."""
        return self._last_drops()[1]

    def _last_drops(self) -> tuple[int, int]:
        return self._drops

    def check_handle_is_mine(self, handle: DispatchHandle) -> None:
        """combine's handle must come from this layout's dispatch (its slots are positions in these buffers)."""
        if handle.num_recv_slots != self.num_slots or handle.slots_per_peer != self.num_local_experts * self.capacity:
            raise ValueError("handle comes from another dispatcher; pass the one this symmetric dispatcher returned")

    def _step_counts(self, arrivals: Arrivals) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(send_counts, recv_counts: pairs per rank, on the host; the padding fraction) of a step whose
        arrivals the host read."""
        total_slots = self.world_size * self.num_slots
        padding_fraction = (total_slots - sum(arrivals.kept)) / total_slots if total_slots else 0.0
        return arrivals.pairs_i_sent, arrivals.pairs_to_me.sum(1), padding_fraction

    def _handle(
        self,
        step_counts: tuple[torch.Tensor, torch.Tensor, float | None],
        send_token_idx: torch.Tensor,
        send_slots: torch.Tensor,
        recv_slot_of_row: torch.Tensor,
        row_weight: torch.Tensor,
        num_tokens: int,
    ) -> DispatchHandle:
        """The step's handle (recv_slot_of_row [R]: each received row's position in the receive buffer
        [E * C], -1 for a padding row); records the padding fraction."""
        send_counts, recv_counts, self.last_padding_fraction = step_counts
        return DispatchHandle(
            send_counts=send_counts,
            recv_counts=recv_counts,
            send_token_idx=send_token_idx,
            send_slots=send_slots,
            recv_slot_of_row=recv_slot_of_row,
            row_weight=row_weight,
            num_send_slots=self.num_slots,
            num_recv_slots=self.num_slots,
            num_tokens=num_tokens,
            hidden=self.hidden,
            slots_per_peer=self.num_local_experts * self.capacity,
            padding_fraction=self.last_padding_fraction,
        )


@dataclass
class PendingDispatch:
    works: list
    recv_rows: torch.Tensor  # [E*C, H]: slot (src * E_local + e) * C + s
    recv_meta: torch.Tensor  # [E*C, 2] int64: (source token, weight bits)
    counts: torch.Tensor  # [W, E] int64: pairs every rank routed to every expert, before capacity
    send_token_idx: torch.Tensor  # [S]
    send_slots: torch.Tensor  # [S]
    num_tokens: int


@DISPATCHERS.register("symmetric", trains=True)
class SymmetricDispatcher(SymmetricLayout):
    """Per-(token, expert) rows at positions every rank computes; capacity C per (source rank, expert)."""

    name = "symmetric"

    def __init__(self, group, num_experts, hidden, max_tokens, dtype, device, **layout):
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device, **layout)

        def buffer(width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(self.num_slots, width, dtype=dtype, device=self.device)

        self._send_rows, self._recv_rows = buffer(hidden, dtype), buffer(hidden, dtype)
        self._back_send, self._back_recv = buffer(hidden, dtype), buffer(hidden, dtype)
        self._send_meta, self._recv_meta = buffer(2, torch.int64), buffer(2, torch.int64)

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        C, K = self.capacity, topk_ids.shape[1]
        pairs = pair_slots(topk_ids, self.num_experts)
        kept = torch.nonzero(pairs.slot < C).squeeze(1)
        send_token_idx = kept // K
        send_slots = pairs.expert[kept] * C + pairs.slot[kept]

        self._send_rows.index_copy_(0, send_slots, x.index_select(0, send_token_idx))
        bits = weight_bits(topk_weights.reshape(-1)[kept], self.weight_dtype)
        self._send_meta.index_copy_(0, send_slots, torch.stack([send_token_idx, bits], dim=1))

        if self.world_size == 1:
            return PendingDispatch(
                [], self._send_rows, self._send_meta, pairs.counts[None], send_token_idx, send_slots, x.shape[0]
            )
        all_counts = pairs.counts.new_empty(self.world_size * self.num_experts)
        works = [
            _all_gather_single(all_counts, pairs.counts, group=self.group, async_op=True),
            dist.all_to_all_single(self._recv_rows, self._send_rows, group=self.group, async_op=True),
            dist.all_to_all_single(self._recv_meta, self._send_meta, group=self.group, async_op=True),
        ]
        return PendingDispatch(
            works,
            self._recv_rows,
            self._recv_meta,
            all_counts.view(self.world_size, self.num_experts),
            send_token_idx,
            send_slots,
            x.shape[0],
        )

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        for work in pending.works:
            work.wait()
        counts = pending.counts.cpu()  # [W, E]
        kept = counts.clamp(max=self.capacity)
        W, E_local = self.world_size, self.num_local_experts
        arrivals = Arrivals.of(
            pair_summary(counts, self.capacity),
            pairs_to_me=kept[:, self.expert_start : self.expert_start + E_local],
            pairs_i_sent=kept[self.rank].view(W, E_local).sum(1),
        )
        self._account_overflow(arrivals)
        # rows grouped by local expert, then source rank, then slot
        C, device = self.capacity, self.device
        filled = torch.arange(C)[None, None, :] < arrivals.pairs_to_me.T[:, :, None]  # [E_local, W, C]
        expert, src, slot = (t.to(device) for t in torch.nonzero(filled, as_tuple=True))
        recv_slot_of_row = (src * E_local + expert) * C + slot
        recv_x = pending.recv_rows.index_select(0, recv_slot_of_row)  # a copy: the buffer is reused
        src_token, bits = pending.recv_meta.index_select(0, recv_slot_of_row).unbind(1)
        weight = weights_of_bits(bits, self.weight_dtype)
        local_counts = arrivals.pairs_to_me.sum(0).to(device)
        offsets = torch.cat([local_counts.new_zeros(1), local_counts.cumsum(0)])
        handle = self._handle(
            self._step_counts(arrivals),
            pending.send_token_idx,
            pending.send_slots,
            recv_slot_of_row,
            weight,
            pending.num_tokens,
        )
        return recv_x, RecvMeta(local_counts, offsets, src, src_token, weight), handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        self.check_combine_inputs(expert_out, handle, shared_out)
        self.check_handle_is_mine(handle)
        weighted = expert_out.to(self.accumulate_dtype) * handle.row_weight.to(self.accumulate_dtype)[:, None]
        self._back_send.index_copy_(0, handle.recv_slot_of_row, weighted.to(self.dtype))
        if self.world_size == 1:
            return PendingCombine([], self._back_send, handle, shared_out)
        work = dist.all_to_all_single(self._back_recv, self._back_send, group=self.group, async_op=True)
        return PendingCombine([work], self._back_recv, handle, shared_out)
