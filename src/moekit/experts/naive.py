"""naive (level 0): a Python loop over experts with boolean masks, gate and up as separate matmuls.
Readable and slow: the reference path every faster backend's speedup is measured against."""

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("naive", trains=True)
def naive(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]: for each expert, select its tokens by mask, run it, add the weighted rows."""
    num_experts, two_f, _ = weights.w_gate_up.shape
    check_routing(topk_ids, topk_weights, num_experts)
    ffn = two_f // 2
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in range(num_experts):
        picked = topk_ids == e  # [T, K]; an expert appears at most once per token
        rows = picked.any(dim=1)
        if not bool(rows.any()):
            continue
        tokens = x[rows]
        gate = tokens @ weights.w_gate_up[e, :ffn].T
        up = tokens @ weights.w_gate_up[e, ffn:].T
        out = (F.silu(gate) * up) @ weights.w_down[e].T
        y[rows] += out.to(y.dtype) * (topk_weights * picked).sum(dim=1)[rows].to(y.dtype).unsqueeze(1)
    return y.to(x.dtype)
