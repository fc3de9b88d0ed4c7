"""Symmetric buffers: the same shape on every rank of a group, each rank able to store into the others'.

SymmetricHeap.empty(shape, dtype) returns this rank's buffer and its address table: an int64 tensor [W]
on the buffer's device whose entry q is the address of rank q's copy, valid in this rank's kernels.
Allocation is collective: every rank allocates the same buffers in the same order.

TorchSymmetricHeap uses torch.distributed._symmetric_memory: on one node its buffers are NVLink-mapped
into every rank (NVSHMEM's heap when torch's symmetric-memory backend is set to NVSHMEM, CUDA's IPC
allocations by default), so a plain store to a table address lands in the peer's memory.
CudaIpcHeap serves ranks that share a GPU, which torch's symmetric memory refuses: plain allocations
opened in the peers by CUDA IPC handles (what torch.multiprocessing does to share a CUDA tensor).
moekit.testing.simulated_heap plays every rank of a group in one process, for the CPU tests.
OnSymmetricHeap is what a dispatcher whose Triton kernels store into such buffers has in common.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from moekit.kernels.availability import triton_support
from moekit.registry import Support


class SymmetricHeap(Protocol):
    world_size: int
    rank: int

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's buffer, its address table int64 [W]); contents uninitialised."""
        ...

    def barrier(self) -> None:
        """Returns once every rank's queued work and host code reached this point."""
        ...


class TorchSymmetricHeap:
    """Symmetric memory of torch.distributed._symmetric_memory over a process group (None: the default)."""

    def __init__(self, group, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"symmetric memory lives on CUDA devices, got device {device}")
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as e:  # pragma: no cover - every torch moekit supports has it
            raise RuntimeError("this torch has no torch.distributed._symmetric_memory") from e
        self._symm_mem = symm_mem
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = device

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self._symm_mem.empty(*shape, dtype=dtype, device=self.device)
        handle = self._symm_mem.rendezvous(buffer, self.group)
        return buffer, torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=self.device)

    def barrier(self) -> None:
        torch.cuda.synchronize(self.device)
        dist.barrier(self.group)


class CudaIpcHeap:
    """Ranks of a group (some or all on the same GPU): each buffer a plain allocation whose CUDA IPC handle
    every peer opens. Slower to set up than symmetric memory and meant for ranks sharing a device (tests,
    debugging several ranks on one GPU); the kernels see the same address tables either way."""

    def __init__(self, group, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA IPC shares CUDA buffers, got device {device}")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.device = device
        self._opened: list[torch.UntypedStorage] = []  # the peers' buffers stay mapped while the heap lives

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, buffer.untyped_storage()._share_cuda_(), group=self.group)
        addresses = []
        for q, handle in enumerate(handles):
            if q == self.rank:
                addresses.append(buffer.data_ptr())
                continue
            with torch.cuda.device(handle[0]):
                peer = torch.UntypedStorage._new_shared_cuda(*handle)
            self._opened.append(peer)
            addresses.append(peer.data_ptr())
        return buffer, torch.tensor(addresses, dtype=torch.int64, device=self.device)

    def barrier(self) -> None:
        torch.cuda.synchronize(self.device)
        dist.barrier(self.group)


def ranks_share_a_gpu(group, device: torch.device) -> bool:
    """Whether two ranks of the group compute on the same GPU (collective: every rank must call it)."""
    uuids: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid), group=group)
    return len(set(uuids)) < len(uuids)


class LocalHeap:
    """A group of one rank: plain device buffers (no process group or symmetric memory needed)."""

    world_size = 1
    rank = 0

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer, torch.tensor([buffer.data_ptr()], dtype=torch.int64, device=self.device)

    def barrier(self) -> None:
        """One rank: nothing to wait for."""


class OnSymmetricHeap:
    """Mixin for a Dispatcher whose Triton kernels store into the peers' symmetric buffers: CUDA only, or any
    device with a heap passed in (a simulated group under TRITON_INTERPRET=1 on the CPU), whose world size
    and rank are then the group's. Set self._heap (the one passed, or None) before Dispatcher.__init__."""

    _heap: SymmetricHeap | None

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
        if not ok or self._heap is not None:
            return ok, reason
        return self.supports(world_size, device.type)

    def group_size_and_rank(self, group) -> tuple[int, int]:
        if self._heap is not None:
            return self._heap.world_size, self._heap.rank
        return super().group_size_and_rank(group)

    def default_heap(self) -> SymmetricHeap:
        """The heap passed in, else plain device buffers on one rank, torch's symmetric memory on more (CUDA IPC
        buffers where ranks share a GPU)."""
        if self._heap is None:
            if self.world_size == 1:
                self._heap = LocalHeap(self.device)
            elif ranks_share_a_gpu(self.group, self.device):
                self._heap = CudaIpcHeap(self.group, self.device)
            else:
                self._heap = TorchSymmetricHeap(self.group, self.device)
        return self._heap
