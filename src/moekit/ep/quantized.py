"""FP8 dispatch rows: each token quantized once on its source rank, e4m3 values and float32 scales on the wire.

The values travel as their uint8 bits (gloo has no float8 type; NCCL moves bytes either way): half the bytes of
bf16 rows, plus one float32 scale per 1 x 128 tile ("block") or per row ("row"). The receiver selects the rows of
its (token, local expert) pairs from both, as the unquantized path selects them from its rows, and hands them on
as QuantizedRows. Quantizing on the source, before the rows are copied once per destination rank, gives the bits
moekit.quantize.quantize_rows gives the rows the receiver would otherwise get.
"""

from __future__ import annotations

import torch

from moekit.kernels.availability import triton_on_cuda
from moekit.quantize import BLOCK_SIZE, FP8, SCHEMES, QuantizedRows, quantize_rows


def check_dispatch_scheme(scheme, dispatcher_name: str) -> None:
    """Raise ValueError unless scheme is one of moekit.quantize.SCHEMES (before any communication)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES} for an FP8 dispatch on {dispatcher_name!r}, got {scheme!r}")


def quantize_tokens(x: torch.Tensor, scheme: str) -> QuantizedRows:
    """x [T, H] -> QuantizedRows [T, H] under scheme (128-wide tiles): the Triton kernel on CUDA, torch's ops
    elsewhere (the two agree bit for bit)."""
    if triton_on_cuda(x.device, x.dtype):
        from moekit.kernels.quantize_rows import quantize_rows_triton

        return quantize_rows_triton(x, scheme)
    return quantize_rows(x, scheme, BLOCK_SIZE)


def wire_rows(rows: QuantizedRows, token_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the tokens token_idx [S] as they travel: (values [S, H] uint8, scale [S, tiles] float32)."""
    return rows.values.view(torch.uint8).index_select(0, token_idx), rows.scale.index_select(0, token_idx)


def received_rows(values: torch.Tensor, scale: torch.Tensor, slot_of_row: torch.Tensor, scheme: str) -> QuantizedRows:
    """The receive buffers (values [N, H] uint8, scale [N, tiles] float32) -> QuantizedRows [R, H] of the
    expanded rows, row i being slot slot_of_row[i]'s token."""
    picked = values.index_select(0, slot_of_row).view(FP8)
    return QuantizedRows(picked, scale.index_select(0, slot_of_row), scheme, BLOCK_SIZE)


__all__ = ["check_dispatch_scheme", "quantize_tokens", "received_rows", "wire_rows"]
