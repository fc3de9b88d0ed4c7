"""nvshmem_triton: device-initiated dispatch and combine, Triton kernels storing into symmetric memory.

Wire format (moekit.kernels.peer_puts): rank p puts its j-th token for rank q (tokens ascending, each
token once per destination rank) at row p * max_tokens + j of q's receive buffer [W * max_tokens, H],
with its metadata (token index, K global expert ids, K router weights as float32 bits) beside it, then
signals q with (epoch, tokens, pairs per local expert of q): no count exchange or offset agreement comes before the rows. The
receiver waits for every source's signal, reads the counts (the host waits here, to size the expanded
rows) and expands the tokens to one row per (token, local expert), grouped by local expert. Combine
sums each received token's weighted expert rows and stores the sum at row q * max_tokens + j of the
source's back buffer, signals, and the source sums its rows from every rank (+ the shared expert) in
float32 into y: no rows are staged in send buffers on either leg.

Buffers are allocated once, collectively, for max_tokens (the metadata on the first call, when K is
known) and kept in a ring of 3 per stage, indexed by the call's epoch: a rank may store its next step's
rows while a slower peer still reads the last one's. That holds for the order ep_forward keeps (at most
one dispatch and one combine in flight; dispatch_wait(i) before dispatch_async(i + 1); combine_wait(i)
before dispatch_async(i + 3)). The memory: by default torch's symmetric memory (moekit.dist.symmetric_heap;
NVLink-mapped, NVSHMEM's heap when torch's backend is NVSHMEM), plain device buffers on one rank, or a
heap passed in (the CPU tests play every rank of a group in one process under TRITON_INTERPRET=1).
The stores are plain Triton stores to mapped peer addresses, not nvshmem_putmem calls: the per-token put
kernel measured ~300 GB/s on 2x H200 (../shared/device/MEASURED.md), and the mapped stores let one
program move several tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.dist.base import Dispatcher, _require_int
from moekit.dist.handle import DispatchHandle, RecvMeta
from moekit.dist.registry import DISPATCHERS
from moekit.dist.symmetric_heap import LocalHeap, SymmetricHeap, TorchSymmetricHeap, offset_table
from moekit.kernels.availability import triton_support
from moekit.registry import Support

RING = 3  # buffers per stage; see the module docstring for why three
DISPATCH, COMBINE = 0, 1


@dataclass(frozen=True)
class PeerDispatchHandle(DispatchHandle):
    """DispatchHandle plus what the combine kernels take. V = tokens this rank received.

    dest_pos      int32 [T, W]: row of token t among this rank's tokens for rank q, -1 if not sent there
    slot_of_token int64 [V]: src * max_tokens + j of each received token
    rows_by_slot  int64 [R]: expanded rows sorted by received token; row_start int64 [V + 1] bounds them
    back_counts   int32 [W, 1]: tokens going back to each rank (= recv_counts)
    """

    dest_pos: torch.Tensor = field(default=None)
    slot_of_token: torch.Tensor = field(default=None)
    rows_by_slot: torch.Tensor = field(default=None)
    row_start: torch.Tensor = field(default=None)
    back_counts: torch.Tensor = field(default=None)


@dataclass
class PendingDispatch:
    epoch: int
    dest_pos: torch.Tensor  # int32 [T, W]
    send_counts: torch.Tensor  # int32 [W], on the device
    num_tokens: int


@dataclass
class PendingCombine:
    epoch: int
    handle: PeerDispatchHandle
    shared_out: torch.Tensor | None


@DISPATCHERS.register("nvshmem_triton")
class NvshmemTritonDispatcher(Dispatcher):
    """Triton kernels store rows into the peers' symmetric buffers and signal; no collective on the data path."""

    name = "nvshmem_triton"

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
        if self._heap is None:
            self._heap = LocalHeap(self.device) if self.world_size == 1 else TorchSymmetricHeap(group, self.device)
        self._rows = self.world_size * max(1, max_tokens)  # per ring slot: max_tokens from each rank
        self._recv, self._recv_tables = self._ring((self._rows, hidden), dtype)
        self._back, self._back_tables = self._ring((self._rows, hidden), dtype)
        self._flag_width = 2 + self.num_local_experts  # epoch, tokens, pairs per local expert
        flags = [self._ring((self.world_size, self._flag_width), torch.int32) for _stage in (DISPATCH, COMBINE)]
        self._flags = [buffer.zero_() for buffer, _ in flags]  # per stage [RING, W, flag_width]
        self._flag_tables = [tables for _, tables in flags]
        self._done = torch.zeros(2, dtype=torch.int32, device=self.device)
        self._meta: torch.Tensor | None = None
        self._meta_tables: list[torch.Tensor] = []
        self._top_k: int | None = None
        self._epochs = [0, 0]
        self._heap.barrier()  # every rank's flags are zero before anyone signals

    @classmethod
    def supports(cls, world_size: int, device_type: str) -> Support:
        if device_type != "cuda":
            return False, (
                "needs CUDA symmetric memory; on the CPU its kernels run under TRITON_INTERPRET=1 with every "
                "rank in one process (moekit.testing.simulated_heap)"
            )
        return True, ""

    def supported_here(self, world_size: int, device: torch.device, dtype: torch.dtype) -> Support:
        ok, reason = triton_support(device, dtype)
        if not ok:
            return ok, reason
        if self._heap is not None:
            return True, ""
        return self.supports(world_size, device.type)

    def group_size_and_rank(self, group) -> tuple[int, int]:
        if self._heap is not None:
            return self._heap.world_size, self._heap.rank
        return super().group_size_and_rank(group)

    def _ring(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A symmetric buffer [RING, *shape] (allocated collectively) and the address table of each ring slot."""
        buffer, table = self._heap.empty((RING, *shape), dtype)
        slot_bytes = buffer[0].numel() * buffer.element_size()
        return buffer, [offset_table(table, r * slot_bytes) for r in range(RING)]

    def _meta_buffers(self, top_k: int) -> torch.Tensor:
        """The metadata ring [RING, W * max_tokens, 1 + 2K] int32, allocated (collectively) on the first call."""
        if self._top_k is None:
            self._meta, self._meta_tables = self._ring((self._rows, 1 + 2 * top_k), torch.int32)
            self._top_k = top_k
        elif top_k != self._top_k:
            raise ValueError(
                f"topk_ids has {top_k} columns; this nvshmem_triton dispatcher was set up for top_k={self._top_k} "
                "on its first call (its metadata buffers are symmetric): make another for another top_k"
            )
        return self._meta

    def _next_epoch(self, stage: int) -> tuple[int, int]:
        self._epochs[stage] += 1
        return self._epochs[stage], self._epochs[stage] % RING

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        from moekit.kernels.peer_puts import send_tokens

        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        T, K = topk_ids.shape
        self._meta_buffers(K)
        goes = torch.zeros(T, self.world_size, dtype=torch.bool, device=x.device)
        goes.scatter_(1, topk_ids.long() // self.num_local_experts, True)
        dest_pos = (goes.cumsum(0, dtype=torch.int32) - 1).masked_fill_(~goes, -1)
        send_counts = goes.sum(0, dtype=torch.int32)
        pairs = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        pairs.scatter_add_(0, topk_ids.reshape(-1).long(), torch.ones_like(topk_ids, dtype=torch.int32).reshape(-1))
        flag_counts = torch.cat([send_counts[:, None], pairs.view(self.world_size, self.num_local_experts)], dim=1)
        weight_bits = topk_weights.to(torch.float32).contiguous().view(torch.int32)
        token = torch.arange(T, dtype=torch.int32, device=x.device)[:, None]
        meta = torch.cat([token, topk_ids.to(torch.int32), weight_bits], dim=1)
        epoch, r = self._next_epoch(DISPATCH)
        send_tokens(
            x if x.stride(1) == 1 else x.contiguous(), meta, dest_pos, flag_counts,
            self._recv_tables[r], self._meta_tables[r], self._flag_tables[DISPATCH][r], self._done[DISPATCH:],
            self.rank, self.max_tokens, epoch, self._flag_width, self.tokens_per_program,
        )  # fmt: skip
        return PendingDispatch(epoch, dest_pos, send_counts, T)

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, PeerDispatchHandle]:
        """Waits for every source rank's signal; the host then reads the counts once (they size the rows)
        and every other step runs on the device without waiting."""
        from moekit.kernels.peer_puts import wait_for_all_arrivals

        r, W, M, E_local, device = pending.epoch % RING, self.world_size, self.max_tokens, self.num_local_experts, self.device
        flags = self._flags[DISPATCH][r]
        wait_for_all_arrivals(flags, pending.epoch)
        counts = flags[:, 1:].clone()  # [W, 1 + E_local]: tokens, then pairs per local expert, from each source
        on_host = torch.cat([counts.reshape(-1), pending.send_counts]).long().cpu()  # the one host wait
        received = on_host[: W * (1 + E_local)].view(W, 1 + E_local)
        recv_counts, local_counts = received[:, 0], received[:, 1:].sum(0)
        send_counts = on_host[W * (1 + E_local) :]
        V, R, S, T = int(recv_counts.sum()), int(local_counts.sum()), int(send_counts.sum()), pending.num_tokens

        # received tokens, source-major: token v came from src_of_token[v], row j of that source's rows
        tokens_from = counts[:, 0].long()
        src_of_token = torch.repeat_interleave(torch.arange(W, device=device), tokens_from, output_size=V)
        j = torch.arange(V, device=device) - (torch.cumsum(tokens_from, 0) - tokens_from)[src_of_token]
        slot_of_token = src_of_token * M + j
        meta = self._meta[r].index_select(0, slot_of_token)  # int32 [V, 1 + 2K]
        K = (meta.shape[1] - 1) // 2
        # one row per (token, local expert): sort keys (expert, token, k), the R valid ones first
        local = meta[:, 1 : 1 + K].long() - self.expert_start
        valid = (local >= 0) & (local < E_local)
        pair = torch.arange(V * K, device=device).view(V, K)
        keys = torch.where(valid, local * (V * K) + pair, torch.iinfo(torch.int64).max).reshape(-1)
        keys = torch.sort(keys)[0][:R]
        token_of_row, k_of_row = (keys % (V * K)) // K, keys % K
        weight = meta[token_of_row, 1 + K + k_of_row].view(torch.float32)
        local_counts = local_counts.to(device)
        recv_meta = RecvMeta(
            local_counts,
            torch.cat([local_counts.new_zeros(1), local_counts.cumsum(0)]),
            src_of_token[token_of_row],
            meta[token_of_row, 0].long(),
            weight,
        )
        recv_x = self._recv[r].index_select(0, slot_of_token[token_of_row])  # a copy: the ring turns
        rows_per_token = valid.sum(1)
        # this rank's sends, destination-major (the handle's common fields)
        goes = pending.dest_pos.T >= 0  # [W, T]
        send_keys = torch.where(goes, torch.arange(W * T, device=device).view(W, T), torch.iinfo(torch.int64).max)
        send_keys = torch.sort(send_keys.reshape(-1))[0][:S]
        send_dest, send_token_idx = send_keys // max(T, 1), send_keys % max(T, 1)
        handle = PeerDispatchHandle(
            send_counts=send_counts,
            recv_counts=recv_counts,
            send_token_idx=send_token_idx,
            send_slots=send_dest * M + pending.dest_pos[send_token_idx, send_dest].long(),
            recv_slot_of_row=token_of_row,
            row_weight=weight,
            num_send_slots=W * M,
            num_recv_slots=V,
            num_tokens=T,
            hidden=self.hidden,
            dest_pos=pending.dest_pos,
            slot_of_token=slot_of_token,
            rows_by_slot=torch.sort(token_of_row, stable=True)[1],
            row_start=torch.cat([rows_per_token.new_zeros(1), rows_per_token.cumsum(0)]),
            back_counts=counts[:, :1].contiguous(),
        )
        return recv_x, recv_meta, handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        from moekit.kernels.peer_puts import send_tokens_back

        self.check_combine_inputs(expert_out, handle, shared_out)
        if not isinstance(handle, PeerDispatchHandle) or handle.dest_pos.shape[1] != self.world_size:
            raise ValueError("handle comes from another dispatcher; pass the one this nvshmem_triton dispatcher returned")
        expert_out = expert_out.to(self.dtype)
        epoch, r = self._next_epoch(COMBINE)
        send_tokens_back(
            expert_out if expert_out.stride(1) == 1 else expert_out.contiguous(), handle.row_weight,
            handle.rows_by_slot, handle.row_start, handle.slot_of_token, handle.back_counts,
            self._back_tables[r], self._flag_tables[COMBINE][r], self._done[COMBINE:],
            self.rank, self.max_tokens, epoch, self._flag_width,
        )  # fmt: skip
        return PendingCombine(epoch, handle, shared_out)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        from moekit.kernels.peer_puts import reduce_and_copy_to_output, wait_for_all_arrivals

        r = pending.epoch % RING
        wait_for_all_arrivals(self._flags[COMBINE][r], pending.epoch)
        return reduce_and_copy_to_output(self._back[r], pending.handle.dest_pos, pending.shared_out, self.max_tokens)
