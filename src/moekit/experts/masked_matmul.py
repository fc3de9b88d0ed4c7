"""masked_matmul: the routing-mask strategy for small E. Every expert runs on every token; a dense
[T, E] matrix of router weights (zero where a token did not pick the expert) combines the results.
No permutation, E times the FLOPs of the routed computation: worth it only when E is small."""

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.validation import check_routing
from moekit.weights import MoEWeights


def combine_matrix(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_ids, topk_weights [T, K] -> [T, E] (topk_weights' dtype), each token's weight at its experts."""
    T = topk_ids.shape[0]
    dense = topk_weights.new_zeros(T, num_experts)
    return dense.scatter_(1, topk_ids.long(), topk_weights)


@EXPERT_BACKENDS.register("masked_matmul", trains=True)
def masked_matmul(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]: dense expert compute masked by the routing."""
    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    # matmuls in x.dtype; activation and the weighted sum in float32 (or wider), as fused kernels do
    acc = torch.promote_types(x.dtype, torch.float32)
    gate, up = torch.einsum("th,efh->tef", x, weights.w_gate_up).to(acc).chunk(2, dim=-1)
    expert_out = torch.einsum("tef,ehf->teh", (F.silu(gate) * up).to(x.dtype), weights.w_down)
    mask = combine_matrix(topk_ids, topk_weights, num_experts).to(acc)
    return torch.einsum("te,teh->th", mask, expert_out.to(acc)).to(x.dtype)
