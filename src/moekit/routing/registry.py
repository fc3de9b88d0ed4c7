"""The router registry and the result every router returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.registry import Registry

ROUTERS = Registry("router", guard_training=True)  # fused_select has no backward


@dataclass(frozen=True)
class Routing:
    """topk_ids [T, K] int32 (distinct per token), topk_weights [T, K] float32 (float64 for float64 logits)."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def score_dtype(logits: torch.Tensor) -> torch.dtype:
    """Routers score in float32, or float64 when the logits are float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; among equal scores the lower expert index wins (a stable sort)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]
