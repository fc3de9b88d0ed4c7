"""Backward of the expert backends: every backend registered with trains=True against the float64 oracle's
gradients (dx, d topk_weights, dW_gate_up, dW_down) by relative norm within gradient_tolerance (sqrt(2) x the
dtype's; d topk_weights, a dot product over H, relative to its absolute terms: dot_conditioning); every other
backend refuses grad-requiring inputs with an error naming the ones that train, and runs under no_grad."""

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import EXPERT_BACKENDS, ROUTERS, route
from moekit.reference import expert_mlp, reference_experts
from moekit.testing import assert_close_to_reference
from moekit.testing.numerics import gradient_tolerance
from moekit.testing.strategies import MoECase, moe_cases

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TRAINING = EXPERT_BACKENDS.training_names()
NOT_TRAINING = [name for name in EXPERT_BACKENDS.names() if name not in TRAINING]
GRADIENTS = ("x", "topk_weights", "w_gate_up", "w_down")


def gradients(fn, problem, routing, dy, dtype, poison: bool):
    """fn's gradients of <fn(x, ids, w, weights), dy> for the leaves in GRADIENTS, computed in dtype. With poison,
    each .grad starts as random values that backward must add to (and the values are taken off again)."""
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {
        "x": problem.x.to(dtype),
        "topk_weights": routing.topk_weights.to(weight_dtype),
        "w_gate_up": problem.weights.w_gate_up.to(dtype),
        "w_down": problem.weights.w_down.to(dtype),
    }
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    g = torch.Generator().manual_seed(1)
    poisons = {name: torch.randn(t.shape, generator=g).to(t.device, t.dtype) for name, t in leaves.items()}
    if poison:
        for name, t in leaves.items():
            t.grad = poisons[name].clone()
    weights = replace(problem.weights, w_gate_up=leaves["w_gate_up"], w_down=leaves["w_down"])
    out = fn(leaves["x"], routing.topk_ids, leaves["topk_weights"], weights)
    if out.requires_grad:  # T = 0 may give a constant empty output: every gradient is zero then
        out.backward(dy.to(out.device, out.dtype))
    else:
        assert out.numel() == 0, "an output with tokens must carry the graph back to its inputs"
    grads = {name: t.grad if t.grad is not None else torch.zeros_like(t) for name, t in leaves.items()}
    return {name: grads[name] - poisons[name] if poison else grads[name] for name in leaves}


def check_gradients(impl, case: MoECase, device):
    problem = case.problem(device)
    routing = route(problem.router_logits(), problem.config, problem.weights.score_correction_bias)
    dtype = problem.config.dtype
    dy = torch.randn(problem.x.shape, generator=torch.Generator().manual_seed(case.seed % 2**31))
    expected = gradients(reference_experts, problem, routing, dy.double(), torch.float64, poison=False)
    got = gradients(impl.fn, problem, routing, dy, dtype, poison=True)
    for name in GRADIENTS:
        assert got[name].shape == expected[name].shape, name
        tolerance = gradient_tolerance(dtype)
        if name == "topk_weights":
            tolerance *= dot_conditioning(problem, routing, dy.double(), expected[name])
        elif name.startswith("w_"):
            tolerance *= token_sum_conditioning(problem, routing, dy.double(), name, expected[name])
        what = f"{impl.name} d{name} on {device}"
        assert_close_to_reference(got[name], expected[name], dtype, what, tolerance)


def token_sum_conditioning(problem, routing, dy, name: str, d_weight) -> float:
    """A weight's gradient is a sum over tokens of each token's outer products, which cancel: its error is
    bounded relative to the sum of the tokens' absolute contributions. Returns ||sum_t |dW of token t| || /
    ||dW|| (>= 1), each token's dW from the oracle on that token alone."""
    absolute = torch.zeros(d_weight.shape, dtype=torch.float64, device=d_weight.device)
    for t in range(problem.x.shape[0]):
        token = replace(problem, x=problem.x[t : t + 1])
        token_routing = replace(
            routing, topk_ids=routing.topk_ids[t : t + 1], topk_weights=routing.topk_weights[t : t + 1]
        )
        absolute += gradients(reference_experts, token, token_routing, dy[t : t + 1], torch.float64, False)[name].abs()
    norm = float(torch.linalg.vector_norm(d_weight))
    return max(1.0, float(torch.linalg.vector_norm(absolute)) / norm) if norm > 0 else 1.0


