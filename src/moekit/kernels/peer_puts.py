"""Device-initiated dispatch and combine: Triton kernels that store rows straight into the other ranks'
symmetric buffers through mapped pointers and signal each arrival with release/acquire flags.

Every rank holds the same buffers, each a ring of RING slots [RING, ...] (the caller picks RING); a
`*_table` argument is an int64 tensor [W] whose entry q is the address of rank q's copy (NVLink-mapped:
what nvshmem_ptr or torch's symmetric memory hands out). Rank p puts its j-th token for rank q at row
p * per_source + j of q's buffer, a position p computes alone, so no offsets travel before the rows. Each
stage has flags int32 [RING, W, FLAG_W] on every rank: row p holds (epoch, counts...) written by rank p
after all its rows.

The epoch is a call counter every rank advances in step, kept on the device (int32 [1] per stage), so the
kernels need no host value and a CUDA graph replays them: a sending kernel works in ring slot
(epoch + 1) % RING, and its last program signals epoch + 1 and stores it as the stage's epoch; the waits
and reads queued after it use that epoch. Flags are never reset between calls.

Kernels (each with its launcher below):
  send_tokens               dispatch: rows and metadata to every destination rank, then its flags
  wait_for_all_arrivals     one program per source rank, spinning until that rank's flag shows the epoch
  send_tokens_back          combine: the weighted sum of a received token's expert rows, stored into its
                            source rank's back buffer, then flags
  reduce_and_copy_to_output each token's rows from every rank summed (+ the shared expert) -> y
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_H = 1024


def _block_h(H: int) -> int:
    """Columns of a row one program moves per step."""
    return min(_MAX_BLOCK_H, triton.next_power_of_2(max(H, 1)))


@triton.jit
def _next_epoch(epoch_ptr, RING: tl.constexpr):
    """(epoch this call signals, its ring slot)."""
    epoch = tl.load(epoch_ptr) + 1
    return epoch, epoch % RING


@triton.jit
def _signal_when_last(
    done_ptr, epoch_ptr, epoch, flag_table, flag_offset, counts_ptr, my_rank, num_programs, W, FLAG_W, C,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Counts this program done; the last one writes counts[q, :C] and then epoch into row my_rank of
    every rank q's flags (flag_offset elements into its flag ring: the slot's start; release: everything
    the group stored before is visible first), stores epoch as this stage's, and rearms the counter."""
    tl.debug_barrier()  # the whole program's stores come before its count
    finished = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="sys")
    if finished == num_programs - 1:
        cols = tl.arange(0, BLOCK_C)
        for q in range(W):
            flag = tl.load(flag_table + q).to(tl.pointer_type(tl.int32)) + flag_offset + FLAG_W * my_rank
            counts = tl.load(counts_ptr + q * C + cols, mask=cols < C)
            tl.store(flag + 1 + cols, counts, mask=cols < C)
            tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
        tl.store(epoch_ptr, epoch)
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _send_tokens_kernel(
    x_ptr,
    meta_ptr,
    dest_pos_ptr,
    counts_ptr,
    rows_table,
    meta_table,
    flag_table,
    done_ptr,
    epoch_ptr,
    T,
    H,
    stride_x,
    META_W,
    per_source,
    my_rank,
    W,
    FLAG_W,
    C,
    RING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_META: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    epoch, ring = _next_epoch(epoch_ptr, RING)
    ring_rows = ring.to(tl.int64) * W * per_source  # first row of the ring slot
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tokens < T
    tokens = tokens.to(tl.int64)
    meta_cols = tl.arange(0, BLOCK_META)
    meta_mask = in_range[:, None] & (meta_cols[None, :] < META_W)
    meta = tl.load(meta_ptr + tokens[:, None] * META_W + meta_cols[None, :], mask=meta_mask)
    for q in range(W):
        pos = tl.load(dest_pos_ptr + tokens * W + q, mask=in_range, other=-1)
        goes = pos >= 0
        slot = ring_rows + my_rank * per_source + pos.to(tl.int64)
        rows = tl.load(rows_table + q).to(tl.pointer_type(x_ptr.dtype.element_ty))
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = goes[:, None] & (cols[None, :] < H)
            tile = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask)
            tl.store(rows + slot[:, None] * H + cols[None, :], tile, mask=mask)
        meta_dst = tl.load(meta_table + q).to(tl.pointer_type(tl.int32))
        tl.store(meta_dst + slot[:, None] * META_W + meta_cols[None, :], meta, mask=meta_mask & goes[:, None])
    _signal_when_last(
        done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, tl.num_programs(0), W,
        FLAG_W, C, BLOCK_C,
    )  # fmt: skip


def send_tokens(
    x: torch.Tensor,
    meta: torch.Tensor,
    dest_pos: torch.Tensor,
    counts: torch.Tensor,
    rows_table: torch.Tensor,
    meta_table: torch.Tensor,
    flag_table: torch.Tensor,
    done: torch.Tensor,
    epoch: torch.Tensor,
    my_rank: int,
    per_source: int,
    flag_width: int,
    ring_slots: int,
    tokens_per_program: int = 4,
) -> None:
    """x [T, H], meta int32 [T, M], dest_pos int32 [T, W] (the token's row among this rank's rows for rank
    q, or -1), counts int32 [W, C] (what rank q's flags carry after the epoch: tokens to q first) -> rows
    into the ring slot [W * per_source, H] of every rank's rows buffer, metadata [W * per_source, M] beside
    them, flags [W, flag_width >= 1 + C]; each buffer a ring of ring_slots. done: int32 [1], zero between
    calls; epoch: int32 [1], this stage's, advanced by one."""
    T, H = x.shape
    W, C = counts.shape
    block_t = triton.next_power_of_2(max(1, tokens_per_program))
    grid = (max(1, triton.cdiv(T, block_t)),)  # one program at least: it signals
    _send_tokens_kernel[grid](
        x, meta, dest_pos, counts, rows_table, meta_table, flag_table, done, epoch,
        T, H, x.stride(0), meta.shape[1], per_source, my_rank, W, flag_width, C,
        RING=ring_slots, BLOCK_T=block_t, BLOCK_H=_block_h(H), BLOCK_META=triton.next_power_of_2(meta.shape[1]),
        BLOCK_C=triton.next_power_of_2(C),
    )  # fmt: skip


