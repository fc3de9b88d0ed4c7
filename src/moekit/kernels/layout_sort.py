"""layout_sort: the unpadded expert-sorted layout (moekit.permute.expert_layout) of a small batch in one Triton
program, where torch takes a dozen launches (a cast, a radix sort's passes, a scatter-add, a cumsum, a scatter).

A decode step routes a few hundred assignments at most, and its layout is launch-bound: on an H200 the torch form
took 19-35 us of a 190-450 us FP8 decode forward. The program loads all N = T*K expert ids, sorts the keys
e * BLOCK + i (one bitonic sort: the expert first, then the assignment index, so the order is stable), takes the
per-expert counts by a histogram and the offsets by their cumsum, and scatters each assignment's buffer row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program holds every assignment: BLOCK int32 keys in registers; past this moekit.permute sorts with torch.
MAX_ASSIGNMENTS = 4096
MAX_EXPERTS = 1024


@triton.jit
def _layout_sort_kernel(
    ids_ptr, sorted_ptr, rows_ptr, counts_ptr, offsets_ptr, N, E, BLOCK: tl.constexpr, BINS: tl.constexpr
):
    i = tl.arange(0, BLOCK)
    valid = i < N
    expert = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)
    key = tl.where(valid, expert * BLOCK + i, BINS * BLOCK + i)  # lanes past N sort last
    assignment = tl.sort(key, 0) % BLOCK
    tl.store(sorted_ptr + i, assignment.to(tl.int64), mask=valid)
    tl.store(rows_ptr + assignment, i.to(tl.int64), mask=valid)  # unpadded: the i-th sorted row is row i
    bins = tl.arange(0, BINS)
    counts = tl.histogram(expert, BINS) - tl.where(bins == 0, BLOCK - N, 0)  # lanes past N loaded expert 0
    ends = tl.cumsum(counts, 0)
    tl.store(counts_ptr + bins, counts.to(tl.int64), mask=bins < E)
    tl.store(offsets_ptr + bins, (ends - counts).to(tl.int64), mask=bins < E)
    tl.store(offsets_ptr + E, tl.sum(counts).to(tl.int64))  # N (a scalar argument may arrive as a Python int)


def fits_layout_sort(num_assignments: int, num_experts: int) -> bool:
    """Whether one layout_sort program takes num_assignments ids of num_experts experts."""
    return 0 < num_assignments <= MAX_ASSIGNMENTS and 0 < num_experts <= MAX_EXPERTS


def layout_sort(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] integer ids in [0, E) with fits_layout_sort(T*K, E) -> (sorted_assignments [T*K],
    assignment_rows [T*K], expert_counts [E], expert_offsets [E + 1]), int64, as moekit.permute.expert_layout
    computes them without padding. No host synchronisation."""
    n = topk_ids.numel()
    if not fits_layout_sort(n, num_experts):
        raise ValueError(f"layout_sort takes 1..{MAX_ASSIGNMENTS} assignments of 1..{MAX_EXPERTS} experts, got "
                         f"{n} of {num_experts}")  # fmt: skip
    ids = topk_ids.reshape(-1)
    sorted_assignments, assignment_rows = (torch.empty(n, dtype=torch.int64, device=ids.device) for _ in range(2))
    counts = torch.empty(num_experts, dtype=torch.int64, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=ids.device)
    block = max(16, triton.next_power_of_2(n))
    _layout_sort_kernel[(1,)](
        ids, sorted_assignments, assignment_rows, counts, offsets, n, num_experts,
        BLOCK=block, BINS=max(16, triton.next_power_of_2(num_experts)), num_warps=min(16, max(4, block // 256)),
    )  # fmt: skip
    return sorted_assignments, assignment_rows, counts, offsets
