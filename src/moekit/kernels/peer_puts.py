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
  send_tokens               dispatch: counts the tokens per destination rank (per token block, scanned),
                            then stores rows and metadata to every destination rank, then its flags
  wait_for_all_arrivals     one program per source rank, spinning until that rank's flag shows the epoch
  expand_received           the arrived tokens as rows grouped by local expert (one program per local
                            expert and source rank places its rows by a running count), then gather_rows
  send_tokens_back          combine: the weighted sum of a received token's expert rows, stored into its
                            source rank's back buffer, then flags
  reduce_and_copy_to_output each token's rows from every rank summed (+ the shared expert) -> y
                            (also the symmetric layout's, moekit.ep.symmetric_triton)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_MAX_BLOCK_H = 1024
_ENOUGH_PROGRAMS = 1024  # to keep an H200's 132 SMs busy
_SCAN_BLOCK = 256  # token blocks one step of the send plan's scan takes


@dataclass(frozen=True)
class Signal:
    """How a sending kernel of one stage signals: flag_table int64 [W] (the addresses of every rank's flags
    int32 [ring_slots, W, flag_width] for the stage), done int32 [1] (programs finished; zero between calls),
    epoch int32 [1] (the stage's, on the device, advanced by one per call), this rank's index."""

    flag_table: torch.Tensor
    done: torch.Tensor
    epoch: torch.Tensor
    my_rank: int
    flag_width: int
    ring_slots: int


def columns_per_step(H: int) -> int:
    """Columns of a row one program moves per step."""
    return min(_MAX_BLOCK_H, triton.next_power_of_2(max(H, 1)))


@triton.jit
def next_epoch(epoch_ptr, RING: tl.constexpr):
    """(epoch this call signals, its ring slot)."""
    epoch = tl.load(epoch_ptr) + 1
    return epoch, epoch % RING


@triton.jit
def current_ring(epoch_ptr, RING: tl.constexpr):
    """The ring slot of the stage's last signalled epoch (int64), where the waits and reads look."""
    return (tl.load(epoch_ptr) % RING).to(tl.int64)


@triton.jit
def last_to_finish(done_ptr, num_programs, SCOPE: tl.constexpr):
    """Counts this program done on done_ptr (int32, zero before the launch), after all its stores; True in
    the last program of the launch, which then sees every other program's stores and rearms the counter.
    SCOPE: "gpu" when only this GPU reads what the programs stored, "sys" when peers do."""
    tl.debug_barrier()  # the whole program's stores come before its count
    last = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope=SCOPE) == num_programs - 1
    if last:
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")  # nobody else counts any more in this launch
    return last


