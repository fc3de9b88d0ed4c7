"""The Triton grouped_topk kernel (what the grouped_topk router runs on CUDA) against the float64 oracle.

On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1) in float32 and float16; on CUDA also in
bfloat16. Hypothesis draws the DeepSeek-V3 router's whole configuration space (E, n_group, topk_group, K up
to topk_group * E / n_group, renormalisation, scaling, a correction bias, T = 0 and 1, skew); the dtype is a
pytest parameter, so where the kernel cannot run the test skips before Hypothesis runs an example."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.kernels.availability import INTERPRETER_DTYPES, KERNEL_DTYPES
from moekit.reference import reference_route
from moekit.routing import apply_skew, route
from moekit.testing.near_ties import ambiguous_tokens

# The weights' bound, in torch.testing.assert_close's terms: |w - ref| <= WEIGHT_ATOL + WEIGHT_RTOL * |ref|.
# It sits between the kernel and its half-precision twin (the sigmoid scores, their renormalisation and
# scaling in float16, or bfloat16 for bfloat16 logits), measured by _weight_error on DeepSeek-V3's router,
# 64 tokens: the kernel 6.7e-8 (interpreter, fp32 and fp16 logits; 1.7e-7 at K = E = 12; an emulation of
# the GPU's ex2.approx sigmoid 8.1e-8..1.7e-7), the float16 twin 2.2e-4..5.9e-4 (bfloat16's 2.1e-3..5e-3).
# test_weight_bound_sits_between_the_kernel_and_its_half_precision_twin measures both on every run.
WEIGHT_RTOL, WEIGHT_ATOL = 2e-6, 1e-6


def _weight_error(weights: torch.Tensor, ref: torch.Tensor) -> float:
    """max |w - ref| / (WEIGHT_ATOL / WEIGHT_RTOL + |ref|): at most WEIGHT_RTOL when assert_close passes."""
    return float(((weights.cpu().double() - ref).abs() / (WEIGHT_ATOL / WEIGHT_RTOL + ref.abs())).max())


def _kernel(logits, config, bias):
    from moekit.kernels.grouped_topk import grouped_topk_triton

    return grouped_topk_triton(logits, config, bias)


@st.composite
def grouped_configs(draw, max_experts: int = 64) -> MoEConfig:
    num_experts = draw(st.integers(1, max_experts))
    n_group = draw(st.sampled_from([d for d in range(1, num_experts + 1) if num_experts % d == 0]))
    topk_group = draw(st.integers(1, n_group))
    return MoEConfig(
        hidden_size=4, ffn_size=4, num_experts=num_experts, router="grouped_topk", n_group=n_group,
        topk_group=topk_group, top_k=draw(st.integers(1, topk_group * (num_experts // n_group))),
        renormalize=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )  # fmt: skip


def _check(logits, config, bias, *, exact_ids: bool) -> None:
    ids, weights = _kernel(logits, config, bias)
    T, K = logits.shape[0], config.top_k
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == weights.shape == (T, K)
    ref = reference_route(logits.double().cpu(), config, None if bias is None else bias.double().cpu())
    ids, weights = ids.cpu().long(), weights.cpu().double()
    assert all(len(set(row)) == K for row in ids.tolist()), "an expert appears twice for one token"
    clear = torch.ones(T, dtype=torch.bool) if exact_ids else ~ambiguous_tokens(ref, config, eps=1e-6)
    assert torch.equal(ids[clear], ref.topk_ids[clear]), "expert choice differs from the oracle"
    torch.testing.assert_close(weights[clear], ref.topk_weights[clear], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


DEEPSEEK_V3 = MoEConfig(4, 4, 256, 8, router="grouped_topk", n_group=8, topk_group=4, routed_scaling_factor=2.5)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)  # triton_device only skips
@example(config=DEEPSEEK_V3, num_tokens=5, with_bias=True, skew=(0, 0.0), seed=0)
@example(
    config=MoEConfig(4, 4, 12, 12, router="grouped_topk", n_group=4, topk_group=4),
    num_tokens=0,
    with_bias=False,
    skew=(0, 0.0),
    seed=1,
)  # fmt: skip  K = E, no tokens
@given(
    config=grouped_configs(),
    num_tokens=st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)),
    with_bias=st.booleans(),
    skew=st.one_of(st.just((0, 0.0)), st.tuples(st.integers(1, 3), st.floats(0.5, 4.0))),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_oracle(triton_device, dtype, config, num_tokens, with_bias, skew, seed):
    """Random logits and bias, rounded to the kernel dtype: the oracle's experts except at near-ties, its weights."""
    g = torch.Generator().manual_seed(seed)
    logits = apply_skew(
        torch.randn(num_tokens, config.num_experts, generator=g), min(skew[0], config.num_experts), skew[1]
    )
    bias = torch.randn(config.num_experts, generator=g) * 0.1 if with_bias else None
    _check(logits.to(triton_device, dtype), config, None if bias is None else bias.to(triton_device), exact_ids=False)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)  # triton_device only skips
