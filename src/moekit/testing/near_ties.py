"""Which tokens a router may route differently from the float64 oracle by rounding alone."""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.reference import ReferenceRouting


def ambiguous_tokens(ref: ReferenceRouting, config: MoEConfig, eps: float) -> torch.Tensor:
    """[T] bool: tokens whose K-th and (K+1)-th best candidate (or whose kept and dropped groups, for
    grouped_topk) score within eps of each other, so a rounding difference may change the choice; with
    eps > 0 also tokens two of whose chosen experts do, whose order in topk_ids rounding may swap (float32
    probabilities that underflow to equal zeros go to the lower index, their float64 values need not)."""
    scores = ref.selection_scores
    T, E = scores.shape
    ambiguous = torch.zeros(T, dtype=torch.bool)
    if config.router == "grouped_topk":
        per_group = scores.view(T, config.n_group, config.experts_per_group)
        group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
        ranked = group_scores.sort(dim=1, descending=True).values
        if config.topk_group < config.n_group:
            ambiguous |= (ranked[:, config.topk_group - 1] - ranked[:, config.topk_group]).abs() <= eps
    chosen = scores.gather(1, ref.topk_ids)
    if eps > 0 and config.top_k > 1:
        ambiguous |= ((chosen[:, :-1] - chosen[:, 1:]).abs() <= eps).any(dim=1)
    if config.top_k < E:
        masked = scores.scatter(1, ref.topk_ids, float("-inf"))
        if config.router == "grouped_topk":  # only experts of kept groups compete
            kept = torch.zeros(T, E, dtype=torch.bool)
            for t in range(T):
                kept_groups = set((ref.topk_ids[t] // config.experts_per_group).tolist())
                for g in kept_groups:
                    kept[t, g * config.experts_per_group : (g + 1) * config.experts_per_group] = True
            masked = masked.masked_fill(~kept, float("-inf"))
        runner_up = masked.max(dim=1).values
        ambiguous |= (chosen.min(dim=1).values - runner_up).abs() <= eps
    return ambiguous
