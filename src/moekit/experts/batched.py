"""batched (level 1): gather every token's K expert weights and contract with einsum, no Python loop.
Memory grows as T*K*2F*H: it runs out of memory at realistic sizes, which the benchmarks report."""

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("batched", trains=True)
def batched(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H] through per-token weight copies [T, K, 2F, H] and [T, K, H, F]."""
    check_routing(topk_ids, topk_weights, weights.w_gate_up.shape[0])
    ids = topk_ids.long()
    gate, up = torch.einsum("th,tkfh->tkf", x, weights.w_gate_up[ids]).chunk(2, dim=-1)
    out = torch.einsum("tkf,tkhf->tkh", F.silu(gate) * up, weights.w_down[ids])
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.einsum("tk,tkh->th", topk_weights.to(acc), out.to(acc)).to(x.dtype)
