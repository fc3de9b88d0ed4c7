"""One round of a top-k held in registers, shared by the router kernels (fused_select, grouped_topk)."""

import triton
import triton.language as tl


@triton.jit
def best_untaken(values, taken, valid, index, BLOCK: tl.constexpr):
    """values [R, BLOCK], taken and valid masks -> (index [R] of the largest value not yet taken, ties to the
    lower index, and that value). -inf values are still chosen, lowest index first, once nothing larger is
    left: an untaken valid entry always scores the best or less, so a candidate exists even at -inf."""
    cur = tl.where(taken, float("-inf"), values)
    best = tl.max(cur, axis=1)
    candidate = (cur == best[:, None]) & (taken == 0) & valid[None, :]
    return tl.min(tl.where(candidate, index[None, :], BLOCK), axis=1), best
