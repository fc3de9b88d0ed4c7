"""grouped_loop (level 4): tokens permuted once into an expert-sorted buffer, one matmul per expert on
its contiguous slice (no per-expert gather or scatter), one weighted unpermute at the end."""

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.permute import expert_layout, permute_tokens, unpermute_reduce
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("grouped_loop")
def grouped_loop(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]; reads the expert offsets on the host (one synchronisation)."""
    num_experts, two_f, hidden = weights.w_gate_up.shape
    check_routing(topk_ids, topk_weights, num_experts)
    ffn = two_f // 2
    layout = expert_layout(topk_ids, num_experts)
    rows = permute_tokens(x, layout)
    gate_up = rows.new_empty(rows.shape[0], two_f)
    out = rows.new_empty(rows.shape[0], hidden)
    offsets = layout.expert_offsets.tolist()
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        torch.mm(rows[start:end], weights.w_gate_up[e].T, out=gate_up[start:end])
        gate = gate_up[start:end, :ffn]
        F.silu(gate, inplace=True).mul_(gate_up[start:end, ffn:])
        torch.mm(gate, weights.w_down[e].T, out=out[start:end])
    return unpermute_reduce(out, layout, topk_weights)
