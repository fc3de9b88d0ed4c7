"""The one dtype -> tolerance table, and the comparison every test uses: ||out - ref|| / ||ref||.

It lives in the package rather than in conftest.py because ranks spawned by torch.multiprocessing
import it too, and a conftest is not importable from a child process; conftest.py re-exports it.
"""

from __future__ import annotations

import math

import torch

# Relative Frobenius error allowed for a result computed in the given dtype against the float64 oracle.
# float32 and wider: rounding of sums over H and F; fp16/bf16: 11 and 8 bits of mantissa in the
# operands and the intermediate activations (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
# Each bound sits between the dtype's routed experts and the same experts one format weaker, measured by
# tests/unit/test_tolerance_table.py (naive backend, CPU, H 256, F 128, 3 seeds): float64 1.8e-16..2.1e-16
# vs float32 3.6e-7; float32 3.5e-7..3.8e-7 vs TF32 operands 4.6e-4; float16 5.1e-4..5.4e-4 vs bfloat16
# 5.6e-3 (the narrowest gap above: 1.4x); bfloat16 4.1e-3..4.3e-3 vs FP8 e4m3 operands 6.0e-2.
# float8_e4m3fn is the FP8 recipe (moekit.reference.reference_experts_fp8: tokens, gate/up, the SwiGLU activation
# and down each rounded to e4m3 with their scales) against the oracle on the original weights: four roundings of
# about 2.6% each per element, 5.8e-2..6.4e-2 measured in that test (H 256, F 320, both schemes, 3 seeds) against a
# twin that reads each block's values with its neighbour's scale, 0.99..2.6 on weights whose blocks differ in
# magnitude (moekit.testing.fp8_cases.spread_blocks).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2.5e-2,
    torch.float8_e4m3fn: 1e-1,
}

# An FP8 kernel against the float64 product of the same e4m3 values: Hopper's FP8 tensor cores add the products
# of a 128-wide K step with about 14 bits of mantissa (DeepSeek-V3 technical report, 3.3.2) before the kernel
# promotes the sum to float32, so a float32 or float16 result is held to this floor, not to TOLERANCE[float32]
# (3.2e-5 seen at K = 5 on an H200; the interpreter adds exactly).
FP8_MMA_TOLERANCE = 1e-3
# Where no scale changes along K (rowwise scales on both operands) the kernels let the tensor cores add all of K at
# that precision: 1.0e-3 (K = 2048) to 3.2e-3 (K = 14336) from the sums promoted every 128 of K, measured on an H200
# at DeepSeek-V3's and Mixtral's shapes; three times the largest (tests/unit/test_kernel_grouped_gemm_fp8.py holds
# the kernel to it at K = 14336 on the GPU).
FP8_FAST_ACCUMULATION_TOLERANCE = 1e-2


def fp8_kernel_tolerance(out_dtype: torch.dtype, fast_accumulation: bool = False) -> float:
    """The tolerance of an FP8 kernel's out_dtype result against float64 on its dequantized operands, its tensor
    cores adding all of K (fast_accumulation: the row scheme on the GPU) or promoted every 128 of K."""
    return max(TOLERANCE[out_dtype], FP8_FAST_ACCUMULATION_TOLERANCE if fast_accumulation else FP8_MMA_TOLERANCE)


# A gradient against the oracle's: the backward rounds as many operands and products again as the forward (dy,
# the transposed GEMMs), on top of the forward's own activations, and independent rounding errors add in quadrature:
# sqrt(2) times the forward's bound (fp16 dW_down 4.04e-3 seen at H = F = 17 against TOLERANCE's 4e-3).
def gradient_tolerance(dtype: torch.dtype) -> float:
    """The tolerance of a gradient computed in dtype against the float64 oracle's."""
    return math.sqrt(2) * TOLERANCE[dtype]


# The same comparison for a result that is summed in float32 and rounded once to its storage dtype (no
# matmul, no activation in between: the combine's slot sums): the storage dtype's unit roundoff bounds it
# (2^-11 for float16, 2^-8 for bfloat16), and the twin one step weaker, adding in the storage dtype, lands
# above it (measured in tests/unit/test_slot_sums.py on every run; TOLERANCE's 4e-3 / 2.5e-2 admit the twin).
ROUNDED_ONCE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 2e-5,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; inf when out holds NaN/inf; ||out|| when ref is 0."""
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, ref has {tuple(ref.shape)}")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    ref_norm = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(out - ref))
    return diff / ref_norm if ref_norm > 0 else diff


def assert_close_to_reference(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "out", tolerance: float | None = None
):
    """Fail unless relative_error(out, ref) <= tolerance (default TOLERANCE[dtype])."""
    err = relative_error(out, ref)
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds the {dtype} tolerance {tol:.1e}"
