"""Routing -> expert-sorted layout and back (torch; no host synchronisation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Where each (token, slot) assignment sits once rows are sorted by expert (stable in token order).

    sorted_assignments [T*K] int64: flat assignment index t*K + k of each sorted row
    sorted_token_ids   [T*K] int64: token index t of each sorted row
    inverse            [T*K] int64: sorted row of each flat assignment (sorted_assignments inverted)
    expert_counts      [E]   int64: rows per expert
    expert_offsets     [E+1] int64: first row of each expert, then T*K
    """

    sorted_assignments: torch.Tensor
    sorted_token_ids: torch.Tensor
    inverse: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor


def expert_layout(topk_ids: torch.Tensor, num_experts: int) -> ExpertLayout:
    """topk_ids [T, K] (ids in [0, E), distinct per token) -> ExpertLayout, on topk_ids' device."""
    flat = topk_ids.flatten().long()
    sorted_assignments = torch.sort(flat, stable=True)[1]
    inverse = torch.empty_like(sorted_assignments)
    inverse[sorted_assignments] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ExpertLayout(sorted_assignments, sorted_assignments // max(topk_ids.shape[1], 1), inverse, counts, offsets)


def permute_tokens(x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """x [T, H] -> rows [T*K, H] in expert order (row i is x[layout.sorted_token_ids[i]])."""
    return x.index_select(0, layout.sorted_token_ids)


def unpermute_reduce(rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """rows [T*K, H] in expert order, topk_weights [T, K] -> y [T, H] = sum_k w[t, k] * row of (t, k),
    accumulated in float32 and returned in rows.dtype."""
    T, K = topk_weights.shape
    per_assignment = rows.index_select(0, layout.inverse).view(T, K, rows.shape[1]).float()
    return (per_assignment * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(rows.dtype)
