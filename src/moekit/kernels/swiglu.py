"""SiLU(gate) * up in one pass over a [N, 2F] gate_up buffer (gate columns first), and its backward in one pass:
d_gate = dh * up * silu'(gate), d_up = dh * silu(gate), silu'(g) = s + g * s * (1 - s) with s = sigmoid(g), in
float32 whatever the storage dtype (one read of gate_up and dh, one write of d_gate_up)."""

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


@triton.jit
def _swiglu_backward_kernel(
    gate_up_ptr, dh_ptr, d_gate_up_ptr, F, stride_in, stride_dh, stride_out, BLOCK_F: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + F + cols, mask=mask).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dh * up * (sig + silu * (1.0 - sig))
    out = d_gate_up_ptr + row * stride_out
    tl.store(out + cols, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(out + F + cols, (dh * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)


def _check_gate_up(gate_up: torch.Tensor) -> tuple[int, int]:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [N, 2F], got shape {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must have contiguous rows")
    return gate_up.shape[0], gate_up.shape[1] // 2


def _block(F: int) -> int:
    return min(1024, triton.next_power_of_2(F))


def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2F] (row-major), dh [N, F] the gradient of swiglu(gate_up) -> d_gate_up [N, 2F] in gate_up.dtype."""
    N, F = _check_gate_up(gate_up)
    if dh.shape != (N, F) or dh.device != gate_up.device:
        raise ValueError(f"dh must be [{N}, {F}] on {gate_up.device}, got {tuple(dh.shape)} on {dh.device}")
    dh = dh if dh.stride(1) == 1 else dh.contiguous()
    d_gate_up = torch.empty(N, 2 * F, dtype=gate_up.dtype, device=gate_up.device)
    if N == 0 or F == 0:
        return d_gate_up
    grid = (N, triton.cdiv(F, _block(F)))
    strides = gate_up.stride(0), dh.stride(0), d_gate_up.stride(0)
    _swiglu_backward_kernel[grid](gate_up, dh, d_gate_up, F, *strides, BLOCK_F=_block(F))
    return d_gate_up


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [N, 2F] (row-major) -> silu(gate_up[:, :F]) * gate_up[:, F:] as [N, F] in gate_up.dtype."""
    N, F = _check_gate_up(gate_up)
    if out is None:
        out = gate_up.new_empty(N, F)
    elif out.shape != (N, F) or out.dtype != gate_up.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{N}, {F}] {gate_up.dtype} with contiguous rows")
    if N == 0 or F == 0:
        return out
    block_f = _block(F)
    _swiglu_kernel[(N, triton.cdiv(F, block_f))](gate_up, out, F, gate_up.stride(0), out.stride(0), BLOCK_F=block_f)
    return out
