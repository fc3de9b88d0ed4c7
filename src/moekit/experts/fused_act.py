"""fused_act (level 2): the expert loop of level 0 with gate and up as one matmul and SiLU(gate) * up
as one Triton kernel that reads the [n, 2F] projection once (torch needs three passes and two temporaries)."""

import torch

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.kernels.availability import triton_support
from moekit.validation import check_routing
from moekit.weights import MoEWeights


@EXPERT_BACKENDS.register("fused_act", supports=triton_support)
def fused_act(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]."""
    from moekit.kernels.swiglu import swiglu

    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in range(num_experts):
        picked = topk_ids == e
        rows = picked.any(dim=1)
        if not bool(rows.any()):
            continue
        out = swiglu(x[rows] @ weights.w_gate_up[e].T) @ weights.w_down[e].T
        y[rows] += out.to(y.dtype) * (topk_weights * picked).sum(dim=1)[rows].to(y.dtype).unsqueeze(1)
    return y.to(x.dtype)
