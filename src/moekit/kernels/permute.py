"""Gather tokens into the expert-sorted row buffer, and reduce the rows back to tokens with router weights.

Both read each token row once and never build x.repeat_interleave(K): the permute kernel copies
x[t] into the K rows of its assignments, the unpermute kernel sums a token's K rows in float32.
"""

import torch
import triton
import triton.language as tl

from moekit.permute import ExpertLayout


@triton.jit
def _permute_kernel(x_ptr, rows_ptr, assignment_rows_ptr, H, K, stride_x, stride_rows, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    values = tl.load(x_ptr + token * stride_x + cols, mask=mask)
    for k in range(K):
        row = tl.load(assignment_rows_ptr + token * K + k)
        tl.store(rows_ptr + row * stride_rows + cols, values, mask=mask)


@triton.jit
def _unpermute_kernel(
    rows_ptr,
    y_ptr,
    assignment_rows_ptr,
    weights_ptr,
    H,
    K,
    stride_rows,
    stride_y,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(K):
        row = tl.load(assignment_rows_ptr + token * K + k)
        values = tl.load(rows_ptr + row * stride_rows + cols, mask=mask).to(tl.float32)
        if HAS_WEIGHTS:
            values *= tl.load(weights_ptr + token * K + k).to(tl.float32)
        acc += values
    tl.store(y_ptr + token * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_backward_kernel(
    dy_ptr,
    rows_ptr,
    d_rows_ptr,
    d_weights_ptr,
    assignment_rows_ptr,
    weights_ptr,
    H,
    K,
    stride_dy,
    stride_rows,
    stride_d_rows,
    D_ROWS: tl.constexpr,
    D_WEIGHTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    for k in range(K):
        row = tl.load(assignment_rows_ptr + token * K + k)
        weight = tl.load(weights_ptr + token * K + k).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(0, H, BLOCK_H):  # dy[t] is read K times: from the cache after the first
            cols = start + tl.arange(0, BLOCK_H)
            mask = cols < H
            grad = tl.load(dy_ptr + token * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if D_ROWS:
                tl.store(d_rows_ptr + row * stride_d_rows + cols, (weight * grad).to(d_rows_ptr.dtype.element_ty),
                         mask=mask)  # fmt: skip
            if D_WEIGHTS:
                dot += tl.load(rows_ptr + row * stride_rows + cols, mask=mask, other=0.0).to(tl.float32) * grad
        if D_WEIGHTS:
            tl.store(d_weights_ptr + token * K + k, tl.sum(dot).to(d_weights_ptr.dtype.element_ty))


def row_block(width: int) -> int:
    """The block of the kernels that give one row (or token) to a program and walk its width in blocks: the width's
    power of two, at most 1024 (permute, unpermute, SwiGLU, the slot sums)."""
    return min(1024, triton.next_power_of_2(max(width, 1)))


def permute_tokens_triton(x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """x [T, H] -> rows [num_rows, H] in expert order (padding rows zero), as moekit.permute.permute_tokens."""
    T, H = x.shape
    if T != layout.num_tokens:
        raise ValueError(f"x must have {layout.num_tokens} rows (the layout's tokens), got {T}")
    x = x.contiguous()
    rows = x.new_zeros(layout.num_rows, H) if layout.pad_to > 1 else x.new_empty(layout.num_rows, H)
    if T and H:
        block_h = row_block(H)
        _permute_kernel[(T, triton.cdiv(H, block_h))](
            x, rows, layout.assignment_rows, H, layout.top_k, x.stride(0), rows.stride(0), BLOCK_H=block_h
        )
    return rows


def unpermute_reduce_triton(rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor | None):
    """rows [num_rows, H] -> y [T, H] = sum_k w[t, k] * row of (t, k), float32 sums, as unpermute_reduce."""
    H = rows.shape[1]
    T = layout.num_tokens
    if rows.stride(1) != 1:
        raise ValueError("rows must have contiguous rows")
    if topk_weights is not None and topk_weights.shape != (T, layout.top_k):
        raise ValueError(f"topk_weights must be [{T}, {layout.top_k}], got {tuple(topk_weights.shape)}")
    y = rows.new_empty(T, H)
    if T and H:
        weights = topk_weights.contiguous() if topk_weights is not None else rows
        block_h = row_block(H)
        _unpermute_kernel[(T, triton.cdiv(H, block_h))](
            rows,
            y,
            layout.assignment_rows,
            weights,
            H,
            layout.top_k,
            rows.stride(0),
            y.stride(0),
            HAS_WEIGHTS=topk_weights is not None,
            BLOCK_H=block_h,
        )
    return y


def unpermute_reduce_backward_triton(
    dy: torch.Tensor,
    rows: torch.Tensor,
    layout: ExpertLayout,
    topk_weights: torch.Tensor,
    d_rows: bool,
    d_weights: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of y = unpermute_reduce_triton(rows, layout, topk_weights) in one pass over dy [T, H]:
    d_rows [num_rows, H] (row of (t, k) = w[t, k] * dy[t], padding rows zero) and d_weights [T, K]
    (<row of (t, k), dy[t]> in float32, in topk_weights' dtype), each computed only where asked for."""
    T, H = dy.shape
    if T != layout.num_tokens or rows.shape[1] != H or rows.stride(1) != 1:
        raise ValueError(f"dy must be [{layout.num_tokens}, H] and rows contiguous [rows, H], got "
                         f"{tuple(dy.shape)} and {tuple(rows.shape)}")  # fmt: skip
    dy = dy.contiguous()
    out_rows = (rows.new_zeros if layout.pad_to > 1 else rows.new_empty)(rows.shape) if d_rows else None
    out_weights = torch.empty(T, layout.top_k, dtype=topk_weights.dtype, device=dy.device) if d_weights else None
    if T and H and (d_rows or d_weights):
        _unpermute_backward_kernel[(T,)](
            dy,
            rows,
            out_rows if d_rows else dy,
            out_weights if d_weights else dy,
            layout.assignment_rows,
            topk_weights.contiguous(),
            H,
            layout.top_k,
            dy.stride(0),
            rows.stride(0),
            out_rows.stride(0) if d_rows else 0,
            D_ROWS=d_rows,
            D_WEIGHTS=d_weights,
            BLOCK_H=row_block(H),
        )
    elif d_weights:
        out_weights.zero_()
    return out_rows, out_weights
