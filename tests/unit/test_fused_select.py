"""fused_select, the Triton top-k + softmax router, against the float64 oracle in float32 and float16.

On the CPU these run under the Triton interpreter (TRITON_INTERPRET=1) and skip without it; bfloat16 is
checked on CUDA only, since the interpreter computes bf16 wrongly. E stays <= 64 to keep the interpreter quick.
The dtype is a pytest parameter (float32 where none is given) and conftest's triton_device skips where the
kernel does not run, so a skip comes before Hypothesis runs an example.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.kernels.availability import INTERPRETER_DTYPES, KERNEL_DTYPES
from moekit.reference import ReferenceRouting, reference_route
from moekit.routing import ROUTERS, apply_skew, route

ROUTER = ROUTERS.get("fused_select")

# The weights' bound, in torch.testing.assert_close's terms: |w - ref| <= WEIGHT_ATOL + WEIGHT_RTOL * |ref|.
# It sits between the kernel and its half-precision twin (the softmax's exp, sum and division in float16,
# or bfloat16 for bfloat16 logits: the kernel without its float32 upcast), measured by _weight_error on
# 64 tokens x 64 experts, K 4 and 8, logit scales 0.1..4: the kernel 4.4e-8..3.0e-7 (interpreter, fp32 and
# fp16 logits; an emulation of the GPU's ex2.approx exp 8.8e-8..3.0e-7), the float16 twin 2.3e-4..3.8e-3
# (bfloat16's 2.0e-3..2.9e-2). test_weight_bound_sits_between_the_kernel_and_its_half_precision_twin
# measures both on every run.
WEIGHT_RTOL, WEIGHT_ATOL = 2e-5, 1e-6


def _weight_error(weights: torch.Tensor, ref: torch.Tensor) -> float:
    """max |w - ref| / (WEIGHT_ATOL / WEIGHT_RTOL + |ref|): at most WEIGHT_RTOL when assert_close passes."""
    return float(((weights.cpu().double() - ref).abs() / (WEIGHT_ATOL / WEIGHT_RTOL + ref.abs())).max())


def _config(num_experts: int, top_k: int, renormalize: bool) -> MoEConfig:
    return MoEConfig(
        hidden_size=4, ffn_size=4, num_experts=num_experts, top_k=top_k, router="fused_select", renormalize=renormalize
    )


def _near_ties(ref: ReferenceRouting, top_k: int, eps: float) -> torch.Tensor:
    """[T] bool: tokens whose K-th and (K+1)-th probabilities lie within eps (see test_routers._ambiguous_tokens)."""
    scores = ref.selection_scores
    if top_k == scores.shape[1]:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    runner_up = scores.scatter(1, ref.topk_ids, float("-inf")).max(dim=1).values
    return (scores.gather(1, ref.topk_ids).min(dim=1).values - runner_up).abs() <= eps


def _check(logits: torch.Tensor, config: MoEConfig, *, exact_ids: bool) -> None:
    """route() on logits (any device, any kernel dtype) against reference_route on the same values."""
    out = route(logits, config)
    T, K = logits.shape[0], config.top_k
    assert out.topk_ids.dtype == torch.int32 and out.topk_weights.dtype == torch.float32
    assert out.topk_ids.shape == out.topk_weights.shape == (T, K)
    assert out.topk_ids.device == logits.device
    ref = reference_route(logits.double(), config)
    ids, weights = out.topk_ids.cpu().long(), out.topk_weights.cpu().double()
    clear = torch.ones(T, dtype=torch.bool) if exact_ids else ~_near_ties(ref, K, eps=1e-6)
    assert torch.equal(ids[clear], ref.topk_ids[clear]), "expert choice differs from the oracle"
    assert all(len(set(row)) == K for row in ids.tolist()), "an expert appears twice for one token"
    torch.testing.assert_close(weights[clear], ref.topk_weights[clear], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # triton_device only skips
@example(num_experts=5, top_k=5, num_tokens=1, renormalize=False, scale=1.0, skew=(1, 50.0), seed=0)
@example(num_experts=12, top_k=3, num_tokens=0, renormalize=True, scale=4.0, skew=(0, 0.0), seed=1)
@given(
    num_experts=st.integers(1, 64),
    top_k=st.integers(1, 64),
    num_tokens=st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)),
    renormalize=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    skew=st.one_of(st.just((0, 0.0)), st.tuples(st.integers(1, 3), st.floats(0.5, 4.0)), st.just((1, 50.0))),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_oracle(triton_device, dtype, num_experts, top_k, num_tokens, renormalize, scale, skew, seed):
    """Random logits, rounded to the kernel dtype: the oracle's experts except at near-ties, its weights."""
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g) * scale
    logits = apply_skew(logits, min(skew[0], num_experts), skew[1]).to(triton_device, dtype)
    _check(logits, _config(num_experts, top_k, renormalize), exact_ids=False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True])
