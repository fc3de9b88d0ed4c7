"""cuda_graph_fp8: triton_grouped_fp8 captured once per shape in a CUDA graph and replayed (cuda_graph's
machinery), so a decode step pays one graph launch for the quantizing permute, the two FP8 GEMMs and the
unpermute. Both schemes; torch._scaled_grouped_mm is not the captured path (rowwise only, and slower than
triton_grouped_fp8 where measured: see the issue #22 note)."""

import torch

from moekit.experts.cuda_graph import cuda_graph_support, replay_captured
from moekit.experts.registry import FP8_EXPERT_BACKENDS
from moekit.experts.triton_grouped import sixteen
from moekit.experts.triton_grouped_fp8 import check_fp8_weights, triton_fp8_support, triton_grouped_fp8
from moekit.validation import check_routing


def cuda_graph_fp8_support(device: torch.device, dtype: torch.dtype, scheme: str) -> tuple[bool, str]:
    ok, reason = cuda_graph_support(device, dtype)
    return triton_fp8_support(device, dtype, scheme) if ok else (ok, reason)


@FP8_EXPERT_BACKENDS.register("cuda_graph_fp8", supports=cuda_graph_fp8_support, size_multiple=sixteen)
def cuda_graph_fp8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights):
    """x [T, H] -> y [T, H] (a new tensor); the weights must not be reallocated between calls."""
    check_fp8_weights(x, weights)
    check_routing(topk_ids, topk_weights, weights.w_gate_up.shape[0])
    tensors = [t for w in (weights.w_gate_up, weights.w_down) for t in (w.values, w.scale)]
    return replay_captured(triton_grouped_fp8, x, topk_ids, topk_weights, weights, tensors)
