"""padded_triton: the padded dispatcher with its fixed-size messages moved by a Triton kernel over symmetric memory.

Wire format: padded's (moekit.ep.padded). The [W, W] count all_reduce agrees on M (or checks the fixed
capacity, overflow raised on every rank), and the rows [W * M, H] and metadata [W * M, 1 + 2K] int64 leave
in equal blocks, block q for rank q. Only the moves differ: instead of equal-split all_to_all_single, one
launch of moekit.kernels.fixed_messages.put_fixed_messages stores every block straight into its rank's
symmetric receive buffer (rows and metadata in the same launch, under one signal), packed at M slots per
source like all_to_all_single's output, then signals each rank with a release flag; dispatch_wait and
combine_wait first launch wait_for_messages (one program per source spinning on its flag, acquire). Each
stage (dispatch, combine) has flags int32 [W] zeroed once and an epoch counted on the host, which every
rank advances in step (the padded path waits for the host each step anyway, so it costs nothing more).
On one rank the put is a local copy, ordered by the stream (no all_reduce); with M = 0 nothing moves.

Why the dispatch receive buffers need no ring: every step starts with the count all_reduce, which on each
rank is stream-ordered after that rank's reads of the previous step's buffers, and a rank's puts of the
next step are queued after its own all_reduce, which cannot finish before every peer's has started. That
does not cover combine: ep_forward with chunks > 1 starts dispatch i + 1 before it reads combine i - 1's
rows back, so a peer can put combine i + 1 before this rank read combine i. Combine's receive buffer is
therefore a ring of two: combine j's rows are put only after the putting rank's combine_wait(j - 1) saw
this rank's combine j - 1 puts, which this rank queued after reading combine j - 2, the same ring slot.

Buffers are allocated once, collectively: rows for W * (capacity or max_tokens) slots, the metadata for the
top_k of the first call (another top_k later is an error), by default from torch's symmetric memory
(moekit.ep.symmetric_heap), plain device buffers on one rank, or a heap passed in (the CPU tests play
every rank in one process under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.ep.padded import COMBINE, DISPATCH, PaddedDispatcher
from moekit.ep.registry import DISPATCHERS
from moekit.ep.symmetric_heap import OnSymmetricHeap, SymmetricHeap

BACK_RING = 2  # combine's receive buffers; see the module docstring for why two


@dataclass(frozen=True)
class Arrival:
    """A stage's messages of one epoch in flight: wait() queues the spin until every source signalled it."""

    flags: torch.Tensor  # int32 [W], this rank's, for the stage
    epoch: int

    def wait(self) -> None:
        from moekit.kernels.fixed_messages import wait_for_messages

        wait_for_messages(self.flags, self.epoch)


@DISPATCHERS.register("padded_triton", trains=True)
class PaddedTritonDispatcher(OnSymmetricHeap, PaddedDispatcher):
    """padded, its equal-split exchanges done by a Triton put kernel into symmetric buffers and a flag wait."""

    name = "padded_triton"

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
        heap: SymmetricHeap | None = None,
    ):
        self._heap = heap
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device, capacity=capacity)
        flags = [self._heap.empty((self.world_size,), torch.int32) for _ in (DISPATCH, COMBINE)]
        self._flags = [buffer.zero_() for buffer, _ in flags]
        self._flag_tables = [table for _, table in flags]
        self._done = torch.zeros(2, dtype=torch.int32, device=self.device)  # per stage: programs finished
        self._epochs = [0, 0]  # per stage: the last epoch signalled
        self._heap.barrier()  # every rank's flags are zero before anyone signals

    def _allocate_receive_buffers(self, size: int) -> None:
        """Symmetric, each a (buffer [size], address table int64 [W]): dispatch's rows and combine's ring of
        BACK_RING (padded's constructor calls this, so the default heap is made here)."""
        self.default_heap()
        self._rows_inbox = self._heap.empty((size,), self.dtype)
        self._back_inboxes = [self._heap.empty((size,), self.dtype) for _ in range(BACK_RING)]

    def _meta_buffers(self, top_k: int) -> torch.Tensor:
        """The metadata send buffer; with it, on the first call, the symmetric receive buffer (collective)."""
        self.check_top_k_unchanged(top_k, self._top_k)
        if self._top_k is None:
            size = self.max_slots * (1 + 2 * top_k)
            self._meta_inbox = self._heap.empty((size,), torch.int64)
            self._send_meta = torch.empty(size, dtype=torch.int64, device=self.device)
            self._top_k = top_k
        return self._send_meta

    def _exchange(self, stage: int, sends: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """padded's exchange as one put launch into the peers' inboxes; the work waits for their flags."""
        from moekit.kernels.fixed_messages import put_fixed_messages

        if sends[0].numel() == 0:  # M = 0 on every rank: nothing to move or signal
            return sends, []
        self._epochs[stage] += 1
        epoch = self._epochs[stage]
        inboxes = [self._rows_inbox, self._meta_inbox] if stage == DISPATCH else [self._back_inboxes[epoch % BACK_RING]]
        W = self.world_size
        # packed: block p of an inbox starts at p * (this step's message size), as all_to_all_single leaves it
        messages = [(send.view(W, -1), table, send.numel() // W) for send, (_, table) in zip(sends, inboxes)]
        put_fixed_messages(messages, self._flag_tables[stage], self._done[stage : stage + 1], epoch, self.rank)
        received = [buffer[: send.numel()].view_as(send) for send, (buffer, _) in zip(sends, inboxes)]
        return received, [Arrival(self._flags[stage], epoch)]
