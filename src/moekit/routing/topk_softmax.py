"""topk_softmax: the K largest logits, then a softmax over those K (Mixtral's order of operations)."""

import torch

from moekit.routing.registry import ROUTERS, Routing, score_dtype, stable_topk


@ROUTERS.register("topk_softmax", trains=True)
def topk_softmax(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing; weights sum to 1 over the K chosen experts."""
    top_logits, ids = stable_topk(logits.to(score_dtype(logits)), config.top_k)
    return Routing(ids.to(torch.int32), torch.softmax(top_logits, dim=-1))
