"""naive (level 0): a Python loop over experts with boolean masks. Readable, slow, the reference path
every faster backend's speedup is measured against."""

import torch

from moekit.experts.mlp import swiglu_mlp
from moekit.experts.registry import EXPERT_BACKENDS
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("naive")
def naive(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]: for each expert, select its tokens by mask, run it, add the weighted rows."""
    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in range(num_experts):
        picked = topk_ids == e  # [T, K]; an expert appears at most once per token
        rows = picked.any(dim=1)
        if not bool(rows.any()):
            continue
        token_weight = (topk_weights * picked).sum(dim=1)[rows]
        out = swiglu_mlp(x[rows], weights.w_gate_up[e], weights.w_down[e])
        y[rows] += out.to(acc) * token_weight.to(acc).unsqueeze(1)
    return y.to(x.dtype)