@triton.jit
def _wait_kernel(flags_ptr, epoch_ptr, W, FLAG_W, RING: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    flag = flags_ptr + (epoch % RING) * W * FLAG_W + FLAG_W * tl.program_id(0)
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    while seen < epoch:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")


def wait_for_all_arrivals(flags: torch.Tensor, epoch: torch.Tensor) -> None:
    """flags int32 [RING, W, FLAG_W] (this rank's, for one stage), epoch int32 [1] (the stage's, as the
    sending kernel left it): returns once every source rank signalled that epoch; kernels queued after it
    on the stream see that rank's rows."""
    ring_slots, W, flag_width = flags.shape
    _wait_kernel[(W,)](flags, epoch, W, flag_width, RING=ring_slots)


@triton.jit
def _send_tokens_back_kernel(
    out_ptr,
    weight_ptr,
    rows_by_slot_ptr,
    row_start_ptr,
    counts_ptr,
    back_table,
    flag_table,
    done_ptr,
    epoch_ptr,
    H,
    stride_out,
    per_source,
    my_rank,
    W,
    FLAG_W,
    C,
    RING: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    epoch, ring = _next_epoch(epoch_ptr, RING)
    slot = tl.program_id(0).to(tl.int64)  # src * per_source + j
    start = tl.load(row_start_ptr + slot)
    end = tl.load(row_start_ptr + slot + 1)
    if end > start:  # a token arrived in this slot
        src = slot // per_source
        back = tl.load(back_table + src).to(tl.pointer_type(out_ptr.dtype.element_ty))
        dst = back + (ring.to(tl.int64) * W * per_source + my_rank * per_source + slot - src * per_source) * H
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for i in range(start, end):
                row = tl.load(rows_by_slot_ptr + i)
                weight = tl.load(weight_ptr + row)
                acc += weight * tl.load(out_ptr + row * stride_out + cols, mask=mask).to(tl.float32)
            tl.store(dst + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
    _signal_when_last(
        done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, tl.num_programs(0), W,
        FLAG_W, C, BLOCK_C,
    )  # fmt: skip


def send_tokens_back(
    expert_out: torch.Tensor,
    row_weight: torch.Tensor,
    rows_by_slot: torch.Tensor,
    row_start: torch.Tensor,
    counts: torch.Tensor,
    back_table: torch.Tensor,
    flag_table: torch.Tensor,
    done: torch.Tensor,
    epoch: torch.Tensor,
    my_rank: int,
    per_source: int,
    flag_width: int,
    ring_slots: int,
) -> None:
    """expert_out [R, H], row_weight float32 [R]; the token in receive slot s = src * per_source + j (of
    W * per_source) has rows rows_by_slot[row_start[s]:row_start[s + 1]] (none: no token there):
    sum_rows weight * expert_out goes to row my_rank * per_source + j of rank src's back ring slot.
    counts int32 [W, 1]: tokens going back to each rank; the flags have flag_width int32 per rank;
    done, epoch and ring_slots as in send_tokens."""
    H = expert_out.shape[1]
    W = counts.shape[0]
    _send_tokens_back_kernel[(W * per_source,)](
        expert_out, row_weight, rows_by_slot, row_start, counts, back_table, flag_table, done, epoch,
        H, expert_out.stride(0), per_source, my_rank, W, flag_width, counts.shape[1],
        RING=ring_slots, BLOCK_H=_block_h(H), BLOCK_C=triton.next_power_of_2(counts.shape[1]),
    )  # fmt: skip


@triton.jit
def _reduce_to_output_kernel(
    back_ptr, epoch_ptr, dest_pos_ptr, shared_ptr, y_ptr, H, stride_shared, per_source, W,
    RING: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    ring_rows = (tl.load(epoch_ptr) % RING).to(tl.int64) * W * per_source
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for q in range(W):
        pos = tl.load(dest_pos_ptr + token * W + q)
        if pos >= 0:
            row = ring_rows + q * per_source + pos.to(tl.int64)
            acc += tl.load(back_ptr + row * H + cols, mask=mask).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + token * stride_shared + cols, mask=mask).to(tl.float32)
    tl.store(y_ptr + token * H + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_and_copy_to_output(
    back: torch.Tensor, epoch: torch.Tensor, dest_pos: torch.Tensor, shared_out: torch.Tensor | None
) -> torch.Tensor:
    """back [RING, W * per_source, H] (this rank's back buffer; in the slot of epoch int32 [1], rank q's
    result for token t sits at row q * per_source + dest_pos[t, q]), dest_pos int32 [T, W], shared_out
    [T, H] or None -> y [T, H] in back's dtype, summed in float32."""
    T, W = dest_pos.shape
    H = back.shape[2]
    y = back.new_empty(T, H)
    if T == 0 or H == 0:
        return y
    block_h = _block_h(H)
    shared = shared_out if shared_out is not None else y
    _reduce_to_output_kernel[(T, triton.cdiv(H, block_h))](
        back, epoch, dest_pos, shared, y, H, shared.stride(0), back.shape[1] // W, W,
        RING=back.shape[0], HAS_SHARED=shared_out is not None, BLOCK_H=block_h,
    )  # fmt: skip
    return y
