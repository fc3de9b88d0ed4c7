"""The symmetric (FlashMoE) layout's bookkeeping on the device: where a rank's pairs go, where a rank finds
what arrived. Each side is one or two launches and never waits for the device, so a dispatch costs a few
kernel launches of host time instead of tens of small torch ops.

plan_pairs     the sender: moekit.ep.symmetric.pair_slots (pair p = t * K + k of expert g takes slot s = its
               rank among this rank's pairs of g, pairs ascending) and the position g * C + s it is stored
               at (-1 above the capacity C), with its (token, router weight bits) and the counts the sender
               signals every rank (moekit.ep.symmetric_triton). One kernel counts the pairs per expert
               in blocks (its last program scans the block counts and writes the signal counts), one
               places every pair.
receive_rows   the receiver: the rows the sources stored into a ring slot of its buffer, listed grouped
               by local expert, then source rank, then slot, with their source rank, token and weight
               (and padding rows after them up to a fixed count, for symmetric_triton_graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.peer_puts import current_ring, last_to_finish, scan_block_counts

_PAIRS_PER_PROGRAM = 64  # a program ranks its pairs among each other: a [64, 64] comparison
_SCAN_BLOCK = 32  # block counts one step of the last program's scan takes
SUMMARY = 4  # the signal counts' first columns: moekit.ep.symmetric.pair_summary


@triton.jit
def _count_pairs_kernel(
    ids_ptr, block_counts_ptr, signal_counts_ptr, done_ptr, N, E, E_local, W, C, SIGNAL_W,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    pairs = block * BLOCK_P + tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + pairs, mask=pairs < N, other=0).to(tl.int32)
    es = tl.arange(0, BLOCK_E)
    tl.store(block_counts_ptr + block * E + es, tl.histogram(ids, BLOCK_E, mask=pairs < N), mask=es < E)
    blocks = tl.num_programs(0)
    if last_to_finish(done_ptr, blocks, "gpu"):  # block counts -> each block's first slot per expert
        counts = scan_block_counts(block_counts_ptr, blocks, E, BLOCK_E, BLOCK_B)
        # row q of the signal counts: pair_summary (dropped, fullest expert, its pairs, kept), then the
        # pairs kept for each of q's local experts
        kept = tl.minimum(counts, C)
        qs = tl.arange(0, BLOCK_W)
        rows = signal_counts_ptr + qs * SIGNAL_W
        every_row = tl.zeros([BLOCK_W], dtype=tl.int32)
        tl.store(rows, every_row + tl.sum(counts - kept), mask=qs < W)
        tl.store(rows + 1, every_row + tl.argmax(counts, axis=0), mask=qs < W)
        tl.store(rows + 2, every_row + tl.max(counts), mask=qs < W)
        tl.store(rows + 3, every_row + tl.sum(kept), mask=qs < W)
        tl.store(signal_counts_ptr + (es // E_local) * SIGNAL_W + 4 + es % E_local, kept, mask=es < E)


@triton.jit
def _place_pairs_kernel(
    ids_ptr, weights_ptr, block_starts_ptr, position_ptr, token_ptr, meta_ptr, N, K, E, C,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    ps = tl.arange(0, BLOCK_P)
    pairs = block * BLOCK_P + ps
    valid = pairs < N
    ids = tl.load(ids_ptr + pairs, mask=valid, other=-1).to(tl.int32)
    same_before = (ids[:, None] == ids[None, :]) & (ps[None, :] < ps[:, None])  # [p, p']: p' earlier, same expert
    slot = tl.load(block_starts_ptr + block * E + ids, mask=valid, other=0) + tl.sum(same_before.to(tl.int32), 1)
    position = tl.where(slot < C, ids.to(tl.int64) * C + slot, -1)
    token = pairs // K
    tl.store(position_ptr + pairs, position, mask=valid)
    tl.store(token_ptr + pairs, token.to(tl.int64), mask=valid)
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    tl.store(meta_ptr + pairs * 2, token.to(tl.int32), mask=valid)
    tl.store(meta_ptr + pairs * 2 + 1, weight.to(tl.int32, bitcast=True), mask=valid)


def plan_pairs(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    world_size: int,
    done: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] in [0, E) (E = num_experts, E_local = E / world_size per rank), topk_weights [T, K]
    -> (position int64 [T * K]: pair p's g * C + slot, -1 when slot >= C; token int64 [T * K]: p // K;
    meta int32 [T * K, 2]: (token, router weight as float32 bits); signal_counts int32 [W, 4 + E_local]:
    row q = pair_summary of this rank's pairs per expert, then its pairs kept per local expert of q).
    done: int32 [1], zero between calls."""
    T, K = topk_ids.shape
    N, device = T * K, topk_ids.device
    E_local = num_experts // world_size
    position = torch.empty(N, dtype=torch.int64, device=device)
    token = torch.empty(N, dtype=torch.int64, device=device)
    meta = torch.empty(N, 2, dtype=torch.int32, device=device)
    signal_counts = torch.empty(world_size, SUMMARY + E_local, dtype=torch.int32, device=device)
    blocks = max(1, triton.cdiv(N, _PAIRS_PER_PROGRAM))  # one program at least: it writes the signal counts
    block_starts = torch.empty(blocks, num_experts, dtype=torch.int32, device=device)
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    _count_pairs_kernel[(blocks,)](
        topk_ids, block_starts, signal_counts, done, N, num_experts, E_local, world_size, capacity,
        SUMMARY + E_local, BLOCK_P=_PAIRS_PER_PROGRAM, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_W=triton.next_power_of_2(world_size), BLOCK_B=_SCAN_BLOCK,
    )  # fmt: skip
    if N:
        _place_pairs_kernel[(blocks,)](
            topk_ids, topk_weights, block_starts, position, token, meta, N, K, num_experts, capacity,
            BLOCK_P=_PAIRS_PER_PROGRAM,
        )  # fmt: skip
    return position, token, meta, signal_counts


