"""Load statistics of a routing: tokens per expert, imbalance, and tokens dropped by a capacity."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoadStats:
    """tokens_per_expert [E] int64; max_over_mean and cv (std / mean, population std) of it;
    dropped: assignments over the per-expert capacity (0 without one). With no assignments at all,
    max_over_mean is 1.0 and cv 0.0 (nothing is imbalanced)."""

    tokens_per_expert: torch.Tensor
    max_over_mean: float
    cv: float
    dropped: int
    capacity: int | None

    def as_dict(self) -> dict:
        return {
            "max_over_mean": self.max_over_mean,
            "cv": self.cv,
            "dropped": self.dropped,
            "capacity": self.capacity,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
        }


def tokens_per_expert(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_ids [T, K] -> [E] int64 counts of assignments per expert (on topk_ids' device)."""
    return torch.bincount(topk_ids.flatten().long(), minlength=num_experts)


def load_stats(topk_ids: torch.Tensor, num_experts: int, capacity: int | None = None) -> LoadStats:
    """Statistics of topk_ids [T, K]; capacity: most assignments one expert keeps (None: unlimited)."""
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
    counts = tokens_per_expert(topk_ids, num_experts)
    as_float = counts.double()
    mean = as_float.mean()
    if float(mean) == 0.0:
        max_over_mean, cv = 1.0, 0.0
    else:
        max_over_mean = float(as_float.max() / mean)
        cv = float(as_float.std(correction=0) / mean)
    dropped = 0 if capacity is None else int((counts - capacity).clamp(min=0).sum())
    return LoadStats(counts.cpu(), max_over_mean, cv, dropped, capacity)
