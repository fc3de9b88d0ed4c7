"""fused_select: softmax_topk computed by one fused Triton kernel (moekit.kernels.fused_select).

Under autograd the kernel's choice stands and the gradient is softmax_topk's, in torch ops from the logits it
saved: with p = softmax(l), w_k = p[i_k] (over S = sum_k p[i_k] when renormalised) and g = dL/dw,
  dL/dl_j = sum_k c_k p[i_k] (delta(i_k, j) - p_j),   c_k = g_k without renormalisation, (g_k - <g, w>) / S with.
"""

from __future__ import annotations

import torch

from moekit.kernels.availability import triton_support
from moekit.routing.registry import ROUTERS, Routing, score_dtype


def _select(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from moekit.kernels.fused_select import fused_select as kernel  # imports triton: only when it runs

    return kernel(logits, top_k, renormalize)


class _FusedSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, renormalize: bool):
        ids, weights = _select(logits, top_k, renormalize)
        ctx.save_for_backward(logits, ids.long(), weights)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids)
        return ids, weights

    @staticmethod
    def backward(ctx, _, g: torch.Tensor):
        logits, ids, weights = ctx.saved_tensors
        p = torch.softmax(logits.to(score_dtype(logits)), dim=-1)
        chosen = p.gather(1, ids)
        g = g.to(p.dtype)
        if ctx.renormalize:
            g = (g - (g * weights.to(p.dtype)).sum(-1, keepdim=True)) / chosen.sum(-1, keepdim=True)
        c = g * chosen
        d_logits = torch.zeros_like(p).scatter_add_(1, ids, c) - p * c.sum(-1, keepdim=True)
        return d_logits.to(logits.dtype), None, None


@ROUTERS.register("fused_select", supports=triton_support, trains=True)
def fused_select(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing, as softmax_topk: the K most probable experts and their probabilities."""
    if torch.is_grad_enabled() and logits.requires_grad:
        ids, weights = _FusedSelect.apply(logits, config.top_k, config.renormalize)
    else:  # the inference hot path, without autograd's bookkeeping
        ids, weights = _select(logits, config.top_k, config.renormalize)
    return Routing(ids, weights)
