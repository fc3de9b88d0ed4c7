"""Weighted sums of rows into slots, for the combine of the collective paths (nccl, padded): each received
token's expert rows summed into its send-back row, and each token's returned rows (+ the shared experts)
summed into its output. One program per (slot, column block) adds its entries' rows in float32 registers;
the torch ops this replaces wrote a float32 copy of every row and added them with atomics."""

import torch
import triton
import triton.language as tl

from moekit.kernels.permute import row_block


@triton.jit
def _sum_into_slots_kernel(
    rows_ptr, row_ptr, weight_ptr, starts_ptr, add_ptr, out_ptr, H, stride_rows, stride_add, stride_out,
    HAS_WEIGHT: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(tl.load(starts_ptr + slot), tl.load(starts_ptr + slot + 1)):  # this slot's entries
        row = tl.load(row_ptr + i)
        value = tl.load(rows_ptr + row * stride_rows + cols, mask=mask).to(tl.float32)
        if HAS_WEIGHT:
            value *= tl.load(weight_ptr + i)
        acc += value
    if HAS_ADD:
        acc += tl.load(add_ptr + slot * stride_add + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + slot * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_into_slots(
    rows: torch.Tensor,
    slot_of_entry: torch.Tensor,
    num_slots: int,
    out_dtype: torch.dtype,
    *,
    row_of_entry: torch.Tensor | None = None,
    weight_of_entry: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """rows [N, H]; entry i puts row row_of_entry[i] (default i) times weight_of_entry[i] (float32, default
    1) into slot slot_of_entry[i] (int, in [0, num_slots)). -> out [num_slots, H] in out_dtype: per slot the
    float32 sum of its entries (+ add [num_slots, H]); a slot without entries gets 0 (+ add)."""
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    H = rows.shape[1]
    order = torch.sort(slot_of_entry, stable=True)[1]
    counts = torch.bincount(slot_of_entry, minlength=num_slots)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    row = order if row_of_entry is None else row_of_entry.index_select(0, order)
    weight = None if weight_of_entry is None else weight_of_entry.to(torch.float32).index_select(0, order)
    out = torch.empty(num_slots, H, dtype=out_dtype, device=rows.device)
    if num_slots == 0 or H == 0:
        return out
    block_h = row_block(H)
    _sum_into_slots_kernel[(num_slots, triton.cdiv(H, block_h))](
        rows, row, weight if weight is not None else starts, starts, add if add is not None else out, out, H,
        rows.stride(0), add.stride(0) if add is not None else 0, out.stride(0), HAS_WEIGHT=weight is not None,
        HAS_ADD=add is not None, BLOCK_H=block_h,
    )  # fmt: skip
    return out


__all__ = ["sum_into_slots"]
