"""Every registered FP8 expert backend against the FP8 recipe in float64 (kernel error alone: the same e4m3
values, the order of float32 sums apart) and against the oracle on the original weights (quantization error
too, TOLERANCE[float8_e4m3fn]). Weights have blocks of spread magnitude, so a scale from the wrong block fails."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, quantize_weights, route
from moekit.experts import FP8_EXPERT_BACKENDS
from moekit.quantize import SCHEMES
from moekit.reference import reference_experts, reference_experts_fp8
from moekit.testing import assert_close_to_reference
from moekit.testing.fp8_cases import activation_margin, requantization_flip_error, with_spread_blocks
from moekit.testing.numerics import fp8_kernel_tolerance
from moekit.testing.strategies import MoECase, moe_cases

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def impl(backend, scheme, dtype, triton_device):
    implementation = FP8_EXPERT_BACKENDS.get(backend)
    ok, reason = implementation.supports(triton_device, dtype, scheme)
    if not ok:
        pytest.skip(reason)
    return implementation


def check(impl, case: MoECase, scheme: str, device, *, against_exact: bool = False):
    problem = case.problem(device)
    weights = with_spread_blocks(problem.weights, seed=case.seed % 1000)
    routing = route(problem.router_logits(), problem.config, problem.weights.score_correction_bias)
    q = quantize_weights(weights, scheme)
    out = impl.fn(problem.x, routing.topk_ids, routing.topk_weights, q)
    dtype = problem.config.dtype
    assert out.dtype == dtype and out.shape == problem.x.shape and out.device == problem.x.device
    args = (problem.x, routing.topk_ids, routing.topk_weights)
    recipe = reference_experts_fp8(*args, q)
    # the kernel's activation is off the float64 one by its accumulation error, so elements at a rounding boundary
    # may re-quantize to the neighbouring e4m3 value: three standard deviations of that on top
    flips = requantization_flip_error(*args, q, activation_margin(device, scheme, dtype))
    what = f"{impl.name} ({scheme}) against the FP8 recipe (flip allowance {3 * flips:.1e})"
    tolerance = fp8_kernel_tolerance(dtype, fast_accumulation=scheme == "row" and device.type == "cuda")
    assert_close_to_reference(out, recipe, dtype, what, tolerance + 3 * flips)
    if against_exact:
        exact = reference_experts(*args, weights)
        assert_close_to_reference(out, exact, torch.float8_e4m3fn, f"{impl.name} ({scheme}) against the oracle")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend", FP8_EXPERT_BACKENDS.names())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fp8_backend_matches_the_fp8_recipe(impl, scheme, dtype, triton_device, data):
    """H and F up to 288: partial 128-blocks at the edges; T = 0, empty experts and every token on one expert
    come from moe_cases."""
    routers = ("softmax_topk", "grouped_topk", "topk_softmax")
    sizes = dict(min_hidden=16, max_hidden=288, size_multiple=impl.size_multiple(dtype))
    case = data.draw(moe_cases(dtypes=(dtype,), max_experts=6, max_tokens=40, routers=routers, shared=False, **sizes))
    check(impl, case, scheme, triton_device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend", FP8_EXPERT_BACKENDS.names())
def test_fp8_backend_with_k_equal_e_and_every_token_on_expert_zero(impl, scheme, dtype, triton_device):
    config = MoEConfig(hidden_size=272, ffn_size=144, num_experts=4, top_k=4, dtype=dtype)
    case = MoECase(config, 33, seed=7, skew_experts=1, skew_amount=50.0)
    check(impl, case, scheme, triton_device, against_exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend", FP8_EXPERT_BACKENDS.names())
def test_fp8_backend_is_within_fp8_error_of_the_oracle(impl, scheme, dtype, triton_device):
    config = MoEConfig(hidden_size=256, ffn_size=320, num_experts=8, top_k=2, dtype=dtype)
    check(impl, MoECase(config, 64, seed=3), scheme, triton_device, against_exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", ["row"])
@pytest.mark.parametrize("backend", FP8_EXPERT_BACKENDS.names())
def test_fp8_backend_refuses_what_it_cannot_take(impl, scheme, dtype, triton_device):
    config = MoEConfig(hidden_size=32, ffn_size=32, num_experts=3, top_k=1, dtype=dtype)
    problem = MoECase(config, 4, seed=0).problem(triton_device)
    routing = route(problem.router_logits(), config)
    args = (problem.x, routing.topk_ids, routing.topk_weights)
    with pytest.raises(TypeError, match=r"weights must be QuantizedMoEWeights \(moekit.quantize_weights\)"):
        impl.fn(*args, problem.weights)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 3\)"):
        impl.fn(problem.x, routing.topk_ids + 3, routing.topk_weights, quantize_weights(problem.weights, scheme))
    small_blocks = quantize_weights(problem.weights, "block", block_size=64)
    with pytest.raises(ValueError, match=r"128 x 128 blocks, got block_size 64|takes row-scheme weights"):
        impl.fn(*args, small_blocks)