def test_weight_bound_sits_between_the_kernel_and_its_half_precision_twin(triton_device, dtype, renormalize):
    """On 64 tokens x 64 experts, K = 4: the kernel's weight error is under WEIGHT_RTOL, and the same softmax
    computed in half precision (the float32 upcast dropped) is over it, so a kernel that computes its softmax
    in float16 or bfloat16 fails test_matches_float64_oracle."""
    config = _config(64, 4, renormalize)
    logits = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = reference_route(logits.double(), config)
    out = route(logits.to(triton_device), config)
    same = (out.topk_ids.cpu().long() == ref.topk_ids).all(dim=1)  # the weights compared where the experts agree
    assert int(same.sum()) >= 48, "the kernel's experts differ from the oracle's for over 16 of 64 tokens"
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    p = (logits.to(half) - logits.to(half).max(dim=1, keepdim=True).values).exp()  # in half precision, op by op
    chosen = p.gather(1, ref.topk_ids)
    twin = chosen / (chosen if renormalize else p).sum(dim=1, keepdim=True)
    kernel_error = _weight_error(out.topk_weights.cpu()[same], ref.topk_weights[same])
    twin_error = _weight_error(twin[same], ref.topk_weights[same])
    assert kernel_error < WEIGHT_RTOL < twin_error, (
        f"kernel {kernel_error:.2e}, {half} twin {twin_error:.2e}: WEIGHT_RTOL {WEIGHT_RTOL:.0e} is to lie between"
    )


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # triton_device only skips
@given(
    num_experts=st.integers(1, 64),
    top_k=st.integers(1, 64),
    num_tokens=st.integers(1, 40),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ties_on_a_coarse_grid_are_exact(triton_device, dtype, num_experts, top_k, num_tokens, renormalize, seed):
    """Logits in {-1, -0.5, 0, 0.5, 1} (exact in float16 and float32): many exact ties, which go to the lower
    index, so the ids are exactly the oracle's; the weights sum as the config says."""
    top_k = min(top_k, num_experts)
    config = _config(num_experts, top_k, renormalize)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (num_tokens, num_experts), generator=g).float() / 2
    logits = logits.to(triton_device, dtype)
    _check(logits, config, exact_ids=True)
    sums = route(logits, config).topk_weights.sum(dim=1).cpu()
    if renormalize or top_k == num_experts:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:
        assert bool((sums <= 1 + 1e-6).all())


@pytest.mark.parametrize("num_experts", [1, 5, 12, 33, 64])
@pytest.mark.parametrize("renormalize", [False, True])
def test_k_equal_e_ranks_every_expert(triton_device, num_experts, renormalize):
    logits = torch.randn(7, num_experts, generator=torch.Generator().manual_seed(num_experts)).to(triton_device)
    _check(logits, _config(num_experts, num_experts, renormalize), exact_ids=False)
    ids = route(logits, _config(num_experts, num_experts, renormalize)).topk_ids.cpu()
    assert ids.sort(dim=1).values.tolist() == [list(range(num_experts))] * 7


def test_equal_logits_and_minus_inf_go_to_the_lower_index(triton_device):
    logits = torch.full((3, 6), float("-inf"), device=triton_device)
    logits[:, 4] = 1.0
    logits[:, 2] = 1.0
    out = route(logits, _config(6, 4, renormalize=False), check_values=False)
    assert out.topk_ids.cpu().tolist() == [[2, 4, 0, 1]] * 3
    assert out.topk_weights.cpu().tolist() == [[0.5, 0.5, 0.0, 0.0]] * 3


def test_strided_logits(triton_device):
    """A transposed view (stride(1) != 1) is read in place and gives the contiguous result: the same ids,
    the same weights up to the order of the softmax sum (the GPU compiler vectorises unit strides; seen:
    one-ulp differences on an H200)."""
    logits = torch.randn(12, 9, generator=torch.Generator().manual_seed(3)).to(triton_device).t()
    config = _config(12, 4, renormalize=True)
    a, b = route(logits, config), route(logits.contiguous(), config)
    assert torch.equal(a.topk_ids, b.topk_ids)
    torch.testing.assert_close(a.topk_weights, b.topk_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_tokens", [0, 1])
def test_zero_and_one_token(triton_device, num_tokens):
    from moekit.kernels.fused_select import fused_select

    logits = torch.randn(num_tokens, 8, device=triton_device)
    ids, weights = fused_select(logits, 3, True)
    assert ids.shape == weights.shape == (num_tokens, 3)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.device == logits.device
    _check(logits, _config(8, 3, True), exact_ids=False)


def test_launcher_rejects_bad_input():
    pytest.importorskip("triton")
    from moekit.kernels.fused_select import fused_select

    with pytest.raises(TypeError, match=r"logits must be float16, bfloat16 or float32 .*torch.float64"):
        fused_select(torch.randn(3, 4, dtype=torch.float64), 2, True)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
        fused_select(torch.randn(3, 4), 5, True)
    with pytest.raises(ValueError, match=r"logits must have shape \(T, E\)"):
        fused_select(torch.randn(4), 2, True)


def test_route_refuses_what_supports_refuses(monkeypatch):
    config = _config(4, 2, renormalize=True)
    with pytest.raises(ValueError, match=r"'fused_select' cannot run on cpu with torch.float64: the Triton kernels"):
        route(torch.randn(3, 4, dtype=torch.float64), config)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA, or TRITON_INTERPRET=1"):
        route(torch.randn(3, 4), config)
    import moekit.kernels.availability as availability

    monkeypatch.setattr(availability, "_triton_installed", lambda: False)
    ok, reason = ROUTER.supports(torch.device("cuda"), torch.float32)
    assert not ok and reason.startswith("triton is not installed")
