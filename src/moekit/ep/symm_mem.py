"""symm_mem: PyTorch symmetric memory on NVSHMEM, its device-initiated all-to-alls.

Wire format: one row per (token, expert) pair, the pairs sorted by global expert (stable: tokens
ascending), so the send buffer is rank-major and, within a rank, expert-major.
  dispatch: torch.ops.symm_mem.all_to_all_vdev_2d moves the rows (and, in a second call, per-pair
      (source token, router weight bits) int64) into the owner's buffer expert-major: local expert e's rows
      from rank 0, then rank 1, ... contiguous, the layout the grouped expert backends take. The split
      sizes travel on the device; the host reads the received splits once, to size recv_x.
  combine: the receiver weighs its rows and all_to_all_vdev_2d_offset sends them back (its input split
      and offsets are the dispatch's output ones), landing in the source's send order; the source sums
      each token's pairs in float32 (+ shared_out).
Needs CUDA, NVSHMEM and a group of 2 ranks or more, each on its own GPU (NVSHMEM's rendezvous refuses one
rank, probed on torch 2.11; its teams abort several processes on one GPU without MPS, refused here first
with a ValueError); sets torch's symmetric-memory backend to NVSHMEM. Buffers are allocated once (on the
first call, when K is known) for max_tokens; the buffers peers write into are kept in a ring of 3 like the
nvshmem_triton path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.ep.base import Dispatcher, weight_bits, weights_of_bits
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS
from moekit.ep.symmetric_heap import ranks_share_a_gpu
from moekit.registry import Support

RING = 3


@dataclass(frozen=True)
class SymmMemHandle(DispatchHandle):
    """DispatchHandle plus the dispatch's received splits and offsets [2, E_local * W] (the way back's input)
    and the source token of each sent pair [P]."""

    received_splits_offsets: torch.Tensor = None
    token_of_pair: torch.Tensor = None


@dataclass
class PendingDispatch:
    ring: int
    token_of_pair: torch.Tensor  # [P]: source token of each sent pair, in send order
    send_counts: torch.Tensor  # [W] int64: pairs to each rank
    num_tokens: int


@dataclass
class PendingCombine:
    handle: SymmMemHandle
    back: torch.Tensor  # [P, H]: the weighted rows, back in send order
    shared_out: torch.Tensor | None


@DISPATCHERS.register("symm_mem")
class SymmMemDispatcher(Dispatcher):
    """all_to_all_vdev_2d out, all_to_all_vdev_2d_offset back (NVSHMEM, device-side splits)."""

    name = "symm_mem"
    rows_on_the_wire = "pair"

    def __init__(self, group, num_experts, hidden, max_tokens, dtype, device):
        super().__init__(group, num_experts, hidden, max_tokens, dtype, device)
        import torch.distributed._symmetric_memory as symm_mem

        self._group = group if group is not None else dist.group.WORLD
        if ranks_share_a_gpu(self._group, self.device):
            raise ValueError(
                "symm_mem: ranks of this group share a GPU, and NVSHMEM's teams refuse several processes on one GPU; "
                "use nvshmem_triton, padded_triton or nccl for such a group"
            )
        if symm_mem.get_backend(self.device) != "NVSHMEM":
            symm_mem.set_backend("NVSHMEM")  # raises if another backend already allocated in this process
        self._symm_mem = symm_mem
        self._group_name = self._group.group_name
        self._top_k: int | None = None
        self._dispatches = 0
        self._combines = 0

    @classmethod
    def supports(cls, world_size: int, device_type: str) -> Support:
        if device_type != "cuda":
            return False, "NVSHMEM symmetric memory needs CUDA"
        if world_size < 2:
            return False, "NVSHMEM's rendezvous refuses a group of one rank"
        try:
            from torch.distributed._symmetric_memory import is_nvshmem_available
        except ImportError:
            return False, "this torch has no torch.distributed._symmetric_memory"
        if not is_nvshmem_available():
            return False, "NVSHMEM is not available to this torch"
        return True, ""

    def _empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._symm_mem.empty(*shape, dtype=dtype, device=self.device)
        self._symm_mem.rendezvous(buffer, self._group)
        return buffer

    def _buffers(self, top_k: int) -> None:
        """Every symmetric buffer, allocated (collectively) on the first call."""
        self.check_top_k_unchanged(top_k, self._top_k)
        if self._top_k is not None:
            return
        W, E_local, H = self.world_size, self.num_local_experts, self.hidden
        sent = max(1, self.max_tokens * top_k)
        received = max(1, W * self.max_tokens * min(top_k, E_local))
        self._send_rows = self._empty(sent, H, dtype=self.dtype)
        self._send_meta = self._empty(sent, 2, dtype=torch.int64)
        self._send_splits = self._empty(W * E_local, dtype=torch.int64)
        self._recv_rows = [self._empty(received, H, dtype=self.dtype) for _ in range(RING)]
        self._recv_meta = [self._empty(received, 2, dtype=torch.int64) for _ in range(RING)]
        self._recv_splits = [self._empty(2, E_local * W, dtype=torch.int64) for _ in range(RING)]
        self._meta_splits = [self._empty(2, E_local * W, dtype=torch.int64) for _ in range(RING)]
        self._back_send = self._empty(received, H, dtype=self.dtype)
        self._back_splits_in = self._empty(2, E_local * W, dtype=torch.int64)
        self._back_rows = [self._empty(sent, H, dtype=self.dtype) for _ in range(RING)]
        self._back_splits = [self._empty(2, W * E_local, dtype=torch.int64) for _ in range(RING)]
        self._top_k = top_k

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        T, K = topk_ids.shape
        self._buffers(K)
        ring = self._dispatches % RING
        self._dispatches += 1
        expert = topk_ids.reshape(-1).long()
        order = torch.sort(expert, stable=True)[1]  # pair order on the wire: global expert, then token
        token_of_pair = order // K
        P = order.numel()
        self._send_rows[:P].copy_(x.index_select(0, token_of_pair))
        bits = weight_bits(topk_weights.reshape(-1)[order], self.weight_dtype)
        self._send_meta[:P].copy_(torch.stack([token_of_pair, bits], dim=1))
        splits = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        self._send_splits.copy_(splits.scatter_add_(0, expert, torch.ones_like(expert)))
        a2a = torch.ops.symm_mem.all_to_all_vdev_2d
        a2a(self._send_rows, self._recv_rows[ring], self._send_splits, self._recv_splits[ring], self._group_name)
        a2a(self._send_meta, self._recv_meta[ring], self._send_splits, self._meta_splits[ring], self._group_name)
        send_counts = self._send_splits.view(self.world_size, self.num_local_experts).sum(1)
        return PendingDispatch(ring, token_of_pair, send_counts, T)

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor, RecvMeta, SymmMemHandle]:
        W, E_local, device = self.world_size, self.num_local_experts, self.device
        received = self._recv_splits[pending.ring].clone()  # the next dispatch reuses the buffer
        splits = received[0].cpu()  # the one host wait: [E_local * W], local expert-major
        R = int(splits.sum())
        recv_x = self._recv_rows[pending.ring][:R].clone()
        meta_rows = self._recv_meta[pending.ring][:R]
        src_of_chunk = torch.arange(W, device=device).repeat(E_local)
        src_rank = torch.repeat_interleave(src_of_chunk, received[0], output_size=R)
        weight = weights_of_bits(meta_rows[:, 1], self.weight_dtype)
        local_counts = splits.view(E_local, W).sum(1).to(device)
        meta = RecvMeta(
            local_counts,
            torch.cat([local_counts.new_zeros(1), local_counts.cumsum(0)]),
            src_rank,
            meta_rows[:, 0].clone(),
            weight,
        )
        P = pending.token_of_pair.numel()
        rows = torch.arange(R, device=device)
        handle = SymmMemHandle(
            send_counts=pending.send_counts.cpu(),
            recv_counts=splits.view(E_local, W).sum(0),
            send_token_idx=pending.token_of_pair,
            send_slots=torch.arange(P, device=device),
            recv_slot_of_row=rows,
            row_weight=weight,
            num_send_slots=P,
            num_recv_slots=R,
            num_tokens=pending.num_tokens,
            hidden=self.hidden,
            received_splits_offsets=received,
            token_of_pair=pending.token_of_pair,
        )
        return recv_x, meta, handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        self.check_combine_inputs(expert_out, handle, shared_out)
        if not isinstance(handle, SymmMemHandle):
            raise ValueError("handle comes from another dispatcher; pass the one this symm_mem dispatcher returned")
        ring = self._combines % RING
        self._combines += 1
        R = handle.num_rows
        weighted = expert_out.to(self.accumulate_dtype) * handle.row_weight.to(self.accumulate_dtype)[:, None]
        self._back_send[:R].copy_(weighted)
        self._back_splits_in.copy_(handle.received_splits_offsets)
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(
            self._back_send, self._back_rows[ring], self._back_splits_in, self._back_splits[ring], self._group_name
        )
        return PendingCombine(handle, self._back_rows[ring][: handle.num_send_slots], shared_out)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        """The back rows arrive in send order (stream-ordered: nothing to wait for on the host)."""
        return self.gather_back(pending.back, pending.handle, pending.shared_out)
