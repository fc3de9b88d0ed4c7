"""The oracle against an independent dense computation: every expert on every token, masked."""

import torch
import torch.nn.functional as F
from hypothesis import example, given

from moekit import MoEConfig
from moekit.reference import reference_moe
from moekit.testing import relative_error
from moekit.testing.strategies import MoECase, moe_cases


def dense_masked_moe(x, weights, topk_ids, topk_weights):
    """Independent float64 formulation: all experts on all tokens, weighted by a dense routing mask."""
    x = x.double()
    T, E = x.shape[0], weights.w_gate_up.shape[0]
    mask = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t].tolist()):
            mask[t, e] += w
    y = torch.zeros_like(x)
    for e in range(E):
        F_ = weights.w_down.shape[2]
        h = x @ weights.w_gate_up[e].double().T
        y += mask[:, e : e + 1] * ((F.silu(h[:, :F_]) * h[:, F_:]) @ weights.w_down[e].double().T)
    for s in range(0 if weights.shared_gate_up is None else weights.shared_gate_up.shape[0]):
        Fs = weights.shared_down.shape[2]
        h = x @ weights.shared_gate_up[s].double().T
        y += (F.silu(h[:, :Fs]) * h[:, Fs:]) @ weights.shared_down[s].double().T
    return y


@example(MoECase(MoEConfig(hidden_size=7, ffn_size=5, num_experts=6, top_k=6, dtype=torch.float64), 9, 1))
@example(MoECase(MoEConfig(hidden_size=3, ffn_size=3, num_experts=4, top_k=1, dtype=torch.float64), 12, 2, 1, 50.0))
@given(case=moe_cases(dtypes=(torch.float64,)))
def test_oracle_equals_dense_masked_computation(case):
    problem = case.problem()
    out = reference_moe(problem.x, problem.weights, problem.config)
    assert out.y.dtype == torch.float64 and out.y.shape == problem.x.shape
    expected = dense_masked_moe(problem.x, problem.weights, out.routing.topk_ids, out.routing.topk_weights)
    assert relative_error(out.y, expected) <= 1e-12


def test_all_tokens_on_one_expert_reach_only_that_expert():
    config = MoEConfig(hidden_size=8, ffn_size=6, num_experts=4, top_k=1, dtype=torch.float64)
    problem = MoECase(config, 16, seed=3, skew_experts=1, skew_amount=50.0).problem()
    out = reference_moe(problem.x, problem.weights, config)
    assert out.routing.topk_ids.unique().tolist() == [0]
    assert float(out.y.abs().min()) > 0  # every token got an output
