"""Routing -> expert-sorted row buffer and back, in torch (a small unpadded batch on CUDA sorts in one Triton
program, moekit.kernels.layout_sort), with no host synchronisation.

Rows are grouped by expert (stable: token order within an expert). With pad_to > 1 each expert's
block starts at a multiple of pad_to, for kernels that want whole tiles per expert; padding rows are
zero. The buffer's row count is a bound known without looking at the data (T*K + E*(pad_to - 1)),
so nothing waits for the device and a forward can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.kernels.availability import triton_on_cuda


@dataclass(frozen=True)
class ExpertLayout:
    """Where each (token, slot) assignment sits in the expert-sorted row buffer.

    sorted_assignments [T*K] int64: flat assignment index t*K + k of the i-th assignment in expert order
    assignment_rows    [T*K] int64: buffer row of each flat assignment
    expert_counts      [E]   int64: assignments per expert
    expert_offsets     [E+1] int64: first buffer row of each expert, then the end of the used rows
    num_tokens T, top_k K; num_rows: rows of the buffer (T*K without padding); pad_to: the block multiple
    sorted_token_ids   [T*K] int64: token index t of the i-th assignment in expert order, computed when asked:
                       a training step keeps its layout until the backward, and the Triton kernels never read it
    """

    sorted_assignments: torch.Tensor
    assignment_rows: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    num_tokens: int
    top_k: int
    num_rows: int
    pad_to: int

    @property
    def sorted_token_ids(self) -> torch.Tensor:
        return self.sorted_assignments // max(self.top_k, 1)


def expert_layout(topk_ids: torch.Tensor, num_experts: int, *, pad_to: int = 1) -> ExpertLayout:
    """topk_ids [T, K] (ids in [0, E), distinct per token) -> ExpertLayout on topk_ids' device."""
    T, K = topk_ids.shape
    # a small batch on CUDA (a decode step) sorts in one Triton program: the torch form is a dozen launches
    # (the ids are integers: float32 only asks whether a Triton kernel runs on that device)
    if pad_to == 1 and triton_on_cuda(topk_ids.device, torch.float32):
        from moekit.kernels.layout_sort import fits_layout_sort, layout_sort

        if fits_layout_sort(T * K, num_experts):
            return ExpertLayout(*layout_sort(topk_ids, num_experts), T, K, T * K, pad_to)
    return expert_layout_torch(topk_ids, num_experts, pad_to=pad_to)


def expert_layout_torch(topk_ids: torch.Tensor, num_experts: int, *, pad_to: int = 1) -> ExpertLayout:
    """expert_layout in torch ops, on any device and batch."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    T, K = topk_ids.shape
    flat = topk_ids.flatten().long()
    # a radix sort makes one pass per key byte: 16-bit keys take 2 passes where int64 takes 8
    keys = flat.to(torch.int16) if num_experts <= torch.iinfo(torch.int16).max else flat
    sorted_experts, sorted_assignments = torch.sort(keys, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    unpadded_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    # the buffer row of the i-th sorted assignment: i itself without padding, else shifted per expert
    sorted_rows = torch.arange(flat.numel(), device=flat.device)
    if pad_to == 1:
        offsets = unpadded_offsets
    else:
        blocks = (counts + pad_to - 1) // pad_to * pad_to
        offsets = torch.cat([counts.new_zeros(1), blocks.cumsum(0)])
        sorted_rows = sorted_rows + (offsets - unpadded_offsets)[sorted_experts.long()]
    assignment_rows = torch.empty_like(sorted_assignments)
    assignment_rows[sorted_assignments] = sorted_rows
    num_rows = T * K + (num_experts * (pad_to - 1) if pad_to > 1 else 0)
    return ExpertLayout(sorted_assignments, assignment_rows, counts, offsets, T, K, num_rows, pad_to)


def permute_tokens(x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """x [T, H] -> rows [num_rows, H] in expert order (padding rows zero)."""
    if layout.pad_to == 1:
        return x.index_select(0, layout.sorted_token_ids)
    rows = x.new_zeros(layout.num_rows, x.shape[1])
    token_of_assignment = torch.arange(layout.assignment_rows.numel(), device=x.device) // layout.top_k
    return rows.index_copy_(0, layout.assignment_rows, x.index_select(0, token_of_assignment))


def unpermute_reduce(rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """rows [num_rows, H] -> y [T, H] = sum_k w[t, k] * row of (t, k) (w = 1 when topk_weights is None),
    accumulated in float32 (or wider) and returned in rows.dtype."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    shape = (layout.num_tokens, layout.top_k, rows.shape[1])
    per_assignment = rows.index_select(0, layout.assignment_rows).view(shape).to(acc)
    if topk_weights is not None:
        per_assignment = per_assignment * topk_weights.to(acc).unsqueeze(-1)
    return per_assignment.sum(dim=1).to(rows.dtype)
