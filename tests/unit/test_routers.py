"""Every registered router against the float64 oracle, plus the invariants routers promise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.reference import reference_route
from moekit.routing import ROUTERS, apply_skew, load_stats, route
from moekit.testing.near_ties import ambiguous_tokens
from moekit.testing.strategies import MoECase, moe_cases

ROUTER_NAMES = ROUTERS.names()


@pytest.fixture
def supported_router(router, device, logits_dtype):
    """The router, or a skip with its supports() reason when it cannot take these logits here (before any draw)."""
    ok, reason = ROUTERS.get(router).supports(device, logits_dtype)
    if not ok:
        pytest.skip(reason)
    return router


def _check_against_reference(case: MoECase, logits_dtype: torch.dtype, device, eps: float, weight_tol: float):
    problem = case.problem()
    config = problem.config
    logits64 = problem.router_logits().double()
    bias = problem.weights.score_correction_bias
    ref = reference_route(logits64, config, bias)
    out = route(logits64.to(device, logits_dtype), config, None if bias is None else bias.to(device))
    assert out.topk_ids.dtype == torch.int32
    assert out.topk_weights.dtype == torch.promote_types(logits_dtype, torch.float32)
    ids, weights = out.topk_ids.cpu().long(), out.topk_weights.cpu().double()
    clear = ~ambiguous_tokens(ref, config, eps)
    assert torch.equal(ids[clear], ref.topk_ids[clear]), "expert choice differs from the oracle"
    torch.testing.assert_close(weights[clear], ref.topk_weights[clear], rtol=weight_tol, atol=weight_tol)


@pytest.mark.parametrize("logits_dtype", [torch.float64], ids=str)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # supported_router only skips
@given(data=st.data())
def test_router_matches_float64_oracle(supported_router, router, device, data):
    """float64 logits: the same experts as the oracle (ties to the lower index) and the same weights."""
    case = data.draw(moe_cases(routers=(router,), dtypes=(torch.float64,)))
    # sinkhorn's oracle normalises exp(logits) where the router works in log space: allow 1e-9 near-ties
    eps = 1e-9 if router == "sinkhorn" else 0.0
    _check_against_reference(case, torch.float64, device, eps=eps, weight_tol=1e-10)


@pytest.mark.parametrize("logits_dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # supported_router only skips
@given(data=st.data())
def test_router_float32_close_to_oracle(supported_router, router, device, data):
    """float32 logits: the oracle's choice wherever it is not a near-tie, weights within float32 rounding."""
    case = data.draw(moe_cases(routers=(router,), dtypes=(torch.float32,)))
    _check_against_reference(case, torch.float32, device, eps=1e-4, weight_tol=1e-4)


@pytest.mark.parametrize("logits_dtype", [torch.float64], ids=str)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # supported_router only skips
@given(case=moe_cases(dtypes=(torch.float32,)), tie_seed=st.integers(0, 2**31 - 1))
def test_router_invariants_with_many_ties(supported_router, router, case, tie_seed, device):
    """Logits on a coarse grid (many exact ties): ids in range, distinct, int32; weights >= 0 and
    summing as the router specifies; the result is exactly the float64 oracle's."""
    config = replace(case.config, router=router, n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(tie_seed)
    logits = torch.randint(-2, 3, (case.num_tokens, config.num_experts), generator=g).double() / 2
    out = route(logits.to(device), config)
    ids, weights = out.topk_ids.cpu().long(), out.topk_weights.cpu()
    T, K = ids.shape
    assert (T, K) == (case.num_tokens, config.top_k)
    assert bool(((ids >= 0) & (ids < config.num_experts)).all())
    assert all(len(set(row)) == K for row in ids.tolist()), "an expert appears twice for one token"
    assert bool((weights >= 0).all())
    scale = config.routed_scaling_factor if router == "grouped_topk" else 1.0
    sums = weights.sum(dim=1)
    if router in ("topk_softmax", "sinkhorn") or config.renormalize:
        torch.testing.assert_close(sums, torch.full_like(sums, scale))
    elif router == "softmax_topk":  # probabilities of K of the E experts
        assert bool((sums <= 1 + 1e-12).all())
    else:  # grouped_topk: each weight is a sigmoid times the scale
        assert bool((weights <= scale).all())
    ref = reference_route(logits, config)
    if router != "sinkhorn":  # sinkhorn's plan is not tied where the logits are; covered above
        assert torch.equal(ids, ref.topk_ids)


@pytest.mark.parametrize("logits_dtype", [torch.float32], ids=str)
@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_equal_logits_choose_the_lowest_indices(supported_router, router, device):
    config = MoEConfig(hidden_size=4, ffn_size=4, num_experts=8, top_k=3, router=router)
    ids = route(torch.zeros(5, 8, device=device) + 0.25, config).topk_ids.cpu()
    assert ids.tolist() == [[0, 1, 2]] * 5


@given(seed=st.integers(0, 2**31 - 1), skew_experts=st.integers(1, 3), amount=st.floats(1.0, 3.0))
def test_sinkhorn_balances_better_than_softmax_topk_under_skew(seed, skew_experts, amount):
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=8, top_k=2, sinkhorn_iterations=10)
    logits = apply_skew(torch.randn(512, 8, generator=torch.Generator().manual_seed(seed)), skew_experts, amount)
    cv = {
        name: load_stats(route(logits, replace(config, router=name)).topk_ids, 8).cv
        for name in ("softmax_topk", "sinkhorn")
    }
    assert cv["sinkhorn"] < 0.5 * cv["softmax_topk"], cv


