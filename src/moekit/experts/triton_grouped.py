"""triton_grouped (level 6): moekit's own kernels end to end. A Triton permute, one grouped-GEMM launch
for gate+up with SiLU(gate) * up fused into its epilogue, one for down with each row's router weight
fused into its epilogue, and a Triton unpermute that sums each token's K rows. No host synchronisation.
sorted_rows_mlp, the two GEMMs alone, also runs the expert-parallel paths' padded rows (device offsets).
It trains: with grad-requiring inputs the same kernels run under autograd (moekit.kernels.differentiable), the
gate/up GEMM also keeping its pre-activation for the backward; without, nothing is kept."""

import torch

from moekit.experts.registry import EXPERT_BACKENDS, sorted_rows_form
from moekit.kernels.availability import triton_support
from moekit.permute import expert_layout
from moekit.registry import needs_grad
from moekit.validation import check_routing
from moekit.weights import MoEWeights


def sixteen(dtype: torch.dtype) -> int:
    """Sizes the oracle tests draw: Triton compiles one variant per divisibility-by-16 pattern of the sizes
    and strides, so odd sizes cost a compile and an autotune per drawn shape on GPU (over 300 s for 100
    examples). The kernel handles any size: tests/unit/test_kernel_grouped_gemm.py draws odd ones."""
    return 16


@EXPERT_BACKENDS.register("triton_grouped", supports=triton_support, size_multiple=sixteen, trains=True)
def triton_grouped(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]."""
    from moekit.kernels.permute import permute_tokens_triton, unpermute_reduce_triton

    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    layout = expert_layout(topk_ids, num_experts)
    row_weights = topk_weights.flatten()[layout.sorted_assignments].float()  # row i is sorted assignment i
    if torch.is_grad_enabled() and needs_grad((x, topk_weights, weights)):
        from moekit.kernels import differentiable

        rows = differentiable.permute_tokens(x, layout)
        out = differentiable.sorted_rows_mlp(
            rows, weights.w_gate_up, weights.w_down, layout.expert_offsets, row_weights, padded=False
        )  # the layout has no padding rows: it ends at T * K
        return differentiable.unpermute_sum(out, layout)
    rows = permute_tokens_triton(x, layout)
    out = sorted_rows_mlp(rows, layout.expert_offsets, weights, row_weights)
    return unpermute_reduce_triton(out, layout, None)


@sorted_rows_form("triton_grouped")
def sorted_rows_mlp(
    rows: torch.Tensor, expert_offsets: torch.Tensor, weights: MoEWeights, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """rows [M, H] sorted by expert (expert e owns rows expert_offsets[e]:expert_offsets[e+1], offsets [E + 1]
    on the device) -> [M, H]: w_down(silu(gate) * up) of each row's expert, times row_scale [M] float32 if
    given. Rows from expert_offsets[E] on are padding: never read, left unspecified in the output. With
    grad-requiring inputs in grad mode, the same kernels under autograd (differentiable.sorted_rows_mlp)."""
    from moekit.kernels.grouped_gemm import grouped_gemm

    if torch.is_grad_enabled() and needs_grad((rows, weights, row_scale)):
        from moekit.kernels import differentiable

        return differentiable.sorted_rows_mlp(rows, weights.w_gate_up, weights.w_down, expert_offsets, row_scale)

    activation = grouped_gemm(rows, weights.w_gate_up, expert_offsets, swiglu=True)
    return grouped_gemm(activation, weights.w_down, expert_offsets, row_scale=row_scale)
