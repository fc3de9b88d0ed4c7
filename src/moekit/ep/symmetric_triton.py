"""symmetric_triton: the symmetric (FlashMoE) layout, its rows stored straight into the peers' symmetric buffers.

Layout, capacity C and overflow policy are moekit.ep.symmetric's: pair (t, k) of rank p with global expert g
and slot s < C lands at row (p * E_local + g mod E_local) * C + s of rank g // E_local's receive buffer, a
position p computes alone. Here Triton kernels plan the slots (moekit.kernels.slot_plan.plan_pairs: two
launches) and store every kept pair's row and its (source token, router weight bits) there
(moekit.kernels.slot_puts.put_rows), then signal every rank q with what p sent it and what every rank must
know of p: (pairs p dropped, p's fullest expert and its pairs, pairs p kept, p's kept pairs per local expert
of q). No collective and no count exchange come before the rows, and the host waits for nothing. The
receiver waits for every source's signal, reads its flags on the host once (the number of rows; the overflow
check, raised on every rank alike), lists its rows grouped by local expert (slot_plan.receive_rows) and
gathers them (moekit.kernels.peer_puts.gather_rows). Combine stores each row times its router weight
back at the position it came from in its source's back buffer; the source sums each token's K positions
(+ the shared experts) in float32 (moekit.kernels.peer_puts.reduce_and_copy_to_output).

The fused combine (combine_down_async, ep_forward's fused_combine): the local experts' down projection runs
in moekit's grouped GEMM, whose epilogue stores each row times its router weight straight at that position
of its source's back buffer (a mapped peer address per row), then one small kernel signals: no expert_out
[R, H] is written and no separate send pass reads it.

symmetric_triton_graph: the same with fixed shapes (all W * E_local * C slots' rows, padding after the
received ones) and no host read, so a layer on it can be captured in a CUDA graph; drops counted on the device.

Buffers (allocated once, collectively, on the heap of moekit.ep.symmetric_heap): rows [RING, E * C, H] and
metadata [RING, E * C, 2] int32 for dispatch, rows [RING, E * C, H] for combine, in a ring of RING = 3 slots
indexed by a device epoch, for the reasons and under the call order moekit.ep.nvshmem_triton states.
That is 2 * RING * E * C * H elements of rows: pick C near the expected pairs per (rank, expert) with a margin;
the default C = max_tokens never overflows and is the largest. On CUDA the sending kernels run on a stream of
the dispatcher's own, joined by the waits (compute issued in between runs while the rows travel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.ep.base import _on_device
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS
from moekit.ep.streams import join, on_stream, side_stream
from moekit.ep.symmetric import Arrivals, SymmetricLayout
from moekit.ep.symmetric_heap import OnSymmetricHeap, SymmetricHeap

RING = 3
DISPATCH, COMBINE = 0, 1
# a dispatch flag after its epoch: the sender's pair_summary (moekit.ep.symmetric; moekit.kernels.slot_plan
# writes its 4 columns), then its pairs per local expert
PAIRS = 4


@dataclass
class PendingDispatch:
    position: torch.Tensor  # int64 [T * K]: pair t * K + k's position g * C + s, -1 when dropped
    token: torch.Tensor  # int64 [T * K]: pair t * K + k's token t
    signalled: torch.Tensor  # int32 [W, PAIRS + E_local]: what this rank signalled to each rank
    num_tokens: int
    sent: tuple[torch.Tensor, ...]  # what the send kernel reads, kept alive until the wait


@dataclass
class PendingCombine:
    handle: DispatchHandle
    shared_out: torch.Tensor | None
    sent: tuple[torch.Tensor | None, ...]


@DISPATCHERS.register("symmetric_triton", trains=True)
class SymmetricTritonDispatcher(OnSymmetricHeap, SymmetricLayout):
    """The symmetric layout with device-initiated stores into the peers' buffers (module docstring)."""

    name = "symmetric_triton"
    fuses_down_projection = True  # combine_down_async

    def __init__(
        self, group, num_experts, hidden, max_tokens, dtype, device, *, heap: SymmetricHeap | None = None, **layout
    ):
        self._heap = heap
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device, **layout)
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 for the {self.name} dispatcher, got {self.capacity}")
        self.default_heap()
        self._per_peer = self.num_local_experts * self.capacity
        self._recv, self._recv_table = self._heap.empty((RING, self.num_slots, hidden), dtype)
        self._recv_meta, self._recv_meta_table = self._heap.empty((RING, self.num_slots, 2), torch.int32)
        self._back, self._back_table = self._heap.empty((RING, self.num_slots, hidden), dtype)
        widths = (1 + PAIRS + self.num_local_experts, 2)  # epoch, then the counts (combine: one unused)
        flags = [self._heap.empty((RING, self.world_size, width), torch.int32) for width in widths]
        self._flags = [buffer.zero_() for buffer, _ in flags]
        from moekit.kernels.peer_puts import Signal

        def counter() -> torch.Tensor:
            return torch.zeros(1, dtype=torch.int32, device=self.device)

        self._signals = [
            Signal(table, counter(), counter(), self.rank, width, RING) for (_, table), width in zip(flags, widths)
        ]
        self._nothing_to_count = torch.zeros(self.world_size, 1, dtype=torch.int32, device=self.device)
        self._plan_done = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._comm_stream = side_stream(self.device)
        self._heap.barrier()  # every rank's flags are zero before anyone signals

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        from moekit.kernels.slot_plan import plan_pairs
        from moekit.kernels.slot_puts import put_rows

        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        T, K = topk_ids.shape
        x = x if x.stride(1) == 1 else x.contiguous()
        with on_stream(self._comm_stream):
            position, token, meta, signalled = plan_pairs(
                topk_ids, topk_weights, self.num_experts, self.capacity, self.world_size, self._plan_done
            )
            put_rows(
                x, position, self._per_peer, self._recv_table, self._signals[DISPATCH], signalled, entries_per_row=K,
                meta=meta, meta_table=self._recv_meta_table,
            )  # fmt: skip
        return PendingDispatch(position, token, signalled, T, (x, topk_ids, topk_weights, meta))

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        from moekit.kernels.peer_puts import gather_rows, wait_for_all_arrivals
        from moekit.kernels.slot_plan import receive_rows

        join(self._comm_stream)
        epoch = self._signals[DISPATCH].epoch
        wait_for_all_arrivals(self._flags[DISPATCH], epoch)
        flags = self._flags[DISPATCH].index_select(0, (epoch % RING).long())[0]  # [W, 1 + PAIRS + E_local]
        num_rows, step_counts = self._take_stock(flags, pending.signalled)
        slot_of_row, src, src_token, weight, counts, offsets = receive_rows(
            self._flags[DISPATCH], 1 + PAIRS, self._recv_meta, epoch, self.capacity, num_rows
        )
        recv_x = gather_rows(self._recv, epoch, slot_of_row, offsets)  # a copy: the ring slot is reused
        handle = self._handle(step_counts, pending.token, pending.position, slot_of_row, weight, pending.num_tokens)
        return recv_x, RecvMeta(counts, offsets, src, src_token, weight), handle

    def _take_stock(self, flags: torch.Tensor, signalled: torch.Tensor) -> tuple[int, tuple]:
        """flags [W, 1 + PAIRS + E_local] (what every rank signalled this one), signalled (what this one
        signalled every rank) -> (rows to return, SymmetricLayout._handle's step_counts), after the overflow
        check: here exactly the received rows, by the dispatch's one host read."""
        host = torch.cat([flags[:, 1:].flatten(), signalled.flatten()]).cpu()
        about, mine = host.view(2, self.world_size, -1)
        arrivals = Arrivals.of(about[:, :PAIRS], about[:, PAIRS:].long(), mine[:, PAIRS:].long().sum(1))
        self._account_overflow(arrivals)
        return int(arrivals.pairs_to_me.sum()), self._step_counts(arrivals)

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        from moekit.kernels.slot_puts import put_rows

        self.check_combine_inputs(expert_out, handle, shared_out)
        self.check_handle_is_mine(handle)
        expert_out = expert_out.to(self.dtype)
        expert_out = expert_out if expert_out.stride(1) == 1 else expert_out.contiguous()
        received = handle.recv_counts.sum().reshape(1) if self.fixed_shapes else None  # rows before the padding
        with on_stream(self._comm_stream):
            put_rows(
                expert_out, handle.recv_slot_of_row, self._per_peer, self._back_table, self._signals[COMBINE],
                self._nothing_to_count, scale=handle.row_weight, limit=received,
            )  # fmt: skip
        return PendingCombine(handle, shared_out, (expert_out, handle.recv_slot_of_row, handle.row_weight, received))

    def combine_down_async(
        self,
        hidden: torch.Tensor,
        w_down: torch.Tensor,
        meta: RecvMeta,
        handle: DispatchHandle,
        shared_out: torch.Tensor | None = None,
    ) -> PendingCombine:
        """The fused combine: hidden [R, F] (silu(gate) * up of the rows dispatch returned), w_down [E_local, H,
        F] -> each row's hidden @ w_down[e].T times its router weight, stored by the grouped GEMM's epilogue
        into its source's back buffer; combine_wait as after combine_async."""
        from moekit.kernels.grouped_gemm import grouped_gemm
        from moekit.kernels.slot_puts import row_addresses, signal_after

        self.check_combine_inputs(None, handle, shared_out)
        self.check_handle_is_mine(handle)
        F = hidden.shape[1] if hidden.dim() == 2 else -1
        if hidden.shape != (handle.num_rows, F) or hidden.dtype != self.dtype or not _on_device(hidden, self.device):
            raise ValueError(
                f"hidden must be [{handle.num_rows}, F] {self.dtype} on {self.device}, got {hidden.dtype} "
                f"{tuple(hidden.shape)} on {hidden.device}"
            )
        if (
            w_down.shape != (self.num_local_experts, self.hidden, F)
            or w_down.dtype != self.dtype
            or w_down.device != hidden.device
        ):
            raise ValueError(
                f"w_down must be [{self.num_local_experts}, {self.hidden}, {F}] {self.dtype} on {hidden.device} (this "
                f"rank's experts), got {w_down.dtype} {tuple(w_down.shape)} on {w_down.device}"
            )
        signal = self._signals[COMBINE]
        addresses = row_addresses(
            handle.recv_slot_of_row, self._per_peer, self._back_table, signal, self.hidden, self._back.element_size()
        )
        grouped_gemm(hidden, w_down, meta.local_expert_offsets, row_scale=handle.row_weight, row_addresses=addresses)
        signal_after(signal, self._nothing_to_count)
        return PendingCombine(handle, shared_out, (hidden, addresses))

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        from moekit.kernels.peer_puts import reduce_and_copy_to_output, wait_for_all_arrivals

        join(self._comm_stream)
        epoch = self._signals[COMBINE].epoch
        wait_for_all_arrivals(self._flags[COMBINE], epoch)
        T, positions = pending.handle.num_tokens, pending.handle.send_slots
        positions = positions.view(T, positions.numel() // T if T else 0)  # [T, K]: -1 where dropped
        return reduce_and_copy_to_output(self._back, epoch, positions, pending.shared_out, 0)


@DISPATCHERS.register("symmetric_triton_graph")
class SymmetricTritonGraphDispatcher(SymmetricTritonDispatcher):
    """symmetric_triton with fixed shapes and nothing waiting for the host, so dispatch -> experts -> combine
    can be captured in a CUDA graph and replayed (the FlashMoE static-shape setting, for decode).

    dispatch returns all W * E_local * C slots' rows, the bound, of which rows from local_expert_offsets[-1]
    on are padding (src_rank -1, weight 0, values unspecified) that combine never reads; its experts run on
    moekit's grouped GEMM, which reads the device-side offsets (moekit.ep.local_experts). The handle's
    send_counts and recv_counts stay on the device and there is no padding fraction. Overflow can only be
    "drop" (nothing raises inside a graph): last_dropped and last_dropped_total read the device (a sync,
    outside a capture)."""

    name = "symmetric_triton_graph"
    fixed_shapes = True

    def __init__(self, group, num_experts, hidden, max_tokens, dtype, device, *, overflow: str = "drop", **kwargs):
        if overflow != "drop":
            raise ValueError(
                f"overflow must be 'drop' for the {self.name} dispatcher (nothing can raise inside a CUDA graph; "
                f"last_dropped counts the drops), got {overflow!r}"
            )
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device, overflow=overflow, **kwargs)
        self._device_drops = torch.zeros(2, dtype=torch.int64, device=self.device)  # this rank's, the group's

    def _take_stock(self, flags: torch.Tensor, signalled: torch.Tensor) -> tuple[int, tuple]:
        """The bound, and the counts on the device; the drops kept there (flags column 1: each source's)."""
        torch.stack([flags[self.rank, 1], flags[:, 1].sum()], out=self._device_drops)
        step_counts = (signalled[:, PAIRS:].sum(1), flags[:, 1 + PAIRS :].sum(1), None)
        return self.num_slots, step_counts

    def _last_drops(self) -> tuple[int, int]:
        dropped, dropped_total = self._device_drops.tolist()
        return dropped, dropped_total
