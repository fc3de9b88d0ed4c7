"""triton_grouped_fp8: triton_grouped on e4m3 weights and activations. The Triton permute quantizes each token as
it copies it (per 1 x 128 tile under the "block" scheme, per row under "row"); the gate/up grouped GEMM takes the
e4m3 rows and weights with their float32 scales and applies SwiGLU; the activation is quantized as the tokens were:
per 1 x 128 tile in that GEMM's epilogue ("block"), or per row ("row") by a pass of its own, since a row's scale
needs the amax of every output tile of the row and no one tile knows it. With rowwise scales on both operands the
down GEMM's tensor cores add all of K, where a 1 x 128 activation scale would make it promote every 128 of K:
on an H200 at Mixtral's T = 8192 that GEMM ran at 1288 against 866 TFLOP/s, for a pass that reads and writes the
[M, F] activation once. The down GEMM applies each row's router weight; the Triton unpermute sums each token's
K rows.
Its sorted-rows form runs the two GEMMs on FP8 rows an expert-parallel rank received (moekit.ep.local_experts)."""

import torch

from moekit.experts.registry import FP8_EXPERT_BACKENDS, sorted_rows_form
from moekit.experts.triton_grouped import sixteen
from moekit.kernels.availability import fp8_triton_support
from moekit.permute import expert_layout
from moekit.quantize import BLOCK_SIZE, QuantizedMoEWeights, QuantizedRows
from moekit.validation import check_routing, check_tensor


def triton_fp8_support(device: torch.device, dtype: torch.dtype, scheme: str) -> tuple[bool, str]:
    return fp8_triton_support(device, dtype)  # both schemes


def check_fp8_weights(x: torch.Tensor, weights: QuantizedMoEWeights) -> None:
    """Raise unless weights are QuantizedMoEWeights on x's device whose blocks (if any) are the kernels' 128."""
    if not isinstance(weights, QuantizedMoEWeights):
        raise TypeError(f"weights must be QuantizedMoEWeights (moekit.quantize_weights), got {type(weights).__name__}")
    if weights.scheme == "block" and weights.w_gate_up.block_size != BLOCK_SIZE:
        raise ValueError(f"the FP8 kernels take {BLOCK_SIZE} x {BLOCK_SIZE} blocks, got block_size "
                         f"{weights.w_gate_up.block_size}")  # fmt: skip
    check_tensor("x", x, shape=(None, weights.w_gate_up.shape[2]))
    if weights.w_gate_up.values.device != x.device:
        raise ValueError(f"weights are on {weights.w_gate_up.values.device}, x is on {x.device}")


@FP8_EXPERT_BACKENDS.register("triton_grouped_fp8", supports=triton_fp8_support, size_multiple=sixteen)
def triton_grouped_fp8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights):
    """x [T, H] -> y [T, H] in x.dtype."""
    from moekit.kernels.permute import unpermute_reduce_triton
    from moekit.kernels.quantize_rows import quantize_rows_triton

    check_fp8_weights(x, weights)
    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    layout = expert_layout(topk_ids, num_experts)
    rows = quantize_rows_triton(x, weights.scheme, layout)
    row_weights = topk_weights.flatten()[layout.sorted_assignments].float()  # row i is sorted assignment i
    out = sorted_rows_mlp_fp8(rows, layout.expert_offsets, weights, row_weights, x.dtype)
    return unpermute_reduce_triton(out, layout, None)


def sorted_rows_mlp_fp8(
    rows: QuantizedRows,
    expert_offsets: torch.Tensor,
    weights: QuantizedMoEWeights,
    row_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """rows [M, H] e4m3 sorted by expert, expert_offsets [E + 1] on the device -> [M, H] in out_dtype:
    w_down(silu(gate) * up) of each row's expert, times row_scale [M] float32 if given."""
    from moekit.kernels.grouped_gemm_fp8 import grouped_gemm_fp8
    from moekit.kernels.quantize_rows import quantize_rows_triton

    gate_up, down = weights.w_gate_up, weights.w_down
    blocked = weights.scheme == "block"
    activation, activation_scale = grouped_gemm_fp8(
        rows.values, rows.scale, gate_up.values, gate_up.scale, expert_offsets, swiglu=True, quantize_out=blocked,
        out_dtype=out_dtype,
    )  # fmt: skip
    if not blocked:
        quantized = quantize_rows_triton(activation, "row")
        activation, activation_scale = quantized.values, quantized.scale
    out, _ = grouped_gemm_fp8(
        activation, activation_scale, down.values, down.scale, expert_offsets, out_dtype=out_dtype, row_scale=row_scale
    )
    return out


@sorted_rows_form("triton_grouped_fp8", fp8=True)
def sorted_rows_fp8(
    rows: QuantizedRows, expert_offsets: torch.Tensor, weights: QuantizedMoEWeights, out_dtype: torch.dtype
) -> torch.Tensor:
    """The FP8 sorted-rows form: rows [M, H] e4m3 grouped by expert (as an FP8 dispatch delivers them),
    expert_offsets [E + 1] on the device, weights of those E experts -> unweighted expert outputs [M, H] in
    out_dtype (combine applies the router weights). Its out_dtype argument is what the unquantized forms lack."""
    return sorted_rows_mlp_fp8(rows, expert_offsets, weights, None, out_dtype)
