"""Routing losses for training (issue #23): the Switch/GShard load-balancing loss, the ST-MoE router z-loss, and
DeepSeek-V3's auxiliary-loss-free correction-bias update.

Both losses read the logits in float32, or float64 for float64 logits (score_dtype), and return a 0-d tensor of
that dtype. With no tokens (T = 0) each loss is 0 and still depends on the logits, so backward runs and gives an
(empty) zero gradient; the bias update leaves the bias unchanged. NaN/inf logits are not checked (that would wait
for the device every step): they reach the loss. The id range check waits for the device; it is skipped under
moekit.validation.trusted_values(), for ids that come from a router.
"""

from __future__ import annotations

import math

import torch

from moekit.routing.load_stats import tokens_per_expert
from moekit.routing.registry import score_dtype
from moekit.validation import INDEX_DTYPES, check_ids_in_range, check_tensor

__all__ = ["load_balancing_loss", "router_z_loss", "update_correction_bias"]


def _check_topk_ids(topk_ids: torch.Tensor, num_tokens: int | None, num_experts: int, device: torch.device) -> None:
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    T, K = topk_ids.shape
    if num_tokens is not None and T != num_tokens:
        raise ValueError(f"topk_ids must have shape ({num_tokens}, *) to match logits, got {tuple(topk_ids.shape)}")
    if K < 1:
        raise ValueError(f"topk_ids must have at least one column (K >= 1), got shape {tuple(topk_ids.shape)}")
    if K > num_experts:
        raise ValueError(f"topk_ids must have at most {num_experts} columns (K <= E), got {K}")
    if topk_ids.device != device:
        raise ValueError(f"topk_ids must be on {device}, got {topk_ids.device}")
    check_ids_in_range("topk_ids", topk_ids, num_experts)


def _check_coefficient(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """logits [T, E] floating, topk_ids [T, K] int32/int64 (distinct per token) -> 0-d loss.

    loss = alpha * E * sum_i f_i * P_i (Switch Transformer, Fedus et al. 2021, eq. 4, extended to top-K), with
      f_i = (assignments to expert i) / (T * K): the fraction of the T*K assignments, so sum_i f_i = 1;
      P_i = (1 / T) * sum_t softmax(logits_t)_i: the mean router probability of expert i.
    This is the normalisation of DeepSeek-V2's expert-level balance loss (f_i' = E * f_i) and of Megatron-Core's
    switch_load_balancing_loss_func (the top-k count divided by T * K). Hugging Face's Mixtral loss divides by T
    alone and so is K times this one. Balanced dispatch (every f_i = 1/E) gives exactly alpha whatever P, as do
    uniform probabilities whatever f; all tokens on the same K experts that hold all the probability give the
    maximum, alpha * E / K. E is logits.shape[1]; Switch used alpha = 1e-2.

    The gradient flows to logits through P only (f is a count): d loss / d logits[t, j] =
    alpha * E / T * p[t, j] * (f_j - sum_i f_i * p[t, i]). T = 0 gives 0.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    _check_topk_ids(topk_ids, T, E, logits.device)
    alpha = _check_coefficient("alpha", alpha)
    K = topk_ids.shape[1]
    probs = torch.softmax(logits.to(score_dtype(logits)), dim=-1)
    mean_probs = probs.sum(dim=0) / max(T, 1)  # sum over no tokens is 0: the loss is 0, connected to logits
    fraction = tokens_per_expert(topk_ids, E).to(probs.dtype) / max(T * K, 1)
    return alpha * E * (fraction * mean_probs).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, E] floating -> 0-d loss = (1 / T) * sum_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022, eq. 5).

    Unscaled: the caller multiplies by its coefficient (ST-MoE: c_z = 1e-3). The gradient is
    d loss / d logits[t, j] = (2 / T) * logsumexp(logits_t) * softmax(logits_t)_j. T = 0 gives 0.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    T, E = logits.shape
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    lse = torch.logsumexp(logits.to(score_dtype(logits)), dim=-1)
    return lse.square().sum() / max(T, 1)


@torch.no_grad()
def update_correction_bias(bias: torch.Tensor, topk_ids: torch.Tensor, rate: float) -> None:
    """bias [E] float32/float64, updated in place; topk_ids [T, K] int32/int64, the step's routing; rate >= 0.

    DeepSeek-V3's auxiliary-loss-free balancing (technical report, 2.1.2; Wang et al. 2024): after each step,
    bias_i += rate * sign(mean_load - load_i), where load_i counts the assignments to expert i and
    mean_load = T * K / E. Under-loaded experts go up by exactly rate, over-loaded ones down by rate, an expert
    at the mean load keeps its bias (the comparison is exact, in integers); T = 0 changes nothing. The bias only
    shifts which experts grouped_topk selects, never their weights, and takes no gradient (torch.no_grad).

    In place, like an optimizer step, because the bias is a module buffer the router reads. float32 or wider:
    a bfloat16 bias near 1 would round a step of rate 1e-3 away. With data or expert parallelism, pass the
    topk_ids of every rank (or gather them first), else the ranks' biases drift apart.
    """
    check_tensor("bias", bias, ndim=1, dtypes=(torch.float32, torch.float64))
    E = bias.shape[0]
    if E < 1:
        raise ValueError("bias must have at least one expert, got shape (0,)")
    _check_topk_ids(topk_ids, None, E, bias.device)
    rate = _check_coefficient("rate", rate)
    T, K = topk_ids.shape
    load = tokens_per_expert(topk_ids, E)
    # sign(T*K/E - load_i) = sign(T*K - E*load_i), exact in int64
    bias.add_(torch.sign(T * K - E * load).to(bias.dtype), alpha=rate)