def dot_conditioning(problem, routing, dy, d_topk_weights) -> float:
    """d topk_weights[t, k] = <expert output of (t, k), dy[t]>, a dot product over H of values rounded to the
    dtype: its error is bounded relative to sum_h |out_h * dy_h|, not to the dot itself (which cancels).
    Returns ||those absolute sums|| / ||d topk_weights|| (>= 1), the factor the tolerance takes."""
    x, ids = problem.x.double().cpu(), routing.topk_ids.long().cpu()
    w_gate_up, w_down = problem.weights.w_gate_up.double().cpu(), problem.weights.w_down.double().cpu()
    absolute = torch.zeros(ids.shape, dtype=torch.float64)
    for t, k in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, k])
        absolute[t, k] = (expert_mlp(x[t : t + 1], w_gate_up[e], w_down[e])[0] * dy[t]).abs().sum()
    norm = float(torch.linalg.vector_norm(d_topk_weights))
    return max(1.0, float(torch.linalg.vector_norm(absolute)) / norm) if norm > 0 else 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", TRAINING)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_training_backend_gradients_match_the_oracle(impl, dtype, device, data):
    """T = 0, empty experts, every token on one expert (skew 50), K = E and odd sizes come from moe_cases."""
    # one token's dW_down is its activation times dy, element by element: at fp16/bf16 its error is the
    # activation's, which averages out over F only from a few dozen units up (fp16 6.2e-3 seen at H 19, F 17, T 1)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    sizes = dict(min_hidden=32 if low_precision else 8, size_multiple=impl.size_multiple(dtype))
    routers = tuple(name for name in ROUTERS.names() if ROUTERS.get(name).supports(device, dtype)[0])
    case = data.draw(moe_cases(dtypes=(dtype,), max_experts=8, max_hidden=64, routers=routers, **sizes))
    check_gradients(impl, case, device)


@pytest.mark.parametrize("backend", TRAINING)
def test_a_second_backward_gives_the_same_gradients(backend, device):
    impl = EXPERT_BACKENDS.get(backend)
    if not impl.supports(device, torch.float32)[0]:
        pytest.skip(impl.supports(device, torch.float32)[1])
    from moekit import MoEConfig

    problem = MoECase(MoEConfig(hidden_size=32, ffn_size=48, num_experts=4, top_k=2), 17, seed=5).problem(device)
    routing = route(problem.router_logits(), problem.config)
    x = problem.x.clone().requires_grad_()
    out = impl.fn(x, routing.topk_ids, routing.topk_weights, problem.weights)
    dy = torch.randn_like(out)
    first = torch.autograd.grad(out, x, dy, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, dy)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", NOT_TRAINING)
def test_a_backend_without_backward_refuses_grad_requiring_inputs(backend):
    impl = EXPERT_BACKENDS.get(backend)
    from moekit import MoEConfig

    problem = MoECase(MoEConfig(hidden_size=16, ffn_size=16, num_experts=4, top_k=2), 5, seed=2).problem("cpu")
    routing = route(problem.router_logits(), problem.config)
    x = problem.x.clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"'{backend}' has no backward.*{TRAINING[0]}"):
        impl.fn(x, routing.topk_ids, routing.topk_weights, problem.weights)
    weights = replace(problem.weights, w_down=problem.weights.w_down.clone().requires_grad_())
    with pytest.raises(ValueError, match="has no backward"):
        impl.fn(problem.x, routing.topk_ids, routing.topk_weights, weights)


def test_training_backends_are_declared():
    assert {"naive", "grouped_mm", "triton_grouped"} <= set(TRAINING)
    assert {"grouped_loop", "memeff"} <= set(NOT_TRAINING)
