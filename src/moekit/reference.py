"""The oracle: a pure-PyTorch MoE forward in float64, written for clarity. Every fast path is held to it.

Routing is computed token by token, with the tie rule spelled out (lower expert index first);
experts are applied by gathering each expert's tokens; nothing is fused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.quantize import QuantizedMoEWeights, quantize_rows
from moekit.weights import MoEWeights


@dataclass(frozen=True)
class ReferenceRouting:
    """topk_ids [T, K] int64, topk_weights [T, K] float64, and selection_scores [T, E] float64:
    the scores the router ranked (chosen experts are the K best, ties to the lower index)."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    selection_scores: torch.Tensor


def _best(scores: list[float], candidates, k: int) -> list[int]:
    """The k candidates with the highest score; on equal scores the lower index comes first."""
    return sorted(candidates, key=lambda e: (-scores[e], e))[:k]


def _sinkhorn_plan(logits: torch.Tensor, iterations: int, temperature: float) -> torch.Tensor:
    """[T, E] float64: exp(logits / temperature) scaled so rows sum to 1 and columns to T / E."""
    T, E = logits.shape
    if T == 0:
        return logits.clone()
    plan = torch.exp((logits - logits.max()) / temperature)
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True) * (T / E)
    return plan


def reference_route(
    logits: torch.Tensor, config: MoEConfig, correction_bias: torch.Tensor | None = None
) -> ReferenceRouting:
    """logits [T, E] -> ReferenceRouting, in float64, one token at a time."""
    logits = logits.double().cpu()
    T, E = logits.shape
    K = config.top_k
    kind = "softmax_topk" if config.router == "fused_select" else config.router  # the same router, fused
    if kind == "softmax_topk":
        selection = torch.softmax(logits, dim=1)
    elif kind == "topk_softmax":
        selection = logits
    elif kind == "grouped_topk":
        sigmoid = torch.sigmoid(logits)
        bias = torch.zeros(E, dtype=torch.float64) if correction_bias is None else correction_bias.double().cpu()
        selection = sigmoid + bias
    elif kind == "sinkhorn":
        selection = _sinkhorn_plan(logits, config.sinkhorn_iterations, config.sinkhorn_temperature)
    else:
        raise ValueError(f"reference_route has no definition of router {kind!r}")

    ids = torch.empty(T, K, dtype=torch.int64)
    weights = torch.empty(T, K, dtype=torch.float64)
    for t in range(T):
        scores = selection[t].tolist()
        candidates = range(E)
        if kind == "grouped_topk":
            size = config.experts_per_group
            group_score = [
                sum(sorted(scores[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(config.n_group)
            ]
            groups = set(_best(group_score, range(config.n_group), config.topk_group))
            candidates = [e for e in range(E) if e // size in groups]
        chosen = _best(scores, candidates, K)
        ids[t] = torch.tensor(chosen)
        if kind == "softmax_topk":
            w = selection[t, chosen]
            weights[t] = w / w.sum() if config.renormalize else w
        elif kind == "topk_softmax":
            weights[t] = torch.softmax(logits[t, chosen], dim=0)
        elif kind == "grouped_topk":
            w = sigmoid[t, chosen]
            w = w / w.sum() if config.renormalize else w
            weights[t] = w * config.routed_scaling_factor
        else:  # sinkhorn: the plan chooses, the softmax of the logits weighs
            w = torch.softmax(logits[t], dim=0)[chosen]
            weights[t] = w / w.sum()
    return ReferenceRouting(ids, weights, selection)


def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [N, H], w_gate_up [2F, H] (gate rows first), w_down [H, F] -> down(silu(gate(x)) * up(x)) [N, H]."""
    gate, up = (x @ w_gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down.T


def reference_experts(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights
) -> torch.Tensor:
    """x [T, H], topk_ids/topk_weights [T, K] -> sum_k w_k * expert_{id_k}(x) [T, H] float64 (CPU).

    Gathers each expert's tokens, runs the expert, and adds the weighted result back.
    """
    x = x.double().cpu()
    topk_ids, topk_weights = topk_ids.long().cpu(), topk_weights.double().cpu()
    y = torch.zeros_like(x)
    for e in range(weights.w_gate_up.shape[0]):
        token_idx, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        out = expert_mlp(x[token_idx], weights.w_gate_up[e].double().cpu(), weights.w_down[e].double().cpu())
        y.index_add_(0, token_idx, out * topk_weights[token_idx, slot, None])
    return y


def reference_experts_fp8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: QuantizedMoEWeights,
) -> torch.Tensor:
    """The FP8 recipe's routed experts, in float64 (CPU) on the dequantized values: x [T, H] quantized as the
    weights' scheme says (per 1 x 128 tile or per row, moekit.quantize.quantize_rows), each expert's gate/up and
    SwiGLU, that activation quantized the same way, then down; the weighted top-k sum [T, H].

    An FP8 backend computes the same values: what remains between the two is the order of the float32 sums.
    """
    block = weights.w_gate_up.block_size
    y = torch.zeros(x.shape, dtype=torch.float64)
    topk_weights = topk_weights.double().cpu()
    for token_idx, slot, activation, w_down in fp8_recipe_activations(x, topk_ids, weights):
        activation = quantize_rows(activation, weights.scheme, block).dequantize(torch.float64)
        y.index_add_(0, token_idx, (activation @ w_down.T) * topk_weights[token_idx, slot, None])
    return y


def fp8_recipe_activations(x: torch.Tensor, topk_ids: torch.Tensor, weights: QuantizedMoEWeights):
    """Per expert with tokens: (token_idx [n], slot [n], the SwiGLU activation [n, F] before its quantization,
    w_down [H, F] dequantized), float64 on the CPU, from x quantized as the weights' scheme says."""
    x = quantize_rows(x, weights.scheme, weights.w_gate_up.block_size).dequantize(torch.float64).cpu()
    w_gate_up, w_down = (w.dequantize(torch.float64).cpu() for w in (weights.w_gate_up, weights.w_down))
    topk_ids = topk_ids.long().cpu()
    for e in range(w_gate_up.shape[0]):
        token_idx, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token_idx.numel():
            gate, up = (x[token_idx] @ w_gate_up[e].T).chunk(2, dim=-1)
            yield token_idx, slot, F.silu(gate) * up, w_down[e]


def reference_shared_experts(x: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """x [T, H] -> sum over shared experts of expert_mlp(x) [T, H] float64 (zeros without any)."""
    x = x.double().cpu()
    y = torch.zeros_like(x)
    if weights.shared_gate_up is None:
        return y
    for w_gate_up, w_down in zip(weights.shared_gate_up, weights.shared_down):
        y += expert_mlp(x, w_gate_up.double().cpu(), w_down.double().cpu())
    return y


def reference_logits(x: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """x [T, H] -> router logits [T, E] float64."""
    logits = x.double().cpu() @ weights.router_weight.double().cpu().T
    if weights.router_logit_bias is not None:
        logits = logits + weights.router_logit_bias.double().cpu()
    return logits


@dataclass(frozen=True)
class ReferenceOutput:
    """y [T, H] float64 and the routing that produced it."""

    y: torch.Tensor
    routing: ReferenceRouting


def reference_moe(x: torch.Tensor, weights: MoEWeights, config: MoEConfig) -> ReferenceOutput:
    """The whole MoE layer in float64: route -> routed experts -> weighted top-k sum -> + shared experts."""
    routing = reference_route(reference_logits(x, weights), config, weights.score_correction_bias)
    y = reference_experts(x, routing.topk_ids, routing.topk_weights, weights)
    return ReferenceOutput(y + reference_shared_experts(x, weights), routing)


__all__ = [
    "ReferenceOutput",
    "ReferenceRouting",
    "expert_mlp",
    "reference_experts",
    "reference_experts_fp8",
    "reference_logits",
    "reference_moe",
    "reference_route",
    "reference_shared_experts",
]