def test_grouped_topk_picks_only_from_kept_groups():
    config = MoEConfig(
        hidden_size=4,
        ffn_size=4,
        num_experts=8,
        top_k=2,
        router="grouped_topk",
        n_group=4,
        topk_group=1,
        renormalize=True,
        routed_scaling_factor=2.5,
    )
    logits = torch.tensor([[5.0, -9.0, 4.9, 4.8, -9.0, -9.0, -9.0, -9.0]])  # group 1 sums higher
    out = route(logits, config)
    assert out.topk_ids.tolist() == [[2, 3]]
    torch.testing.assert_close(out.topk_weights.sum(), torch.tensor(2.5))
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 3.0, 3.0])  # the bias moves the choice, not the weights
    out = route(logits, config, bias)
    assert out.topk_ids.tolist() == [[6, 7]]
    torch.testing.assert_close(out.topk_weights, torch.tensor([[1.25, 1.25]]))


@example(num_tokens=0)
@given(num_tokens=st.integers(0, 3))
def test_no_tokens_give_empty_routing(num_tokens):
    for name in ROUTER_NAMES:
        if not ROUTERS.get(name).supports(torch.device("cpu"), torch.float32)[0]:
            continue  # e.g. a Triton router without the interpreter
        config = MoEConfig(hidden_size=4, ffn_size=4, num_experts=4, top_k=2, router=name)
        out = route(torch.randn(num_tokens, 4), config)
        assert out.topk_ids.shape == out.topk_weights.shape == (num_tokens, 2)


BASE = MoEConfig(hidden_size=4, ffn_size=4, num_experts=4, top_k=2)


@pytest.mark.parametrize(
    ("logits", "config", "bias", "error", "message"),
    [
        (torch.randn(3, 5), BASE, None, ValueError, r"logits must have shape \(\*, 4\)"),
        (torch.randn(3), BASE, None, ValueError, "logits must have shape"),
        (torch.ones(3, 4, dtype=torch.int64), BASE, None, TypeError, "logits must have a floating dtype"),
        (torch.tensor([[0.0, float("nan"), 1, 2]]), BASE, None, ValueError, "logits must be finite"),
        ([[0.0, 1, 2, 3]], BASE, None, TypeError, "logits must be a torch.Tensor"),
        (torch.randn(3, 4), BASE, torch.zeros(4), ValueError, "correction_bias is used by grouped_topk only"),
        (
            torch.randn(3, 4),
            replace(BASE, router="grouped_topk"),
            torch.zeros(3),
            ValueError,
            r"correction_bias must have shape \(4,\)",
        ),
    ],
)
def test_bad_router_input_is_named(logits, config, bias, error, message):
    with pytest.raises(error, match=message):
        route(logits, config, bias)
