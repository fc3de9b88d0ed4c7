"""Every registered expert backend against the oracle's routed experts, on every device and dtype it supports."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import EXPERT_BACKENDS, ROUTERS, MoEConfig, route
from moekit.experts.registry import SORTED_ROWS
from moekit.reference import reference_experts
from moekit.testing import assert_close_to_reference
from moekit.testing.strategies import MoECase, moe_cases

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def drawn_impl(impl):
    """impl, for the tests that draw a new shape per example."""
    if impl.name == "compiled":
        pytest.skip(
            "compiled recompiles per drawn shape (over 400 s for 100 examples on GPU): its fixed-shape "
            "cases are test_backend_with_k_equal_e_* and tests/perf"
        )
    return impl


def check_against_oracle(impl, case: MoECase, device):
    problem = case.problem(device)
    routing = route(problem.router_logits(), problem.config, problem.weights.score_correction_bias)
    out = impl.fn(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
    dtype = problem.config.dtype
    assert out.dtype == dtype and out.shape == problem.x.shape and out.device == problem.x.device
    expected = reference_experts(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
    assert_close_to_reference(out, expected, dtype, f"{impl.name} on {device}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", EXPERT_BACKENDS.names())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # impl is immutable
@given(data=st.data())
def test_backend_matches_oracle(drawn_impl, dtype, device, data):
    impl = drawn_impl
    # moe_configs' min_hidden: a one-unit FFN (F = 1) is a single dot product whose cancellation alone put
    # float32 at 2.7e-5 (seen at H=32, F=1); eight units average it out, sixteen for fp16/bf16
    low_precision = dtype in (torch.float16, torch.bfloat16)
    sizes = dict(min_hidden=16 if low_precision else 8, size_multiple=impl.size_multiple(dtype))
    routers = tuple(name for name in ROUTERS.names() if ROUTERS.get(name).supports(device, dtype)[0])
    case = data.draw(moe_cases(dtypes=(dtype,), max_experts=12, max_hidden=64, routers=routers, **sizes))
    check_against_oracle(impl, case, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", EXPERT_BACKENDS.names())
def test_backend_with_k_equal_e_and_every_token_on_expert_zero(impl, dtype, device):
    config = MoEConfig(hidden_size=32, ffn_size=48, num_experts=5, top_k=5, dtype=dtype)
    check_against_oracle(impl, MoECase(config, 33, seed=7, skew_experts=1, skew_amount=50.0), device)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("backend", EXPERT_BACKENDS.names())
def test_backend_rejects_out_of_range_ids(impl, dtype, device):
    config = MoEConfig(hidden_size=16, ffn_size=16, num_experts=3, top_k=1, dtype=dtype)
    problem = MoECase(config, 2, seed=0).problem(device)
    ids = torch.tensor([[0], [3]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 3\)"):
        impl.fn(problem.x, ids, torch.ones(2, 1, device=device), problem.weights)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown expert backend 'nope'; expected one of"):
        EXPERT_BACKENDS.get("nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", sorted(SORTED_ROWS))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sorted_rows_form_matches_oracle(impl, dtype, device, data):
    """The form expert-parallel ranks run on received rows: rows grouped by expert (empty experts, every
    row on one expert), each through its expert once, unweighted."""
    low_precision = dtype in (torch.float16, torch.bfloat16)
    sizes = dict(min_hidden=16 if low_precision else 8, size_multiple=impl.size_multiple(dtype))
    case = data.draw(moe_cases(dtypes=(dtype,), max_experts=8, max_hidden=64, **sizes))
    problem = MoECase(case.config, max(case.num_tokens, 1), case.seed).problem(device)
    rows, num_experts = problem.x, case.config.num_experts
    ids = sorted(data.draw(st.lists(st.integers(0, num_experts - 1), min_size=rows.shape[0], max_size=rows.shape[0])))
    ids = torch.tensor(ids, device=device)
    counts = torch.bincount(ids, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    out = SORTED_ROWS[impl.name](rows, offsets, problem.weights)
    assert out.dtype == dtype and out.shape == rows.shape
    ones = torch.ones(rows.shape[0], 1, device=device)
    expected = reference_experts(rows, ids[:, None], ones, problem.weights)
    assert_close_to_reference(out, expected, dtype, f"{impl.name}'s sorted-rows form on {device}")
