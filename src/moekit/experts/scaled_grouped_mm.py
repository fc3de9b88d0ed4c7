"""scaled_grouped_mm: torch._scaled_grouped_mm (CUTLASS's FP8 grouped GEMM in torch) with rowwise scales, the
peer of triton_grouped_fp8. The Triton permute quantizes each token per row, the gate/up GEMM writes bf16, Triton
SwiGLU, the activation quantized per row (the only scale the op takes), the down GEMM, the weighted Triton
unpermute. Rowwise weights only: the op has no 128 x 128 block scales."""

import torch

from moekit.experts.registry import FP8_EXPERT_BACKENDS
from moekit.experts.triton_grouped import sixteen
from moekit.experts.triton_grouped_fp8 import check_fp8_weights
from moekit.kernels.availability import fp8_triton_support
from moekit.permute import expert_layout
from moekit.validation import check_routing


def scaled_grouped_mm_support(device: torch.device, dtype: torch.dtype, scheme: str) -> tuple[bool, str]:
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device.type != "cuda":
        return False, "torch._scaled_grouped_mm runs on CUDA only"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False, "torch._scaled_grouped_mm's rowwise FP8 kernels are built for compute capability 9.x"
    if scheme != "row":
        return False, "torch._scaled_grouped_mm takes rowwise scales, not 128 x 128 blocks"
    if dtype != torch.bfloat16:
        return False, "torch._scaled_grouped_mm writes bf16"
    return fp8_triton_support(device, dtype)  # the Triton permute, SwiGLU and unpermute


# sixteen: the op wants 16-byte e4m3 rows (H and F multiples of 16), not bf16's 8 elements
@FP8_EXPERT_BACKENDS.register("scaled_grouped_mm", supports=scaled_grouped_mm_support, size_multiple=sixteen)
def scaled_grouped_mm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights):
    """x [T, H] bf16 -> y [T, H] bf16."""
    from moekit.kernels.permute import unpermute_reduce_triton
    from moekit.kernels.quantize_rows import quantize_rows_triton
    from moekit.kernels.swiglu import swiglu

    check_fp8_weights(x, weights)
    if weights.scheme != "row":
        raise ValueError(f"scaled_grouped_mm takes row-scheme weights, got {weights.scheme!r}")
    gate_up, down = weights.w_gate_up, weights.w_down
    E, H, F = down.shape
    if H % 16 or F % 16:
        raise ValueError(f"scaled_grouped_mm needs hidden and ffn sizes that are multiples of 16, got H={H}, F={F}")
    check_routing(topk_ids, topk_weights, E)
    if topk_ids.numel() == 0:
        return x.new_zeros(x.shape)
    layout = expert_layout(topk_ids, E)
    ends = layout.expert_offsets[1:].to(torch.int32)
    rows = quantize_rows_triton(x, "row", layout)

    def grouped(a, a_scale, w, w_scale):  # a [M, K] e4m3 @ w[e].T, w [E, N, K] e4m3; scales [M, 1], [E, N, 1]
        return torch._scaled_grouped_mm(
            a, w.transpose(1, 2), a_scale.view(-1), w_scale.view(E, -1), offs=ends, out_dtype=torch.bfloat16,
            use_fast_accum=True,  # as triton_grouped_fp8 sums rowwise-scaled products (grouped_gemm_fp8)
        )

    activation = quantize_rows_triton(swiglu(grouped(rows.values, rows.scale, gate_up.values, gate_up.scale)), "row")
    out = grouped(activation.values, activation.scale, down.values, down.scale)
    return unpermute_reduce_triton(out, layout, topk_weights)
