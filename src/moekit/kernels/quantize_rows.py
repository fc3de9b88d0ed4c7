"""quantize_rows_triton: token rows to FP8 (e4m3) with float32 scales, optionally fused with the permute.

One program per (token, 1 x 128 tile) under "block", per token under "row" (a first sweep over the row finds its
amax, a second writes the values). With a layout, each token's values and scales are written to the K rows of
its assignments: one read of x gives the expert-sorted FP8 rows the grouped GEMM takes. The rule is
moekit.quantize.quantize_rows' (scale = amax * (1 / 448), 1 for an all-zero group, values = x / scale rounded to
nearest even and saturated), so the two agree bit for bit.

Triton's interpreter loads and multiplies e4m3 correctly but converts to it wrongly (0.0156 came out as 0.0078,
seen with Triton 3.6), so under TRITON_INTERPRET=1 the kernel writes the scaled values in float32 and the
launcher rounds them to e4m3 with torch: the CPU runs check everything but that one conversion.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.permute import ExpertLayout
from moekit.quantize import BLOCK_SIZE, FP8, FP8_MAX, QuantizedRows, check_scheme_and_block
from moekit.validation import check_tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_QUANTIZE_BLOCK = 8192


@triton.jit
def quantize_tile(values, amax, FP8_MAX: tl.constexpr):
    """(scale, scaled values): the dequantization scale of a group with this amax, and values / scale saturated
    to +-FP8_MAX (still float32: the caller converts)."""
    scale = tl.where(amax > 0, amax * (1.0 / FP8_MAX), 1.0)  # moekit.quantize.SCALE_PER_AMAX
    scaled = tl.math.div_rn(values, scale)  # IEEE division, as torch's tensor / tensor: the default is approximate
    return scale, tl.clamp(scaled, -FP8_MAX, FP8_MAX)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    values_ptr,
    scale_ptr,
    destination_ptr,
    H,
    K,
    stride_x,
    stride_values,
    stride_scale,
    ROWWISE: tl.constexpr,
    HAS_DESTINATIONS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    if ROWWISE:
        first, tiles = 0, tl.cdiv(H, BLOCK)
    else:
        first, tiles = tl.program_id(1), 1
    amax = 0.0
    for t in range(tiles):
        cols = (first + t) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + token * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x)))
    for t in range(tiles):
        cols = (first + t) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + token * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
        scale, scaled = quantize_tile(x, amax, FP8_MAX)
        scaled = scaled.to(values_ptr.dtype.element_ty)
        for k in range(K):
            row = token
            if HAS_DESTINATIONS:
                row = tl.load(destination_ptr + token * K + k)
            tl.store(values_ptr + row * stride_values + cols, scaled, mask=cols < H)
            if t == 0:
                tl.store(scale_ptr + row * stride_scale + first, scale)


def quantize_rows_triton(
    x: torch.Tensor, scheme: str, layout: ExpertLayout | None = None, block_size: int = BLOCK_SIZE
) -> QuantizedRows:
    """x [T, H] float16/bfloat16/float32 -> QuantizedRows [T, H] (as moekit.quantize.quantize_rows), or with a
    layout [layout.num_rows, H] in its expert order: row layout.assignment_rows[t, k] holds token t (padding
    rows: values 0, scale 1)."""
    check_scheme_and_block(scheme, block_size)
    check_tensor("x", x, ndim=2, dtypes=KERNEL_DTYPES)
    if scheme == "block" and block_size != BLOCK_SIZE:
        raise ValueError(f"quantize_rows_triton's block scheme takes block_size {BLOCK_SIZE}, got {block_size}")
    T, H = x.shape
    if layout is not None and T != layout.num_tokens:
        raise ValueError(f"x must have {layout.num_tokens} rows (the layout's tokens), got {T}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"quantize_rows_triton needs CUDA (or TRITON_INTERPRET=1 for the CPU), x is on {x.device}")
    x = x.contiguous()
    rows = layout.num_rows if layout is not None else T
    tiles = triton.cdiv(H, block_size) if scheme == "block" else 1
    padded = layout is not None and layout.pad_to > 1
    # the interpreter gets float32 values and rounds them below (see the module docstring)
    values_dtype = torch.float32 if _INTERPRET else FP8
    values = (torch.zeros if padded else torch.empty)(rows, H, dtype=values_dtype, device=x.device)
    scale = (torch.ones if padded else torch.empty)(rows, tiles, dtype=torch.float32, device=x.device)
    # a row in one or two blocks: each block of a sweep is a load's latency, and Mixtral's [32, 14336] activation
    # took 11.5 us in 1024-wide blocks on an H200 (a decode step is a few such rows)
    row_width = block_size if scheme == "block" else min(ROW_QUANTIZE_BLOCK, triton.next_power_of_2(max(H, 1)))
    if T and H:
        _quantize_rows_kernel[(T, tiles)](
            x,
            values,
            scale,
            layout.assignment_rows if layout is not None else x,  # never read without HAS_DESTINATIONS
            H,
            layout.top_k if layout is not None else 1,
            x.stride(0),
            values.stride(0),
            scale.stride(0),
            ROWWISE=scheme == "row",
            HAS_DESTINATIONS=layout is not None,
            FP8_MAX=FP8_MAX,
            BLOCK=row_width,
            num_warps=min(16, max(4, row_width // 512)),
        )
    elif scheme == "row":
        scale.fill_(1.0)  # H = 0: every row is an all-zero group
    return QuantizedRows(values.to(FP8), scale, scheme, block_size)
