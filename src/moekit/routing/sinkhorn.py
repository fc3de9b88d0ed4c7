"""sinkhorn: balanced assignment by Sinkhorn-Knopp normalisation of exp(logits / temperature)."""

import torch

from moekit.routing.registry import ROUTERS, Routing, score_dtype, stable_topk


def sinkhorn_log_plan(logits: torch.Tensor, iterations: int, temperature: float) -> torch.Tensor:
    """logits [T, E] -> log of a transport plan whose rows sum to 1 and columns to about T / E.

    Each iteration normalises the rows, then the columns, in log space (no overflow for large logits).
    """
    T, E = logits.shape
    log_plan = logits / temperature
    # log(T / E) as a tensor op: T stays symbolic when the router is exported with a dynamic batch (ONNX);
    # with T = 0 it is -inf, added to an empty plan
    column_mass = torch.log(torch.full((), T, dtype=logits.dtype, device=logits.device) / E)
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True) + column_mass
    return log_plan


@ROUTERS.register("sinkhorn", trains=True)
def sinkhorn(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing: experts chosen from the balanced plan, weighted by the softmax of the
    logits at the chosen experts, renormalised to sum to 1 (the plan decides who, the router how much)."""
    scores = logits.to(score_dtype(logits))
    plan = sinkhorn_log_plan(scores, config.sinkhorn_iterations, config.sinkhorn_temperature)
    ids = stable_topk(plan, config.top_k)[1]
    weights = torch.softmax(scores, dim=-1).gather(1, ids)
    return Routing(ids.to(torch.int32), weights / weights.sum(dim=-1, keepdim=True))
