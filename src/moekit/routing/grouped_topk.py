"""grouped_topk: DeepSeek-V3's router (sigmoid scores, correction bias, group-limited top-k, scaling).

On CUDA (float16/bfloat16/float32 logits, Triton installed) it is one Triton kernel
(moekit.kernels.grouped_topk); elsewhere, and for float64 logits, the torch ops below, which define it.
Under autograd the kernel's choice stands and the weights are recomputed from the logits in torch ops
(chosen_weights), so that they carry the gradient the kernel's output does not.
"""

import torch

from moekit.kernels.availability import triton_on_cuda
from moekit.routing.registry import ROUTERS, Routing, score_dtype, stable_topk


@ROUTERS.register("grouped_topk", trains=True)
def grouped_topk(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E], correction_bias [E] or None -> Routing (see grouped_topk_torch)."""
    if triton_on_cuda(logits.device, logits.dtype):
        from moekit.kernels.grouped_topk import grouped_topk_triton  # imports triton: only when it runs

        ids, weights = grouped_topk_triton(logits, config, correction_bias)
        if torch.is_grad_enabled() and logits.requires_grad:
            weights = chosen_weights(torch.sigmoid(logits.to(score_dtype(logits))), ids, config)
        return Routing(ids, weights)
    return grouped_topk_torch(logits, config, correction_bias)


def grouped_topk_torch(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E], correction_bias [E] or None -> Routing.

    scores = sigmoid(logits); the bias shifts which experts are chosen, not their weights.
    A group's score is the sum of its two best biased scores (its best one when a group holds one
    expert); each token keeps topk_group groups and picks K experts among them. The weights are the
    unbiased scores, renormalised to sum to 1 when config.renormalize, times routed_scaling_factor.
    """
    T, E = logits.shape
    scores = torch.sigmoid(logits.to(score_dtype(logits)))
    biased = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)
    per_group = biased.view(T, config.n_group, config.experts_per_group)
    group_scores = stable_topk(per_group, min(2, config.experts_per_group))[0].sum(dim=-1)
    kept_groups = stable_topk(group_scores, config.topk_group)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_mask = group_mask.repeat_interleave(config.experts_per_group, dim=1)
    ids = stable_topk(biased.masked_fill(~expert_mask, float("-inf")), config.top_k)[1]
    return Routing(ids.to(torch.int32), chosen_weights(scores, ids, config))


def chosen_weights(scores: torch.Tensor, ids: torch.Tensor, config) -> torch.Tensor:
    """scores [T, E] (the unbiased sigmoid of the logits), the chosen ids [T, K] -> their weights [T, K]: the
    chosen scores, renormalised to sum to 1 when config.renormalize, times routed_scaling_factor."""
    weights = scores.gather(1, ids.long())
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * config.routed_scaling_factor