@given(config=grouped_configs(), num_tokens=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_ties_on_a_coarse_grid_are_exact(triton_device, dtype, config, num_tokens, seed):
    """Logits in {-1, -0.5, 0, 0.5, 1}: many exact ties between experts and between groups, which go to the
    lower index, so the ids are exactly the oracle's."""
    logits = torch.randint(-2, 3, (num_tokens, config.num_experts), generator=torch.Generator().manual_seed(seed))
    _check((logits.float() / 2).to(triton_device, dtype), config, None, exact_ids=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_weight_bound_sits_between_the_kernel_and_its_half_precision_twin(triton_device, dtype):
    """On DeepSeek-V3's router (64 tokens, a correction bias): the kernel's weight error is under WEIGHT_RTOL,
    and the same weights computed in half precision (the float32 upcast dropped) are over it, so a kernel
    that scores in float16 or bfloat16 fails test_matches_float64_oracle."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g).to(dtype)
    bias = torch.randn(256, generator=g) * 0.1
    ref = reference_route(logits.double(), DEEPSEEK_V3, bias.double())
    ids, weights = _kernel(logits.to(triton_device), DEEPSEEK_V3, bias.to(triton_device))
    same = (ids.cpu().long() == ref.topk_ids).all(dim=1)  # the weights compared where the experts agree
    assert int(same.sum()) >= 48, "the kernel's experts differ from the oracle's for over 16 of 64 tokens"
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    scores = torch.sigmoid(logits.to(half)).gather(1, ref.topk_ids)  # in half precision, op by op
    twin = scores / scores.sum(dim=1, keepdim=True) * DEEPSEEK_V3.routed_scaling_factor
    kernel_error = _weight_error(weights.cpu()[same], ref.topk_weights[same])
    twin_error = _weight_error(twin[same], ref.topk_weights[same])
    assert kernel_error < WEIGHT_RTOL < twin_error, (
        f"kernel {kernel_error:.2e}, {half} twin {twin_error:.2e}: WEIGHT_RTOL {WEIGHT_RTOL:.0e} is to lie between"
    )


def test_groups_outside_the_kept_ones_are_never_chosen(triton_device):
    """Group 1 holds the best single expert but group 0 the best pair: with one group kept, group 0 wins."""
    device = triton_device
    config = MoEConfig(4, 4, 8, 2, router="grouped_topk", n_group=2, topk_group=1, renormalize=False)
    logits = torch.tensor([[2.0, 2.0, -5, -5, 3.0, -5, -5, -5]], device=device)
    ids, weights = _kernel(logits, config, None)
    assert ids.cpu().tolist() == [[0, 1]]
    torch.testing.assert_close(weights.cpu(), torch.sigmoid(torch.tensor([[2.0, 2.0]])))


@pytest.mark.gpu
def test_the_router_runs_the_kernel_on_cuda_and_torch_ops_elsewhere(monkeypatch):
    """route() with grouped_topk on CUDA goes through the kernel (a planted failure there surfaces)."""
    import moekit.kernels.grouped_topk as kernel

    def planted(*args):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(kernel, "grouped_topk_triton", planted)
    config = MoEConfig(4, 4, 8, 2, router="grouped_topk", n_group=2, topk_group=1)
    with pytest.raises(RuntimeError, match="kernel called"):
        route(torch.randn(3, 8, device="cuda"), config)
    assert route(torch.randn(3, 8), config).topk_ids.shape == (3, 2)
