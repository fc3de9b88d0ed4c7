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
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2.5e-2,
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


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "out"):
    """Fail unless relative_error(out, ref) <= TOLERANCE[dtype]."""
    err = relative_error(out, ref)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds the {dtype} tolerance {tol:.1e}"
