"""Rows stored at slots every rank computes alone: the puts of the symmetric (FlashMoE) layout.

Every rank holds the same buffer [RING, W * per_peer, H] (a ring of RING slots; rows_table int64 [W] holds
the address of every rank's copy, as in moekit.kernels.peer_puts), split per source rank: rows
[p * per_peer, (p + 1) * per_peer) of a ring slot are what rank p stored there. An entry names a row of the
sender's `rows` and a position in [0, W * per_peer), seen from the sender: position i goes to rank
q = i // per_peer, at row my_rank * per_peer + i % per_peer of q's buffer, so q finds it in its part for
this rank at the same offset. No address or offset travels before the rows.

put_rows stores every entry's row (times its scale, if any) and its metadata row, then its last program
signals every rank with this stage's counts (moekit.kernels.peer_puts.signal_when_last: flags, epochs and
ring slots as there). signal_after signals alone, after rows another kernel queued before it stored (the
fused combine's grouped GEMM, whose epilogue stores into the peers); row_addresses gives that kernel the
device address of every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.peer_puts import Signal, columns_per_step, next_epoch, signal_when_last

_ENOUGH_PROGRAMS = 1024  # to keep an H200's 132 SMs busy when the entries are few (decode)


@triton.jit
def _put_rows_kernel(
    rows_ptr, position_ptr, scale_ptr, meta_ptr, rows_table, meta_table, flag_table, done_ptr, epoch_ptr,
    counts_ptr, limit_ptr, N, H, stride_rows, entries_per_row, per_peer, my_rank, W, FLAG_W, C, META_W,
    RING: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_META: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    epoch, ring = next_epoch(epoch_ptr, RING)
    n = tl.minimum(tl.load(limit_ptr), N) if HAS_LIMIT else N
    first = tl.program_id(0) * BLOCK_N
    if first < n:  # a program past the limit (padding entries) only signals
        entries = first + tl.arange(0, BLOCK_N)
        position = tl.load(position_ptr + entries, mask=entries < n, other=-1).to(tl.int64)
        sent = position >= 0
        peer = tl.where(sent, position // per_peer, 0)
        dest_row = ring.to(tl.int64) * W * per_peer + my_rank * per_peer + position % per_peer
        src_row = (entries // entries_per_row).to(tl.int64)
        base = tl.load(rows_table + peer, mask=sent, other=0).to(tl.pointer_type(rows_ptr.dtype.element_ty))
        if HAS_SCALE:
            scale = tl.load(scale_ptr + entries, mask=sent, other=0.0)
        for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):  # this program's columns
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = sent[:, None] & (cols[None, :] < H)
            tile = tl.load(rows_ptr + src_row[:, None] * stride_rows + cols[None, :], mask=mask)
            if HAS_SCALE:
                tile = (tile.to(tl.float32) * scale[:, None]).to(rows_ptr.dtype.element_ty)
            tl.store(base[:, None] + dest_row[:, None] * H + cols[None, :], tile, mask=mask)
        if HAS_META:
            if tl.program_id(1) == 0:
                ms = tl.arange(0, BLOCK_M)
                meta_mask = sent[:, None] & (ms[None, :] < META_W)
                meta = tl.load(meta_ptr + entries[:, None] * META_W + ms[None, :], mask=meta_mask)
                meta_base = tl.load(meta_table + peer, mask=sent, other=0).to(tl.pointer_type(tl.int32))
                tl.store(meta_base[:, None] + dest_row[:, None] * META_W + ms[None, :], meta, mask=meta_mask)
    programs = tl.num_programs(0) * tl.num_programs(1)
    signal_when_last(
        done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, programs, W, FLAG_W, C,
        BLOCK_C,
    )  # fmt: skip


def put_rows(
    rows: torch.Tensor,
    position: torch.Tensor,
    per_peer: int,
    rows_table: torch.Tensor,
    signal: Signal,
    counts: torch.Tensor,
    *,
    entries_per_row: int = 1,
    scale: torch.Tensor | None = None,
    meta: torch.Tensor | None = None,
    meta_table: torch.Tensor | None = None,
    limit: torch.Tensor | None = None,
) -> None:
    """Store entry i's row rows[i // entries_per_row] [N * ..., H] (times scale[i], float32 [N], in float32)
    at position[i] (int [N]; -1: not sent) of the ring slot this call advances to (module docstring), and
    meta[i] (int32 [N, META_W]) at the same row of the metadata buffer meta_table points to; then signal
    every rank q with counts int32 [W, C] row q. limit: int [1] on the device, or None: the entries from
    limit[0] on are not sent either (the padding rows of a fixed shape, skipped whole)."""
    N = position.numel()
    H = rows.shape[1]
    W, C = counts.shape
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    block_n = 4
    block_h = columns_per_step(H)
    entry_programs = max(1, triton.cdiv(N, block_n))  # one program at least: it signals
    column_programs = max(1, min(triton.cdiv(max(H, 1), block_h), triton.cdiv(_ENOUGH_PROGRAMS, entry_programs)))
    meta_width = meta.shape[1] if meta is not None else 1
    _put_rows_kernel[(entry_programs, column_programs)](
        rows, position.contiguous(), scale.contiguous() if scale is not None else position,
        meta.contiguous() if meta is not None else position,
        rows_table, meta_table if meta_table is not None else rows_table, signal.flag_table, signal.done,
        signal.epoch, counts, limit if limit is not None else position, N, H, rows.stride(0), entries_per_row,
        per_peer, signal.my_rank, W, signal.flag_width, C, meta_width, RING=signal.ring_slots,
        HAS_SCALE=scale is not None, HAS_META=meta is not None, HAS_LIMIT=limit is not None, BLOCK_N=block_n,
        BLOCK_H=block_h, BLOCK_M=triton.next_power_of_2(meta_width), BLOCK_C=triton.next_power_of_2(C),
    )  # fmt: skip


@triton.jit
def _signal_kernel(flag_table, done_ptr, epoch_ptr, counts_ptr, my_rank, W, FLAG_W, C, RING: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
    epoch, ring = next_epoch(epoch_ptr, RING)
    signal_when_last(done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, 1, W, FLAG_W, C,
                     BLOCK_C)  # fmt: skip


def signal_after(signal: Signal, counts: torch.Tensor) -> None:
    """Signal every rank q with counts int32 [W, C] row q for the ring slot this call advances to, after
    everything queued before on the stream (a kernel's completion makes its stores visible first)."""
    W, C = counts.shape
    _signal_kernel[(1,)](
        signal.flag_table, signal.done, signal.epoch, counts, signal.my_rank, W, signal.flag_width, C,
        RING=signal.ring_slots, BLOCK_C=triton.next_power_of_2(C),
    )  # fmt: skip


def row_addresses(position: torch.Tensor, per_peer: int, rows_table: torch.Tensor, signal: Signal, H: int,
                  element_size: int) -> torch.Tensor:  # fmt: skip
    """int64 [N]: the device address where put_rows would store the row of position int [N] (-1: 0, not
    stored) in the ring slot the stage's next call advances to, in the buffer of rows_table, H elements of
    element_size bytes per row. Computed on the device (the epoch stays there)."""
    position = position.long()
    W = rows_table.numel()
    ring = (signal.epoch.long() + 1) % signal.ring_slots
    row = ring * W * per_peer + signal.my_rank * per_peer + position % per_peer
    base = rows_table.index_select(0, (position // per_peer).clamp(0, W - 1))
    return torch.where(position >= 0, base + row * H * element_size, 0)


__all__ = ["put_rows", "row_addresses", "signal_after"]
