"""grouped_topk (DeepSeek-V3 routing) in one Triton kernel: the router moekit.routing.grouped_topk runs on CUDA.

One program routes BLOCK_T tokens, their logits [BLOCK_T, BLOCK_E] in registers (E padded to a power of two):
scores = sigmoid(logits) in float32, biased = scores + correction bias; each of the G groups scores the sum
of its two best biased scores (its best when a group holds one expert); topk_group rounds of "the best
group not yet kept, ties to the lower index" keep groups; K rounds of "the best biased score of a kept
expert not yet taken, ties to the lower index" pick the experts; their weights are the unbiased scores,
renormalised when asked, times the routed scaling factor. The torch version is ~15 kernels and a sort per
top-k, which at decode and prefill sizes alike leaves the GPU waiting on their launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.topk_rounds import best_untaken


@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, T, E, stride_t, stride_e, experts_per_group, num_groups,
    topk_group, scale,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, TWO_PER_GROUP: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    groups = tl.arange(0, BLOCK_G)
    slots = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < T, cols < E
    rows64 = rows.to(tl.int64)
    offsets = rows64[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e
    x = tl.load(logits_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    scores = tl.sigmoid(x)
    biased = scores
    if HAS_BIAS:
        biased += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # NaN (only reachable with route(check_values=False)) and padding rank lowest: ids stay distinct, in range
    rank = tl.where((biased == biased) & col_ok[None, :], biased, float("-inf"))
    group_of = cols // experts_per_group  # padding columns fall past the last group

    group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    for g in range(num_groups):
        in_group = (group_of == g)[None, :]
        cur = tl.where(in_group, rank, float("-inf"))
        first = tl.max(cur, axis=1)
        score = first
        if TWO_PER_GROUP:  # remove one instance of the best, take the best again
            at = tl.min(tl.where(in_group & (cur == first[:, None]), cols[None, :], BLOCK_E), axis=1)
            score += tl.max(tl.where(cols[None, :] == at[:, None], float("-inf"), cur), axis=1)
        group_scores = tl.where(groups[None, :] == g, score[:, None], group_scores)

    kept_group = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)
    kept_expert = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    # (the names differ from the loop above's g: Triton would carry g's type into this loop)
    for _round in range(topk_group):
        best_group, _group_score = best_untaken(group_scores, kept_group, groups < num_groups, groups, BLOCK_G)
        kept_group = kept_group | (groups[None, :] == best_group[:, None])
        kept_expert = kept_expert | (group_of[None, :] == best_group[:, None])

    selectable = tl.where(kept_expert, rank, float("-inf"))
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(K):
        idx, _score = best_untaken(selectable, taken, col_ok, cols, BLOCK_E)
        pick = cols[None, :] == idx[:, None]
        taken = taken | pick
        here = slots[None, :] == k
        ids = tl.where(here, idx[:, None], ids)
        weights = tl.where(here, tl.sum(tl.where(pick, scores, 0.0), axis=1)[:, None], weights)
    if RENORMALIZE:
        total = tl.sum(weights, axis=1)
        weights = weights / tl.where(row_ok, total, 1.0)[:, None]
    weights = weights * scale

    out = rows64[:, None] * K + slots[None, :]
    out_mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(ids_ptr + out, ids, mask=out_mask)
    tl.store(weights_ptr + out, weights, mask=out_mask)


def grouped_topk_triton(
    logits: torch.Tensor, config, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float16/bfloat16/float32 (checked by moekit.routing.route), correction_bias [E] or None
    -> (topk_ids [T, K] int32, topk_weights [T, K] float32), grouped_topk's semantics (config's n_group,
    topk_group, renormalize, routed_scaling_factor). No host synchronisation."""
    T, E = logits.shape
    K = config.top_k
    ids = torch.empty(T, K, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, K, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(128, 2048 // block_e))  # the tile held at ~2048 values, as fused_select's
    bias = correction_bias.to(torch.float32).contiguous() if correction_bias is not None else weights
    _grouped_topk_kernel[(triton.cdiv(T, block_t),)](
        logits, bias, ids, weights, T, E, logits.stride(0), logits.stride(1), config.experts_per_group,
        config.n_group, config.topk_group, float(config.routed_scaling_factor),
        K=K, HAS_BIAS=correction_bias is not None, TWO_PER_GROUP=config.experts_per_group >= 2,
        RENORMALIZE=bool(config.renormalize), BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_G=triton.next_power_of_2(config.n_group), BLOCK_K=triton.next_power_of_2(K),
        num_warps=4 if block_t * block_e <= 2048 else 8,
    )  # fmt: skip
    return ids, weights
