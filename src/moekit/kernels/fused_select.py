"""fused_select: softmax over E experts and top-k selection in one Triton kernel (softmax_topk semantics).

One program routes BLOCK_T tokens: it loads their logits [BLOCK_T, BLOCK_E] (E padded to a power of two
with -inf), takes the row max and, in fp32, the softmax denominator, then picks K experts by K rounds of
"the largest logit not yet taken, ties to the lowest index". It ranks the logits rather than the
probabilities: exp is monotone, so the order is the same, and logits do not underflow to equal zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.topk_rounds import best_untaken

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _fused_select_kernel(
    logits_ptr,
    ids_ptr,
    weights_ptr,
    T,
    E,
    stride_t,
    stride_e,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    offsets = rows64[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e
    x = tl.load(logits_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    x = x.to(tl.float32)
    row_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)  # rows past T: 0, not -inf - -inf = NaN
    p = tl.exp(x - row_max[:, None])  # padding: exp(-inf) = 0

    # NaN (only reachable with route(check_values=False)) ranks lowest, so ids stay distinct and in range
    rank = tl.where(x == x, x, float("-inf"))
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    # range, not static_range: K may be as large as E (1024), too many rounds to unroll. K is constexpr (a
    # model has one K, so one compile) because the interpreter's runtime loop bounds go through a NumPy
    # array-to-int conversion that NumPy deprecates
    for k in range(K):
        idx, best = best_untaken(rank, taken, col_ok, cols, BLOCK_E)
        taken = taken | (cols[None, :] == idx[:, None])
        here = slots[None, :] == k
        ids = tl.where(here, idx[:, None], ids)
        chosen = tl.where(here, tl.exp(best - row_max)[:, None], chosen)  # = p[idx]

    if RENORMALIZE:
        total = tl.sum(tl.where(taken, p, 0.0), axis=1)
    else:
        total = tl.sum(p, axis=1)
    weights = chosen / tl.where(row_ok, total, 1.0)[:, None]  # rows past T have total 0

    out = rows64[:, None] * K + slots[None, :]
    out_mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(ids_ptr + out, ids, mask=out_mask)
    tl.store(weights_ptr + out, weights, mask=out_mask)


def _launch_config(num_experts: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) for E experts.

    The tile BLOCK_T x BLOCK_E is held at about 2048 fp32 values (16 per thread at 4 warps): small E packs
    many tokens into a program (E = 8: 128 rows), so each program does enough work and the K rounds of
    reductions are shared by many rows; large E keeps a few rows (E = 256: 8 rows, E = 1024: 2 rows) so the
    logits, probabilities and the taken mask stay in registers. 4 warps suffice up to 2048 values; a single
    row wider than that gets 8 warps to keep the per-thread share at 16 or less.
    """
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(128, 2048 // block_e))
    num_warps = 4 if block_t * block_e <= 2048 else 8
    return block_t, block_e, num_warps


def fused_select(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float16/bfloat16/float32 -> (topk_ids [T, K] int32, topk_weights [T, K] float32).

    topk_ids are best first, ties to the lower expert index; topk_weights are the softmax probabilities
    of the chosen experts, renormalised to sum to 1 over the K when `renormalize`. No host synchronisation.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32 for fused_select, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (T, E), got {tuple(logits.shape)}")
    T, E = logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}], got {top_k!r}")
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    block_t, block_e, num_warps = _launch_config(E)
    _fused_select_kernel[(triton.cdiv(T, block_t),)](
        logits,
        ids,
        weights,
        T,
        E,
        logits.stride(0),
        logits.stride(1),
        K=top_k,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        RENORMALIZE=bool(renormalize),
        num_warps=num_warps,
    )
    return ids, weights
