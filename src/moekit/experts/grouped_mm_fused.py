"""grouped_mm_fused (level 5b): the two torch._grouped_mm GEMMs of level 5, with moekit's Triton kernels for
everything around them. The torch glue of level 5 moves each byte several times: index_select, then the
activation as chunk + silu + mul, then the unpermute as a gather, a float32 copy, a multiply and a sum over
[T*K, H]. Here the permute reads each token once, SwiGLU is one pass over [T*K, 2F], and the unpermute reads
each row once and sums a token's K rows (times its router weights) in float32 registers. No host sync."""

from functools import partial

import torch

from moekit.experts.grouped_mm import (
    check_alignment,
    grouped_mlp,
    grouped_mm_pipeline,
    grouped_mm_support,
    sixteen_byte_rows,
)
from moekit.experts.registry import EXPERT_BACKENDS, sorted_rows_form
from moekit.kernels.availability import triton_support
from moekit.registry import needs_grad
from moekit.weights import MoEWeights


def grouped_mm_fused_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    ok, reason = grouped_mm_support(device, dtype)
    return (ok, reason) if not ok else triton_support(device, dtype)


@EXPERT_BACKENDS.register(
    "grouped_mm_fused", supports=grouped_mm_fused_support, size_multiple=sixteen_byte_rows, trains=True
)
def grouped_mm_fused(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]: Triton permute, grouped gate+up, Triton SwiGLU, grouped down, Triton weighted unpermute.
    With grad-requiring inputs in grad mode the same forward runs under triton_grouped's autograd nodes
    (differentiable.sorted_rows_mlp): its backward GEMMs each run on the faster of torch._grouped_mm and Triton,
    and of the forward it keeps rows and gate_up alone (torch's autograd also kept the activation)."""
    from moekit.kernels import differentiable

    if torch.is_grad_enabled() and needs_grad((x, topk_weights, weights)):
        mlp = _mlp_under_autograd
    else:
        mlp = partial(grouped_mlp, swiglu=differentiable.swiglu)
    return grouped_mm_pipeline(
        x,
        topk_ids,
        topk_weights,
        weights,
        permute=differentiable.permute_tokens,
        mlp=mlp,
        unpermute=differentiable.unpermute_reduce,
    )


def _mlp_under_autograd(rows: torch.Tensor, expert_offsets: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """rows [M, H] grouped by expert -> [M, H] through triton_grouped's autograd nodes, the forward's GEMMs on
    torch._grouped_mm; the pipeline's layout has no padding rows (it ends at T * K)."""
    from moekit.kernels import differentiable

    return differentiable.sorted_rows_mlp(
        rows, weights.w_gate_up, weights.w_down, expert_offsets, padded=False, forward_on_grouped_mm=True
    )


@sorted_rows_form("grouped_mm_fused")
def grouped_mm_fused_sorted_rows(rows: torch.Tensor, expert_offsets: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """rows [M, H] grouped by expert -> [M, H]: grouped gate+up, Triton SwiGLU (with its backward), grouped down."""
    from moekit.kernels import differentiable

    check_alignment(rows, weights)
    return grouped_mlp(rows, expert_offsets, weights, differentiable.swiglu)