@triton.jit
def signal_when_last(
    done_ptr, epoch_ptr, epoch, flag_table, flag_offset, counts_ptr, my_rank, num_programs, W, FLAG_W, C,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Counts this program done; the last one writes counts[q, :C] and then epoch into row my_rank of
    every rank q's flags (flag_offset elements into its flag ring: the slot's start; release: everything
    the group stored before is visible first) and stores epoch as this stage's. Returns whether this
    program was the last."""
    last = last_to_finish(done_ptr, num_programs, "sys")
    if last:
        cols = tl.arange(0, BLOCK_C)
        for q in range(W):
            flag = tl.load(flag_table + q).to(tl.pointer_type(tl.int32)) + flag_offset + FLAG_W * my_rank
            counts = tl.load(counts_ptr + q * C + cols, mask=cols < C)
            tl.store(flag + 1 + cols, counts, mask=cols < C)
            tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
        tl.store(epoch_ptr, epoch)
    return last


@triton.jit
def scan_block_counts(counts_ptr, blocks, width, BLOCK_WIDTH: tl.constexpr, BLOCK_B: tl.constexpr):
    """counts int32 [blocks, width] (per block, per column) -> in place, each block's exclusive prefix sum
    over the blocks before it (its first slot per column); returns the column totals [BLOCK_WIDTH]. One
    program, BLOCK_B blocks per step (the last program of a launch that wrote the counts)."""
    cols = tl.arange(0, BLOCK_WIDTH)
    totals = tl.zeros([BLOCK_WIDTH], dtype=tl.int32)
    for b0 in range(0, blocks, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs[:, None] < blocks) & (cols[None, :] < width)
        block_counts = tl.load(counts_ptr + bs[:, None] * width + cols[None, :], mask=mask, other=0)
        starts = totals[None, :] + tl.cumsum(block_counts, axis=0) - block_counts
        tl.store(counts_ptr + bs[:, None] * width + cols[None, :], starts, mask=mask)
        totals += tl.sum(block_counts, axis=0)
    return totals


@triton.jit
def _token_block(ids_ptr, block, T, K, E_local, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
    """Token block `block` of topk_ids [T, K]: (tokens int64 [BLOCK_T], in_range, ids int32 [BLOCK_T, BLOCK_K],
    pair_mask, goes int32 [BLOCK_T, BLOCK_W]: 1 where token t has an expert on rank q)."""
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tokens < T
    tokens = tokens.to(tl.int64)
    ks, qs = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_W)
    pair_mask = in_range[:, None] & (ks[None, :] < K)
    ids = tl.load(ids_ptr + tokens[:, None] * K + ks[None, :], mask=pair_mask, other=0).to(tl.int32)
    to_q = pair_mask[:, :, None] & ((ids // E_local)[:, :, None] == qs[None, None, :])  # [T, K, W]
    return tokens, in_range, ids, pair_mask, tl.max(to_q.to(tl.int32), axis=1)


@triton.jit
def _count_sends_kernel(
    ids_ptr, block_starts_ptr, counts_ptr, done_ptr, T, K, W, E_local, C,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    _, _, ids, pair_mask, goes = _token_block(ids_ptr, block, T, K, E_local, BLOCK_T, BLOCK_K, BLOCK_W)
    dest = ids // E_local
    tl.atomic_add(counts_ptr + dest * C + 1 + ids % E_local, 1, mask=pair_mask, sem="relaxed", scope="gpu")
    qs = tl.arange(0, BLOCK_W)
    tl.store(block_starts_ptr + block * W + qs, tl.sum(goes, axis=0), mask=qs < W)  # scanned below
    blocks = tl.num_programs(0)
    if last_to_finish(done_ptr, blocks, "gpu"):  # the block counts -> each block's first row per rank
        sent = scan_block_counts(block_starts_ptr, blocks, W, BLOCK_W, BLOCK_B)
        tl.store(counts_ptr + qs * C, sent, mask=qs < W)


@triton.jit
def _send_tokens_kernel(
    x_ptr,
    ids_ptr,
    weights_ptr,
    block_starts_ptr,
    dest_pos_ptr,
    counts_ptr,
    rows_table,
    meta_table,
    flag_table,
    done_ptr,
    epoch_ptr,
    T,
    H,
    K,
    stride_x,
    per_source,
    my_rank,
    W,
    E_local,
    FLAG_W,
    C,
    RING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    epoch, ring = next_epoch(epoch_ptr, RING)
    ring_rows = ring.to(tl.int64) * W * per_source  # first row of the ring slot
    block = tl.program_id(0)
    tokens, in_range, ids, pair_mask, goes = _token_block(ids_ptr, block, T, K, E_local, BLOCK_T, BLOCK_K, BLOCK_W)
    qs, ks = tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_K)
    start = tl.load(block_starts_ptr + block * W + qs, mask=qs < W, other=0)
    # goes summed over the block's tokens up to t (a triangular sum: Triton 3.6's scan lowering asserts
    # on tl.cumsum along axis 0 of a 2-D block this small)
    ts = tl.arange(0, BLOCK_T)
    up_to = (ts[None, :] <= ts[:, None]).to(tl.int32)  # [t, s]: token s comes no later than t
    sent_so_far = tl.sum(up_to[:, :, None] * goes[None, :, :], axis=1)  # [BLOCK_T, BLOCK_W]
    dest_pos = tl.where(goes > 0, start[None, :] + sent_so_far - 1, -1)
    if tl.program_id(1) == 0:
        tl.store(dest_pos_ptr + tokens[:, None] * W + qs[None, :], dest_pos, mask=in_range[:, None] & (qs[None, :] < W))
    weights = tl.load(weights_ptr + tokens[:, None] * K + ks[None, :], mask=pair_mask).to(tl.float32)
    meta_w = 1 + 2 * K
    for q in range(W):
        pos = tl.sum(tl.where(qs[None, :] == q, dest_pos, 0), axis=1)  # column q
        goes_q = pos >= 0
        slot = ring_rows + my_rank * per_source + pos.to(tl.int64)
        rows = tl.load(rows_table + q).to(tl.pointer_type(x_ptr.dtype.element_ty))
        for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):  # this program's columns
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = goes_q[:, None] & (cols[None, :] < H)
            tile = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask)
            tl.store(rows + slot[:, None] * H + cols[None, :], tile, mask=mask)
        if tl.program_id(1) == 0:  # metadata (token, K expert ids, K weights as float32 bits)
            meta = tl.load(meta_table + q).to(tl.pointer_type(tl.int32)) + slot * meta_w
            tl.store(meta, tokens.to(tl.int32), mask=goes_q)
            pair_goes = pair_mask & goes_q[:, None]
            tl.store(meta[:, None] + 1 + ks[None, :], ids, mask=pair_goes)
            tl.store(meta[:, None] + 1 + K + ks[None, :], weights.to(tl.int32, bitcast=True), mask=pair_goes)
    programs = tl.num_programs(0) * tl.num_programs(1)
    last = signal_when_last(
        done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, programs, W, FLAG_W, C,
        BLOCK_C,
    )  # fmt: skip
    if last:  # the counts were read into the flags: zero them for the next call's count
        tl.debug_barrier()
        cs = tl.arange(0, BLOCK_C)
        for q in range(W):
            tl.store(counts_ptr + q * C + cs, 0, mask=cs < C)


def send_tokens(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    counts: torch.Tensor,
    plan_done: torch.Tensor,
    rows_table: torch.Tensor,
    meta_table: torch.Tensor,
    per_source: int,
    signal: Signal,
    tokens_per_program: int = 4,
) -> torch.Tensor:
    """x [T, H], topk_ids [T, K] (global expert ids: expert g lives on rank g // E_local), topk_weights
    [T, K] -> rows into the ring slot [W * per_source, H] of every rank's rows buffer, metadata int32
    [W * per_source, 1 + 2K] (token, expert ids, router weights as float32 bits) beside them, then the
    signal (flag_width >= 1 + C); each buffer a ring of signal.ring_slots. Returns dest_pos int32 [T, W]: the token's
    row among this rank's rows for rank q (tokens ascending), -1 if none of its experts is there.

    Two kernels: one counts, per token block, the tokens for each rank (its last program turns them into
    each block's first row) and adds the pairs per expert into counts int32 [W, C = 1 + E_local] (zero
    between calls: tokens to q, then pairs per local expert of q: what q's flags carry); the send kernel
    then places its block's tokens and zeroes counts after signalling. plan_done: int32 [1], zero between
    calls."""
    T, H = x.shape
    K = topk_ids.shape[1]
    W, C = counts.shape
    block_t, block_h = triton.next_power_of_2(max(1, tokens_per_program)), columns_per_step(H)
    block_k, block_w = triton.next_power_of_2(K), triton.next_power_of_2(W)
    token_programs = max(1, triton.cdiv(T, block_t))  # one program at least: it signals
    topk_ids = topk_ids.contiguous()
    dest_pos = torch.empty(T, W, dtype=torch.int32, device=x.device)
    block_starts = torch.empty(token_programs, W, dtype=torch.int32, device=x.device)
    _count_sends_kernel[(token_programs,)](
        topk_ids, block_starts, counts, plan_done, T, K, W, C - 1, C,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_W=block_w, BLOCK_B=_SCAN_BLOCK,
    )  # fmt: skip
    # few tokens (decode): a few programs per token block, each a stride of column blocks
    column_programs = max(1, min(triton.cdiv(max(H, 1), block_h), triton.cdiv(_ENOUGH_PROGRAMS, token_programs)))
    _send_tokens_kernel[(token_programs, column_programs)](
        x, topk_ids, topk_weights.contiguous(), block_starts, dest_pos, counts, rows_table, meta_table,
        signal.flag_table, signal.done, signal.epoch, T, H, K, x.stride(0), per_source, signal.my_rank, W, C - 1,
        signal.flag_width, C, RING=signal.ring_slots, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_K=block_k,
        BLOCK_W=block_w, BLOCK_C=triton.next_power_of_2(C),
    )  # fmt: skip
    return dest_pos


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
def _slot_pairs(flags, meta, s0, S, per_source, K, FLAG_W, META_W, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (slot, k) pairs of slots s0 .. s0 + BLOCK_S, slot-major: (slot int64, k, source rank, whether a token
    arrived in the slot and k < K, the pair's global expert id or -1)."""
    pair_ids = tl.arange(0, BLOCK_S * BLOCK_K)
    slot = (s0 + pair_ids // BLOCK_K).to(tl.int64)
    k = pair_ids % BLOCK_K
    src = slot // per_source
    tokens_from_src = tl.load(flags + src * FLAG_W + 1, mask=slot < S, other=0)
    ok = (slot < S) & (slot % per_source < tokens_from_src) & (k < K)
    ids = tl.load(meta + slot * META_W + 1 + k, mask=ok, other=-1)
    return slot, k, src, ok, ids


@triton.jit
def _expand_received_kernel(
    flags_ptr, meta_ptr, epoch_ptr, row_of_pair_ptr, slot_of_row_ptr, src_rank_ptr, src_token_ptr, weight_ptr,
    counts_ptr, offsets_ptr, recv_counts_ptr, S, per_source, W, K, E_local, expert_start, R_out, FLAG_W, META_W,
    RING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    ring = current_ring(epoch_ptr, RING)
    flags = flags_ptr + ring * W * FLAG_W
    meta = meta_ptr + ring * S * META_W
    # rows per local expert, summed over the sources: flags[q] = (epoch, tokens, pairs per local expert)
    qs, es = tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_E)
    pairs = tl.load(
        flags + qs[:, None] * FLAG_W + 2 + es[None, :], mask=(qs[:, None] < W) & (es[None, :] < E_local), other=0
    )
    per_expert = tl.sum(pairs, axis=0).to(tl.int64)
    total = tl.sum(per_expert, axis=0)
    program = tl.program_id(0)
    if program < E_local * W:  # the rows of local expert e from source rank q, in (slot, k) order
        e, q = program // W, program % W
        start = tl.sum(tl.where(es < e, per_expert, 0), axis=0)  # this expert's first row
        if q == 0:
            count = tl.sum(tl.where(es == e, per_expert, 0), axis=0)
            tl.store(counts_ptr + e, count)
            tl.store(offsets_ptr + e + 1, start + count)
        earlier = tl.where((qs[:, None] < q) & (es[None, :] == e), pairs, 0)  # expert e's pairs from ranks < q
        row = start + tl.sum(tl.sum(earlier, axis=1), axis=0)
        first = q * per_source
        end = first + tl.load(flags + q * FLAG_W + 1)  # past the last slot a token from q arrived in
        for s0 in range(first, end, BLOCK_S):
            slot, k, src, ok, ids = _slot_pairs(flags, meta, s0, S, per_source, K, FLAG_W, META_W, BLOCK_S, BLOCK_K)
            hit = ok & (slot < end) & (ids - expert_start == e)
            position = row + tl.cumsum(hit.to(tl.int64), axis=0) - 1
            tl.store(row_of_pair_ptr + slot * K + k, position.to(tl.int32), mask=hit)
            tl.store(slot_of_row_ptr + position, slot, mask=hit)
            tl.store(src_rank_ptr + position, src, mask=hit)
            token = tl.load(meta + slot * META_W, mask=hit, other=-1)
            tl.store(src_token_ptr + position, token.to(tl.int64), mask=hit)
            bits = tl.load(meta + slot * META_W + 1 + K + k, mask=hit, other=0)
            tl.store(weight_ptr + position, bits.to(tl.float32, bitcast=True), mask=hit)
            row += tl.sum(hit.to(tl.int64), axis=0)
    else:  # the last program: pairs not here, padding rows, tokens per source, offsets[0]
        tl.store(offsets_ptr, 0)
        tokens_from = tl.load(flags + qs * FLAG_W + 1, mask=qs < W, other=0)
        tl.store(recv_counts_ptr + qs, tokens_from, mask=qs < W)
        for s0 in range(0, S, BLOCK_S):
            slot, k, _, ok, ids = _slot_pairs(flags, meta, s0, S, per_source, K, FLAG_W, META_W, BLOCK_S, BLOCK_K)
            here = ok & (ids - expert_start >= 0) & (ids - expert_start < E_local)
            tl.store(row_of_pair_ptr + slot * K + k, -1, mask=(slot < S) & (k < K) & ~here)
        for r0 in range(total, R_out, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            pad = rows < R_out
            tl.store(slot_of_row_ptr + rows, 0, mask=pad)
            tl.store(src_rank_ptr + rows, -1, mask=pad)
            tl.store(src_token_ptr + rows, -1, mask=pad)
            tl.store(weight_ptr + rows, 0.0, mask=pad)


@triton.jit
def _gather_rows_kernel(recv_ptr, epoch_ptr, slot_of_row_ptr, offsets_ptr, out_ptr, S, H, E_local,
                        RING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    first = tl.program_id(0) * BLOCK_R
    num_rows = tl.load(offsets_ptr + E_local)
    if first < num_rows:  # the padding rows after them stay as they are
        rows = first + tl.arange(0, BLOCK_R)
        is_row = rows < num_rows
        ring = current_ring(epoch_ptr, RING)
        slot = tl.load(slot_of_row_ptr + rows, mask=is_row, other=0) + ring * S
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = is_row[:, None] & (cols[None, :] < H)
            tile = tl.load(recv_ptr + slot[:, None] * H + cols[None, :], mask=mask)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], tile, mask=mask)


def expand_received(
    flags: torch.Tensor, meta: torch.Tensor, recv: torch.Tensor, epoch: torch.Tensor, expert_start: int,
    num_local_experts: int, num_rows: int,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The tokens that arrived in this epoch's ring slot, one row per (token, local expert), grouped by local
    expert, then by slot (source rank, then its token order), then by top-k column. S = W * per_source slots.

    flags int32 [RING, W, 2 + E_local] (this rank's dispatch flags), meta int32 [RING, S, 1 + 2K], recv
    [RING, S, H], epoch int32 [1]; num_rows: rows to return (>= the rows that arrived; those past them are
    padding: src -1, weight 0, values unspecified). Returns (recv_x [num_rows, H], row_of_pair int32 [S, K]
    (-1: that pair is not a row here), src_rank int64, src_token int64, weight float32 [num_rows],
    local_counts int64 [E_local], local_offsets int64 [E_local + 1], recv_counts int32 [W]).
    """
    ring_slots, W, flag_width = flags.shape
    _, S, meta_width = meta.shape
    K, device = (meta_width - 1) // 2, recv.device
    row_of_pair = torch.empty(S, K, dtype=torch.int32, device=device)
    slot_of_row, src_rank, src_token = (torch.empty(num_rows, dtype=torch.int64, device=device) for _ in range(3))
    weight = torch.empty(num_rows, dtype=torch.float32, device=device)
    counts = torch.empty(num_local_experts, dtype=torch.int64, device=device)
    offsets = torch.empty(num_local_experts + 1, dtype=torch.int64, device=device)
    recv_counts = torch.empty(W, dtype=torch.int32, device=device)
    block_s = max(1, 256 // triton.next_power_of_2(K))
    _expand_received_kernel[(num_local_experts * W + 1,)](
        flags, meta, epoch, row_of_pair, slot_of_row, src_rank, src_token, weight, counts, offsets, recv_counts,
        S, S // W, W, K, num_local_experts, expert_start, num_rows, flag_width, meta_width,
        RING=ring_slots, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(K), BLOCK_W=triton.next_power_of_2(W),
        BLOCK_E=triton.next_power_of_2(num_local_experts), BLOCK_R=256,
    )  # fmt: skip
    recv_x = gather_rows(recv, epoch, slot_of_row, offsets)
    return recv_x, row_of_pair, src_rank, src_token, weight, counts, offsets, recv_counts


def gather_rows(
    recv: torch.Tensor, epoch: torch.Tensor, slot_of_row: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """recv [RING, S, H] (a stage's receive buffer), epoch int32 [1], slot_of_row int64 [R], offsets int64
    [E_local + 1] -> rows [R, H]: row r = recv[current ring slot, slot_of_row[r]] for r < offsets[-1]; the
    rows after them (padding) are left unset."""
    ring_slots, S, H = recv.shape
    num_rows = slot_of_row.numel()
    rows = recv.new_empty(num_rows, H)
    block_r = 4
    if num_rows:
        _gather_rows_kernel[(triton.cdiv(num_rows, block_r),)](
            recv, epoch, slot_of_row, offsets, rows, S, H, offsets.numel() - 1,
            RING=ring_slots, BLOCK_R=block_r, BLOCK_H=columns_per_step(H),
        )  # fmt: skip
    return rows


@triton.jit
def _send_tokens_back_kernel(
    out_ptr,
    weight_ptr,
    row_of_pair_ptr,
    counts_ptr,
    back_table,
    flag_table,
    done_ptr,
    epoch_ptr,
    H,
    K,
    stride_out,
    per_source,
    my_rank,
    W,
    FLAG_W,
    C,
    RING: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    epoch, ring = next_epoch(epoch_ptr, RING)
    slot = tl.program_id(0).to(tl.int64)  # src * per_source + j
    ks = tl.arange(0, BLOCK_K)
    rows = tl.load(row_of_pair_ptr + slot * K + ks, mask=ks < K, other=-1)
    if tl.max(rows, axis=0) >= 0:  # a token arrived in this slot (it has a row here)
        src = slot // per_source
        back = tl.load(back_table + src).to(tl.pointer_type(out_ptr.dtype.element_ty))
        dst = back + (ring.to(tl.int64) * W * per_source + my_rank * per_source + slot - src * per_source) * H
        for h0 in range(tl.program_id(1) * BLOCK_H, H, tl.num_programs(1) * BLOCK_H):  # this program's columns
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for k in range(K):
                row = tl.load(row_of_pair_ptr + slot * K + k).to(tl.int64)
                if row >= 0:
                    weight = tl.load(weight_ptr + row)
                    acc += weight * tl.load(out_ptr + row * stride_out + cols, mask=mask).to(tl.float32)
            tl.store(dst + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
    programs = tl.num_programs(0) * tl.num_programs(1)
    signal_when_last(
        done_ptr, epoch_ptr, epoch, flag_table, ring * W * FLAG_W, counts_ptr, my_rank, programs, W, FLAG_W, C,
        BLOCK_C,
    )  # fmt: skip


def send_tokens_back(
    expert_out: torch.Tensor,
    row_weight: torch.Tensor,
    row_of_pair: torch.Tensor,
    counts: torch.Tensor,
    back_table: torch.Tensor,
    signal: Signal,
) -> None:
    """expert_out [R, H], row_weight float32 [R]; the token in receive slot s = src * per_source + j (of
    S = W * per_source) has its rows at row_of_pair int32 [S, K] (-1: not a row; all -1: no token there):
    sum_rows weight * expert_out goes to row my_rank * per_source + j of rank src's back ring slot, then
    the signal carries counts int32 [W, 1]: tokens going back to each rank."""
    H = expert_out.shape[1]
    S, K = row_of_pair.shape
    W = counts.shape[0]
    block_h = columns_per_step(H)
    # a few programs per slot when the slots are few (decode): each program counts itself done on one
    # atomic, so many thousands of them would queue there instead
    column_programs = max(1, min(triton.cdiv(max(H, 1), block_h), triton.cdiv(_ENOUGH_PROGRAMS, S)))
    _send_tokens_back_kernel[(S, column_programs)](
        expert_out, row_weight, row_of_pair, counts, back_table, signal.flag_table, signal.done, signal.epoch,
        H, K, expert_out.stride(0), S // W, signal.my_rank, W, signal.flag_width, counts.shape[1],
        RING=signal.ring_slots, BLOCK_K=triton.next_power_of_2(K), BLOCK_H=block_h,
        BLOCK_C=triton.next_power_of_2(counts.shape[1]),
    )  # fmt: skip


@triton.jit
def _reduce_to_output_kernel(
    back_ptr, epoch_ptr, positions_ptr, shared_ptr, y_ptr, H, stride_shared, ring_rows, column_rows, N,
    RING: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    first_row = current_ring(epoch_ptr, RING) * ring_rows
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c in range(N):
        pos = tl.load(positions_ptr + token * N + c)
        if pos >= 0:
            row = first_row + c * column_rows + pos.to(tl.int64)
            acc += tl.load(back_ptr + row * H + cols, mask=mask).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + token * stride_shared + cols, mask=mask).to(tl.float32)
    tl.store(y_ptr + token * H + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_and_copy_to_output(
    back: torch.Tensor,
    epoch: torch.Tensor,
    positions: torch.Tensor,
    shared_out: torch.Tensor | None,
    column_rows: int,
) -> torch.Tensor:
    """back [RING, S, H] (this rank's back buffer; the slot of epoch int32 [1] is read), positions int [T, N]
    (token t's results sit at rows c * column_rows + positions[t, c] of that slot; -1: none in column c),
    shared_out [T, H] or None -> y [T, H] in back's dtype, the rows summed in float32 (+ shared_out).
    nvshmem_triton: column q = rank q, column_rows = per_source; the symmetric layout: column k = the token's
    k-th pair, column_rows = 0 (positions are rows)."""
    T, N = positions.shape
    H = back.shape[2]
    y = back.new_empty(T, H)
    if T == 0 or H == 0:
        return y
    block_h = columns_per_step(H)
    shared = shared_out if shared_out is not None else y
    _reduce_to_output_kernel[(T, triton.cdiv(H, block_h))](
        back, epoch, positions.contiguous(), shared, y, H, shared.stride(0), back.shape[1], column_rows, N,
        RING=back.shape[0], HAS_SHARED=shared_out is not None, BLOCK_H=block_h,
    )  # fmt: skip
    return y
