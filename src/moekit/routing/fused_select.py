"""fused_select: softmax_topk computed by one fused Triton kernel (moekit.kernels.fused_select)."""

from __future__ import annotations

import torch

from moekit.kernels.availability import triton_support
from moekit.routing.registry import ROUTERS, Routing


@ROUTERS.register("fused_select", supports=triton_support)
def fused_select(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing, as softmax_topk: the K most probable experts and their probabilities."""
    from moekit.kernels.fused_select import fused_select as kernel  # imports triton: only when it runs

    ids, weights = kernel(logits, config.top_k, config.renormalize)
    return Routing(ids, weights)
