"""One process plays every rank of a group over one symmetric heap (the device-initiated paths' CPU tests).

SimulatedGroup(W, device).rank(p) is rank p's SymmetricHeap: the i-th buffer rank p allocates is the
i-th of W buffers made on first request, shared by all W ranks, with one address table. Kernels under
TRITON_INTERPRET=1 store through those addresses like GPUs through NVLink-mapped ones. The caller runs
the ranks in lockstep (every rank's sends before any rank's waits): the waits spin until signalled.
"""

from __future__ import annotations

import torch


class SimulatedGroup:
    def __init__(self, world_size: int, device: torch.device | str = "cpu") -> None:
        self.world_size = world_size
        self.device = torch.device(device)
        self._buffers: list[tuple[list[torch.Tensor], torch.Tensor]] = []

    def rank(self, rank: int) -> SimulatedRankHeap:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return SimulatedRankHeap(self, rank)

    def buffer(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        if index == len(self._buffers):
            copies = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.world_size)]
            table = torch.tensor([c.data_ptr() for c in copies], dtype=torch.int64, device=self.device)
            self._buffers.append((copies, table))
        copies, table = self._buffers[index]
        if copies[0].shape != shape or copies[0].dtype != dtype:
            raise ValueError(f"buffer {index} was allocated {tuple(copies[0].shape)} {copies[0].dtype} by another rank")
        return copies, table


class SimulatedRankHeap:
    """Rank `rank` of a SimulatedGroup, as a SymmetricHeap."""

    def __init__(self, group: SimulatedGroup, rank: int) -> None:
        self._group = group
        self.world_size = group.world_size
        self.rank = rank
        self._allocated = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        copies, table = self._group.buffer(self._allocated, tuple(shape), dtype)
        self._allocated += 1
        return copies[self.rank], table

    def barrier(self) -> None:
        """Nothing to wait for: one process, ranks in lockstep."""
