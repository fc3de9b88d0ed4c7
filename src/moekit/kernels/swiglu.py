"""SiLU(gate) * up in one pass over a [N, 2F] gate_up buffer (gate columns first), and its backward in one pass:
d_gate = dh * up * silu'(gate), d_up = dh * silu(gate), silu'(g) = s + g * s * (1 - s) with s = sigmoid(g), in
float32 whatever the storage dtype (one read of gate_up and dh, one write of d_gate_up); scaled_swiglu_backward adds
a row scale (the router weight the down projection's epilogue applies) and recomputes the scaled activation."""

import torch
import triton
import triton.language as tl

from moekit.kernels.permute import row_block


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
    gate_up_ptr,
    dh_ptr,
    d_gate_up_ptr,
    scale_ptr,
    activation_ptr,
    d_scale_ptr,
    end_ptr,
    F,
    stride_in,
    stride_dh,
    stride_out,
    stride_act,
    ACTIVATION: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_END: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One row's F-block of SwiGLU's backward. ACTIVATION: also writes the recomputed activation silu(g) * u (times
    s if SCALED). SCALED: h = s * silu(g) * u with a row scale s; adds this block's share of <silu(g) * u, dh> to
    d_scale[row] (float32 atomics). HAS_END: rows from end_ptr's value on are padding, read as zeros (their outputs
    are zero)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    if HAS_END:
        mask = mask & (row < tl.load(end_ptr).to(tl.int64))
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + F + cols, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    activation = silu * up
    if SCALED:
        scale = tl.load(scale_ptr + row)
        tl.atomic_add(d_scale_ptr + row, tl.sum(tl.where(mask, activation * dh, 0.0), axis=0))
        activation = scale * activation
        dh = dh * scale
    if ACTIVATION:
        tl.store(activation_ptr + row * stride_act + cols, activation.to(activation_ptr.dtype.element_ty),
                 mask=cols < F)  # fmt: skip
    d_gate = dh * up * (sig + silu * (1.0 - sig))
    out = d_gate_up_ptr + row * stride_out
    tl.store(out + cols, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=cols < F)  # zeros on padding rows
    tl.store(out + F + cols, (dh * silu).to(d_gate_up_ptr.dtype.element_ty), mask=cols < F)


def _check_gate_up(gate_up: torch.Tensor) -> tuple[int, int]:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [N, 2F], got shape {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must have contiguous rows")
    return gate_up.shape[0], gate_up.shape[1] // 2


def _check_dh(name: str, dh: torch.Tensor, N: int, F: int, gate_up: torch.Tensor) -> torch.Tensor:
    if dh.shape != (N, F) or dh.device != gate_up.device:
        raise ValueError(f"{name} must be [{N}, {F}] on {gate_up.device}, got {tuple(dh.shape)} on {dh.device}")
    return dh if dh.stride(1) == 1 else dh.contiguous()


def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2F] (row-major), dh [N, F] the gradient of swiglu(gate_up) -> d_gate_up [N, 2F] in gate_up.dtype."""
    N, F = _check_gate_up(gate_up)
    dh = _check_dh("dh", dh, N, F, gate_up)
    d_gate_up = torch.empty(N, 2 * F, dtype=gate_up.dtype, device=gate_up.device)
    if N and F:
        strides = gate_up.stride(0), dh.stride(0), d_gate_up.stride(0), 0
        # the scale, activation and end pointers are not read: dh stands in
        _swiglu_backward_kernel[(N, triton.cdiv(F, row_block(F)))](
            gate_up, dh, d_gate_up, dh, dh, dh, dh, F, *strides, ACTIVATION=False, SCALED=False, HAS_END=False,
            BLOCK_F=row_block(F),
        )  # fmt: skip
    return d_gate_up


def scaled_swiglu_backward(
    gate_up: torch.Tensor,
    d_activation: torch.Tensor,
    row_scale: torch.Tensor | None,
    rows_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of h = row_scale * silu(gate) * up up to h's gradient d_activation [N, F]: gate_up [N, 2F],
    row_scale [N] float32 or None -> (d_gate_up [N, 2F], h [N, F] recomputed, d_row_scale [N] float32 or None),
    in one pass (what grouped_gemm_swiglu_backward fuses into its GEMM's epilogue). rows_end: a one-element
    integer tensor on the device; rows from its value on are padding, not read, and get zeros in all three."""
    N, F = _check_gate_up(gate_up)
    d_activation = _check_dh("d_activation", d_activation, N, F, gate_up)
    scaled = row_scale is not None
    if scaled and (row_scale.shape != (N,) or row_scale.dtype != torch.float32 or row_scale.device != gate_up.device):
        raise ValueError(f"row_scale must be float32 [{N}] on {gate_up.device}, got {row_scale.dtype} "
                         f"{tuple(row_scale.shape)} on {row_scale.device}")  # fmt: skip
    d_gate_up = torch.empty(N, 2 * F, dtype=gate_up.dtype, device=gate_up.device)
    activation = torch.empty(N, F, dtype=gate_up.dtype, device=gate_up.device)
    d_scale = torch.zeros(N, dtype=torch.float32, device=gate_up.device) if scaled else None
    if N and F:
        strides = gate_up.stride(0), d_activation.stride(0), d_gate_up.stride(0), activation.stride(0)
        unread = activation  # stands in for the pointers a flag leaves unread
        _swiglu_backward_kernel[(N, triton.cdiv(F, row_block(F)))](
            gate_up, d_activation, d_gate_up, row_scale.contiguous() if scaled else unread, activation,
            d_scale if scaled else unread, rows_end if rows_end is not None else unread, F, *strides,
            ACTIVATION=True, SCALED=scaled, HAS_END=rows_end is not None, BLOCK_F=row_block(F),
        )  # fmt: skip
    return d_gate_up, activation, d_scale


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [N, 2F] (row-major) -> silu(gate_up[:, :F]) * gate_up[:, F:] as [N, F] in gate_up.dtype."""
    N, F = _check_gate_up(gate_up)
    if out is None:
        out = gate_up.new_empty(N, F)
    elif out.shape != (N, F) or out.dtype != gate_up.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{N}, {F}] {gate_up.dtype} with contiguous rows")
    if N == 0 or F == 0:
        return out
    block_f = row_block(F)
    _swiglu_kernel[(N, triton.cdiv(F, block_f))](gate_up, out, F, gate_up.stride(0), out.stride(0), BLOCK_F=block_f)
    return out