@triton.jit
def _receive_rows_kernel(
    flags_ptr, meta_ptr, epoch_ptr, slot_of_row_ptr, src_ptr, src_token_ptr, weight_ptr, counts_ptr,
    offsets_ptr, W, E_local, C, FLAG_W, FIRST_COUNT, num_rows, RING: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    ring = current_ring(epoch_ptr, RING)
    qs, es = tl.arange(0, BLOCK_W), tl.arange(0, BLOCK_E)
    flags = flags_ptr + ring * W * FLAG_W + qs[:, None] * FLAG_W + FIRST_COUNT + es[None, :]
    pairs = tl.load(flags, mask=(qs[:, None] < W) & (es[None, :] < E_local), other=0).to(tl.int64)  # [src, e]
    per_expert = tl.sum(pairs, axis=0)
    program = tl.program_id(0)
    if program < E_local * W:  # the rows of expert e from rank q
        e, q = program // W, program % W
        before = tl.where((qs[:, None] < q) & (es[None, :] == e), pairs, 0)  # expert e's rows from ranks before q
        first_row = tl.sum(tl.where(es < e, per_expert, 0)) + tl.sum(before)
        if q == 0:
            tl.store(counts_ptr + e, tl.sum(tl.where(es == e, per_expert, 0)))
            tl.store(offsets_ptr + e + 1, tl.sum(tl.where(es <= e, per_expert, 0)))
        n = tl.sum(tl.where((qs[:, None] == q) & (es[None, :] == e), pairs, 0))
        first_slot = (q * E_local + e).to(tl.int64) * C
        for s0 in range(0, n, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            here = s < n
            row, slot = first_row + s, first_slot + s
            tl.store(slot_of_row_ptr + row, slot, mask=here)
            tl.store(src_ptr + row, q.to(tl.int64), mask=here)
            meta = meta_ptr + (ring * W * E_local * C + slot) * 2
            tl.store(src_token_ptr + row, tl.load(meta, mask=here).to(tl.int64), mask=here)
            tl.store(weight_ptr + row, tl.load(meta + 1, mask=here).to(tl.float32, bitcast=True), mask=here)
    else:  # the last program: offsets[0] and the padding rows after the received ones
        tl.store(offsets_ptr, 0)
        for r0 in range(tl.sum(per_expert), num_rows, BLOCK_S):
            rows = r0 + tl.arange(0, BLOCK_S)
            pad = rows < num_rows
            tl.store(slot_of_row_ptr + rows, -1, mask=pad)
            tl.store(src_ptr + rows, -1, mask=pad)
            tl.store(src_token_ptr + rows, -1, mask=pad)
            tl.store(weight_ptr + rows, 0.0, mask=pad)


def receive_rows(
    flags: torch.Tensor, first_count: int, meta: torch.Tensor, epoch: torch.Tensor, capacity: int, num_rows: int
) -> tuple[torch.Tensor, ...]:
    """The pairs in the stage's current ring slot, listed grouped by local expert, then source rank, then slot.

    flags int32 [RING, W, FLAG_W] (this rank's dispatch flags: row p holds, from column first_count on, the
    pairs p stored for each local expert), meta int32 [RING, W * E_local * C, 2] (source token, weight
    bits), epoch int32 [1]; num_rows: at least the sum of those counts, R (the rows past it are padding:
    slot -1, src -1, token -1, weight 0). Returns (slot_of_row int64 [num_rows]: the row's position
    (p * E_local + e) * C + s in a ring slot, src_rank int64, src_token int64, weight float32 [num_rows],
    local_counts int64 [E_local], local_offsets int64 [E_local + 1]: R rows in all)."""
    ring_slots, W, flag_width = flags.shape
    E_local = meta.shape[1] // (W * capacity)
    device = flags.device
    slot_of_row, src_rank, src_token = (torch.empty(num_rows, dtype=torch.int64, device=device) for _ in range(3))
    weight = torch.empty(num_rows, dtype=torch.float32, device=device)
    counts = torch.empty(E_local, dtype=torch.int64, device=device)
    offsets = torch.empty(E_local + 1, dtype=torch.int64, device=device)
    _receive_rows_kernel[(E_local * W + 1,)](
        flags, meta, epoch, slot_of_row, src_rank, src_token, weight, counts, offsets, W, E_local, capacity,
        flag_width, first_count, num_rows, RING=ring_slots, BLOCK_W=triton.next_power_of_2(W),
        BLOCK_E=triton.next_power_of_2(E_local), BLOCK_S=256,
    )  # fmt: skip
    return slot_of_row, src_rank, src_token, weight, counts, offsets


__all__ = ["plan_pairs", "receive_rows"]
