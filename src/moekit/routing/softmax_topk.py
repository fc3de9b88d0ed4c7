"""softmax_topk: softmax over all E experts, then the K largest; optionally renormalised to sum to 1."""

import torch

from moekit.routing.registry import ROUTERS, Routing, score_dtype, stable_topk


@ROUTERS.register("softmax_topk", trains=True)
def softmax_topk(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing; weights are the softmax probabilities of the chosen experts."""
    probs = torch.softmax(logits.to(score_dtype(logits)), dim=-1)
    weights, ids = stable_topk(probs, config.top_k)
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids.to(torch.int32), weights)
