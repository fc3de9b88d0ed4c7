"""memeff (level 3): no avoidable intermediates. Tokens are sorted by expert once (no per-expert mask
over all T*K assignments), each expert's gate+up and down projections write into buffers allocated
once for the largest expert, the activation runs in place, and the weighted rows are index_add_-ed."""

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("memeff")
def memeff(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]."""
    num_experts, two_f, hidden = weights.w_gate_up.shape
    check_routing(topk_ids, topk_weights, num_experts)
    ffn = two_f // 2
    flat_experts = topk_ids.flatten().long()
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    tokens_sorted = order // max(topk_ids.shape[1], 1)
    acc = torch.promote_types(x.dtype, torch.float32)
    weights_sorted = topk_weights.flatten()[order].to(acc).unsqueeze(1)
    gate_up = x.new_empty(max(counts, default=0), two_f)
    out = x.new_empty(max(counts, default=0), hidden)
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = tokens_sorted[start : start + n]
        torch.mm(x.index_select(0, idx), weights.w_gate_up[e].T, out=gate_up[:n])
        gate, up = gate_up[:n, :ffn], gate_up[:n, ffn:]
        F.silu(gate, inplace=True).mul_(up)
        torch.mm(gate, weights.w_down[e].T, out=out[:n])
        y.index_add_(0, idx, out[:n].to(acc).mul_(weights_sorted[start : start + n]))
        start += n
    return y.to(x.dtype)
