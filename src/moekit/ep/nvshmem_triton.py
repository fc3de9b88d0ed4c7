"""nvshmem_triton: device-initiated dispatch and combine, Triton kernels storing into symmetric memory.

Wire format (moekit.kernels.peer_puts): rank p puts its j-th token for rank q (tokens ascending, each
token once per destination rank) at slot p * M + j of q's receive buffer [W * M, H] (M = max_tokens),
with its metadata (token index, K global expert ids, K router weights as float32 bits) beside it, then
signals q with (epoch, tokens, pairs per local expert of q): no count exchange or offset agreement comes
before the rows. The receiver waits for every source's signal and expands the arrived tokens to one row
per (token, local expert), grouped by local expert. Combine sums each received token's weighted expert
rows and stores the sum at slot q * M + j of the source's back buffer, signals, and the source sums its
rows from every rank (+ the shared expert) in float32 into y: no rows are staged in send buffers.
On CUDA the sending kernels run on a stream of the dispatcher's own (they hold what they read until the
wait, which joins it), so compute issued between *_async and *_wait (ep_forward's shared experts) runs
while the rows travel.

Two shapes of the received rows:
  nvshmem_triton        exactly R rows (what every expert backend takes); the host reads the counts once
                        per dispatch to size them.
  nvshmem_triton_graph  fixed shapes, no host synchronisation anywhere, so dispatch -> experts -> combine
                        can be captured in a CUDA graph and replayed (the low-latency decode setting):
                        W * M * min(K, E_local) rows, the bound, of which rows from
                        local_expert_offsets[-1] on are padding (src_rank -1, weight 0, values
                        unspecified) that combine never reads. Its experts run on moekit's grouped GEMM,
                        which reads the device-side offsets (moekit.ep.local_experts).

Buffers are allocated once, collectively, for max_tokens (the metadata on the first call, when K is
known) and kept in a ring of 3 per stage, indexed by the call's epoch, a counter on the device (so a
replayed graph advances it): a rank may store its next step's rows while a slower peer still reads the
last one's. That holds for the order ep_forward keeps (at most one dispatch and one combine in flight;
dispatch_wait(i) before dispatch_async(i + 1); combine_wait(i) before dispatch_async(i + 3)). The
memory: by default torch's symmetric memory (moekit.ep.symmetric_heap; NVLink-mapped, NVSHMEM's heap
when torch's backend is NVSHMEM), plain device buffers on one rank, or a heap passed in (the CPU tests
play every rank of a group in one process under TRITON_INTERPRET=1). The stores are plain Triton stores
to mapped peer addresses, not nvshmem_putmem calls: the per-token put kernel measured ~300 GB/s on
2x H200 (../shared/device/MEASURED.md), and the mapped stores let one program move several tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.ep.base import Dispatcher, _require_int
from moekit.ep.handle import RecvMeta
from moekit.ep.registry import DISPATCHERS
from moekit.ep.streams import join, on_stream, side_stream
from moekit.ep.symmetric_heap import OnSymmetricHeap, SymmetricHeap

RING = 3  # slots per buffer; see the module docstring for why three
DISPATCH, COMBINE = 0, 1


@dataclass(frozen=True)
class PeerDispatchHandle:
    """What combine needs on this rank. S = W * M receive slots, R = rows dispatch returned.

    dest_pos    int32 [T, W]: row of token t among this rank's tokens for rank q, -1 if not sent there
    row_of_pair int32 [S, K]: the row of the token in slot s (src * M + j) for its k-th expert, -1 when
                that expert is not on this rank (or no token arrived in the slot)
    row_weight  float32 [R]: router weight of each row (0 for padding rows)
    recv_counts int32 [W]: tokens received from (and sent back to) each rank, on the device
    """

    dest_pos: torch.Tensor
    row_of_pair: torch.Tensor
    row_weight: torch.Tensor
    recv_counts: torch.Tensor
    num_tokens: int
    hidden: int

    @property
    def num_rows(self) -> int:
        """R: rows of expert_out that combine takes."""
        return self.row_weight.numel()


@dataclass
class PendingDispatch:
    dest_pos: torch.Tensor  # int32 [T, W]
    top_k: int
    sent: tuple[torch.Tensor, ...]  # what the send kernels read, kept alive until the wait


@dataclass
class PendingCombine:
    handle: PeerDispatchHandle
    shared_out: torch.Tensor | None
    sent: tuple[torch.Tensor, ...]


@DISPATCHERS.register("nvshmem_triton")
class NvshmemTritonDispatcher(OnSymmetricHeap, Dispatcher):
    """Triton kernels store rows into the peers' symmetric buffers and signal; no collective on the data path."""

    name = "nvshmem_triton"
    handle_type = PeerDispatchHandle

    def __init__(
        self,
        group,
        num_experts,
        hidden,
        max_tokens,
        dtype,
        device,
        *,
        heap: SymmetricHeap | None = None,
        tokens_per_program: int = 4,
    ):
        self._heap = heap
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device)
        _require_int("tokens_per_program", tokens_per_program, 1)
        self.tokens_per_program = tokens_per_program
        self.default_heap()
        self._per_source = max(1, max_tokens)  # M: receive slots per source rank
        self._slots = self.world_size * self._per_source
        self._recv, self._recv_table = self._heap.empty((RING, self._slots, hidden), dtype)
        self._back, self._back_table = self._heap.empty((RING, self._slots, hidden), dtype)
        self._flag_width = 2 + self.num_local_experts  # epoch, tokens, pairs per local expert
        flags = [self._heap.empty((RING, self.world_size, self._flag_width), torch.int32) for _ in (DISPATCH, COMBINE)]
        self._flags = [buffer.zero_() for buffer, _ in flags]
        from moekit.kernels.peer_puts import Signal

        def counter() -> torch.Tensor:
            return torch.zeros(1, dtype=torch.int32, device=self.device)

        # per stage: its programs-done counter and its epoch on the device, advanced by the sending kernels
        self._signals = [Signal(table, counter(), counter(), self.rank, self._flag_width, RING) for _, table in flags]
        self._plan_done = counter()  # the send plan's counting kernel
        self._send_counts = torch.zeros(self.world_size, self._flag_width - 1, dtype=torch.int32, device=self.device)
        self._meta: torch.Tensor | None = None
        self._meta_table: torch.Tensor | None = None
        self._top_k: int | None = None
        self._comm_stream = side_stream(self.device)  # the sending kernels' (module docstring)
        self._heap.barrier()  # every rank's flags are zero before anyone signals

    def _meta_buffers(self, top_k: int) -> None:
        """The metadata ring [RING, W * M, 1 + 2K] int32, allocated (collectively) on the first call."""
        self.check_top_k_unchanged(top_k, self._top_k)
        if self._top_k is None:
            self._meta, self._meta_table = self._heap.empty((RING, self._slots, 1 + 2 * top_k), torch.int32)
            self._top_k = top_k

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        from moekit.kernels.peer_puts import send_tokens

        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        K = topk_ids.shape[1]
        self._meta_buffers(K)
        x = x if x.stride(1) == 1 else x.contiguous()
        with on_stream(self._comm_stream):
            dest_pos = send_tokens(
                x, topk_ids, topk_weights, self._send_counts, self._plan_done, self._recv_table, self._meta_table,
                self._per_source, self._signals[DISPATCH], self.tokens_per_program,
            )  # fmt: skip
        return PendingDispatch(dest_pos, K, (x, topk_ids, topk_weights))

    def _row_count(self, epoch: torch.Tensor, top_k: int) -> int:
        """Rows dispatch returns: here, exactly the rows received (the host reads the counts once)."""
        ring = (epoch % RING).long()
        return int(self._flags[DISPATCH].index_select(0, ring)[0, :, 2:].sum())

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, PeerDispatchHandle]:
        """Waits for every source rank's signal, then expands the arrived tokens to rows grouped by local
        expert (moekit.kernels.peer_puts.expand_received: two kernels, whatever the counts)."""
        from moekit.kernels.peer_puts import expand_received, wait_for_all_arrivals

        join(self._comm_stream)  # the sending kernels are done before this rank waits for its peers
        epoch = self._signals[DISPATCH].epoch
        wait_for_all_arrivals(self._flags[DISPATCH], epoch)
        R = self._row_count(epoch, pending.top_k)
        recv_x, row_of_pair, src_rank, src_token, weight, counts, offsets, recv_counts = expand_received(
            self._flags[DISPATCH], self._meta, self._recv, epoch, self.expert_start, self.num_local_experts, R
        )
        handle = PeerDispatchHandle(
            dest_pos=pending.dest_pos,
            row_of_pair=row_of_pair,
            row_weight=weight,
            recv_counts=recv_counts,
            num_tokens=pending.dest_pos.shape[0],
            hidden=self.hidden,
        )
        return recv_x, RecvMeta(counts, offsets, src_rank, src_token, weight), handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: PeerDispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        from moekit.kernels.peer_puts import send_tokens_back

        self.check_combine_inputs(expert_out, handle, shared_out)
        if handle.dest_pos.shape[1] != self.world_size or handle.row_of_pair.shape[0] != self._slots:
            raise ValueError("handle comes from another dispatcher; pass the one this dispatcher's dispatch returned")
        expert_out = expert_out.to(self.dtype)
        expert_out = expert_out if expert_out.stride(1) == 1 else expert_out.contiguous()
        with on_stream(self._comm_stream):
            send_tokens_back(
                expert_out, handle.row_weight, handle.row_of_pair, handle.recv_counts[:, None], self._back_table,
                self._signals[COMBINE],
            )  # fmt: skip
        return PendingCombine(handle, shared_out, (expert_out,))

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        from moekit.kernels.peer_puts import reduce_and_copy_to_output, wait_for_all_arrivals

        join(self._comm_stream)  # the sending kernels are done before this rank waits for its peers
        epoch = self._signals[COMBINE].epoch
        wait_for_all_arrivals(self._flags[COMBINE], epoch)
        return reduce_and_copy_to_output(
            self._back, epoch, pending.handle.dest_pos, pending.shared_out, self._per_source
        )


@DISPATCHERS.register("nvshmem_triton_graph")
class NvshmemTritonGraphDispatcher(NvshmemTritonDispatcher):
    """nvshmem_triton with fixed shapes and no host synchronisation: capturable in a CUDA graph."""

    name = "nvshmem_triton_graph"
    fixed_shapes = True

    def _row_count(self, epoch: torch.Tensor, top_k: int) -> int:
        """The bound: every arrived token (W * M at most) has at most min(K, E_local) rows here."""
        return self._slots * min(top_k, self.num_local_experts)
