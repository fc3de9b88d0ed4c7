"""Routings that sit exactly at a dispatcher's capacity, or one pair above it: the off-by-one tests.

Every rank p routes `count` tokens, each to experts (0, 1, ..., K-1); with over_rank set, that rank routes
one token more, to experts (0, K, K+1, ..., 2K-2). So on every rank:
  - the tokens sent to rank 0 (the padded layout's count per pair of ranks) and the pairs of expert 0 (the
    symmetric layout's count per (source rank, expert)) are exactly `count`, and `count` + 1 on over_rank for
    that one pair of ranks and that one expert only (every other count is at most `count`, the one-token
    experts K..2K-2 at most 1);
  - a layout that drops above its capacity `count` drops exactly one pair: over_rank's last token's expert 0.
"""

from __future__ import annotations

import torch


def routing_at_capacity(
    world_size: int, num_experts: int, top_k: int, count: int, over_rank: int | None = None, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (topk_ids [T, K] int32, topk_weights [T, K] float32, random in [0.1, 1.1)) on the CPU,
    T = count (count + 1 on over_rank)."""
    if num_experts < 2 * top_k - 1:
        raise ValueError(f"num_experts must be at least 2 * top_k - 1 = {2 * top_k - 1}, got {num_experts}")
    if over_rank is not None and not 0 <= over_rank < world_size:
        raise ValueError(f"over_rank must be None or in [0, {world_size}), got {over_rank}")
    g = torch.Generator().manual_seed(seed)
    at_capacity = list(range(top_k))
    one_over = [0, *range(top_k, 2 * top_k - 1)]
    routings = []
    for p in range(world_size):
        rows = [at_capacity] * count + ([one_over] if p == over_rank else [])
        ids = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), top_k)
        routings.append((ids, torch.rand(ids.shape, generator=g) + 0.1))
    return routings


def kept_pairs(routing: tuple[torch.Tensor, torch.Tensor], dropped: bool) -> torch.Tensor:
    """bool [T, K] of one rank's routing: every pair, less the one a capacity of `count` drops (its last token's
    expert 0) when dropped."""
    kept = torch.ones(routing[0].shape, dtype=torch.bool)
    if dropped:
        kept[-1, 0] = False
    return kept
