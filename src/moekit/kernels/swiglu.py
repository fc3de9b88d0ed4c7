"""SiLU(gate) * up in one pass over a [N, 2F] gate_up buffer (gate columns first)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, F, stride_in, stride_out, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + F + cols, mask=mask).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up  # float32 whatever the storage dtype
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [N, 2F] (row-major) -> silu(gate_up[:, :F]) * gate_up[:, F:] as [N, F] in gate_up.dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [N, 2F], got shape {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must have contiguous rows")
    N, F = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = gate_up.new_empty(N, F)
    elif out.shape != (N, F) or out.dtype != gate_up.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{N}, {F}] {gate_up.dtype} with contiguous rows")
    if N == 0 or F == 0:
        return out
    block_f = min(1024, triton.next_power_of_2(F))
    _swiglu_kernel[(N, triton.cdiv(F, block_f))](gate_up, out, F, gate_up.stride(0), out.stride(0), BLOCK_F=block_f)
    return out
