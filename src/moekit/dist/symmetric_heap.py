"""Symmetric buffers: the same shape on every rank of a group, each rank able to store into the others'.

SymmetricHeap.empty(shape, dtype) returns this rank's buffer and its address table: an int64 tensor [W]
on the buffer's device whose entry q is the address of rank q's copy, valid in this rank's kernels.
Allocation is collective: every rank allocates the same buffers in the same order.

TorchSymmetricHeap uses torch.distributed._symmetric_memory: on one node its buffers are NVLink-mapped
into every rank (NVSHMEM's heap when torch's symmetric-memory backend is set to NVSHMEM, CUDA's IPC
allocations by default), so a plain store to a table address lands in the peer's memory.
moekit.testing.simulated_heap plays every rank of a group in one process, for the CPU tests.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


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

