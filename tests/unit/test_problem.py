import pytest
import torch

from moekit import MoEConfig, make_problem

CONFIG = MoEConfig(
    hidden_size=64,
    ffn_size=48,
    num_experts=8,
    top_k=2,
    num_shared_experts=1,
    router="grouped_topk",
    n_group=2,
    topk_group=1,
    dtype=torch.float32,
)


def test_same_seed_same_problem_and_different_seed_differs():
    a, b, c = (make_problem(CONFIG, 32, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.x, b.x) and torch.equal(a.weights.w_down, b.weights.w_down)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.weights.w_gate_up, c.weights.w_gate_up)


def test_magnitudes_are_realistic_and_nonzero():
    problem = make_problem(CONFIG, 256, seed=0)
    for name in ("w_gate_up", "w_down", "router_weight", "shared_gate_up", "shared_down"):
        assert bool((getattr(problem.weights, name) != 0).all()), name
    assert bool((problem.x != 0).all())
    logits = problem.router_logits()
    assert 0.5 < float(logits.std()) < 2.0  # O(1) logits: routing is neither uniform nor one-hot
    gate_up = problem.x @ problem.weights.w_gate_up[0].T
    assert 0.5 < float(gate_up.std()) < 2.0


def test_skew_biases_the_first_experts():
    problem = make_problem(CONFIG, 8, seed=0, skew_experts=3, skew_amount=2.0)
    assert problem.weights.router_logit_bias.tolist() == [2.0, 2.0, 2.0, 0, 0, 0, 0, 0]


def test_weights_move_to_dtype_but_router_stays_float32():
    problem = make_problem(MoEConfig(hidden_size=4, ffn_size=4, num_experts=2, top_k=1), 3, seed=0)
    assert problem.x.dtype == problem.weights.w_gate_up.dtype == torch.bfloat16
    assert problem.weights.router_weight.dtype == torch.float32


@pytest.mark.parametrize("bad", [-1, 2.0, True])
def test_bad_token_count(bad):
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0"):
        make_problem(CONFIG, bad)


def test_bad_skew():
    with pytest.raises(ValueError, match=r"skew_experts must be in \[0, 8\]"):
        make_problem(CONFIG, 4, skew_experts=9, skew_amount=1.0)
