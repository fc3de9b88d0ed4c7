"""FP8 expert weights (moekit.quantize) against scales and roundings computed here, block by block."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, make_problem
from moekit.quantize import (
    FP8,
    FP8_MAX,
    SCHEMES,
    QuantizedMoEWeights,
    QuantizedTensor,
    quantize,
    quantize_weights,
)
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference

# e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself, a subnormal (below
# 2^-6) by at most half its spacing 2^-9
HALF_ULP, SUBNORMAL_HALF_SPACING = 2.0**-4, 2.0**-10


def expected_scale(w: torch.Tensor, scheme: str, block: int) -> torch.Tensor:
    """The scale of every group, one group at a time: amax / FP8_MAX, 1 for an all-zero group."""
    E, N, K = w.shape
    rows, cols = (math.ceil(N / block), math.ceil(K / block)) if scheme == "block" else (N, 1)
    scale = torch.empty(E, rows, cols)
    for e in range(E):
        for i in range(rows):
            for j in range(cols):
                if scheme == "block":
                    group = w[e, i * block : (i + 1) * block, j * block : (j + 1) * block]
                else:
                    group = w[e, i]
                amax = float(group.abs().max()) if group.numel() else 0.0
                scale[e, i, j] = amax / FP8_MAX if amax > 0 else 1.0
    return scale


@st.composite
def weights(draw):
    """w [E, N, K] float32: sizes around and off the block, some groups zero, some rows outliers."""
    block = draw(st.sampled_from([128, 16, 5]))
    E, N, K = draw(st.integers(1, 3)), draw(st.integers(1, 300)), draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(E, N, K, generator=g) * torch.exp(2 * torch.randn(E, 1, 1, generator=g))
    if draw(st.booleans()):  # outlier rows: amax 1e4 times the rest
        w[:, draw(st.integers(0, N - 1))] *= 1e4
    if draw(st.booleans()):  # an all-zero block (and rows)
        w[0, : min(N, block), : min(K, block)] = 0
    return w, block


@settings(max_examples=40, deadline=None)
@given(case=weights(), scheme=st.sampled_from(SCHEMES))
def test_quantize_scales_each_group_by_its_amax_and_rounds_to_e4m3(case, scheme):
    w, block = case
    q = quantize(w, scheme, block)
    assert q.values.dtype == FP8 and q.values.shape == w.shape and q.scale.dtype == torch.float32
    torch.testing.assert_close(q.scale, expected_scale(w, scheme, block), rtol=1e-6, atol=0)
    scaled = w / q.expanded_scale()  # each group's amax at FP8_MAX
    err = (scaled - q.values.float()).abs()
    assert bool((err <= torch.clamp(HALF_ULP * scaled.abs(), min=SUBNORMAL_HALF_SPACING)).all())
    deq = q.dequantize(torch.float32)
    assert bool(torch.isfinite(deq).all())
    assert bool((deq[w == 0] == 0).all()), "zeros (all-zero groups included) dequantize to zero"


def test_an_outlier_row_costs_only_its_own_group():
    """Row scheme: one row 1e4 times the others leaves every other row's error where it was; block scheme: the
    outlier's blocks lose the small values (flushed towards zero), the other blocks keep theirs."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 256, 256, generator=g)
    outlier = w.clone()
    outlier[0, 3] *= 1e4
    for scheme in SCHEMES:
        plain, spiky = (quantize(t, scheme).dequantize() for t in (w, outlier))
        far = slice(128, 256)  # rows in other blocks than the outlier's
        assert torch.equal(plain[0, far], spiky[0, far]), scheme
        if scheme == "row":
            assert torch.equal(plain[0, 4:], spiky[0, 4:])


def test_the_dequantized_layer_equals_the_oracle_on_the_dequantized_weights():
    """quantize_weights keeps router and shared experts; its dequantize is what the oracle of an FP8 backend
    runs on; the quantized layer's distance from the bf16 one is e4m3's (a few percent), not more."""
    config = MoEConfig(hidden_size=160, ffn_size=96, num_experts=4, top_k=2, num_shared_experts=1, dtype=torch.float32)
    problem = make_problem(config, 33, seed=1)
    for scheme in SCHEMES:
        q = quantize_weights(problem.weights, scheme)
        assert isinstance(q, QuantizedMoEWeights) and q.scheme == scheme
        assert q.router_weight is problem.weights.router_weight and q.shared_down is problem.weights.shared_down
        deq = q.dequantize(torch.float32)
        assert deq.w_gate_up.shape == (4, 192, 160) and deq.w_down.shape == (4, 160, 96)
        exact = reference_moe(problem.x, problem.weights, config).y
        quantized = reference_moe(problem.x, deq, config).y
        err = float((quantized - exact).norm() / exact.norm())
        assert 1e-3 < err < 0.05, f"{scheme}: the e4m3 weights moved the layer by {err:.2e}"
        assert_close_to_reference(deq.w_down, q.w_down.values.float() * q.w_down.expanded_scale(), torch.float32)


def test_bad_input_names_the_argument():
    w = torch.randn(2, 130, 70)
    q = quantize(w, "block")
    with pytest.raises(ValueError, match=r"scheme must be one of \('block', 'row'\), got 'tensor'"):
        quantize(w, "tensor")
    with pytest.raises(ValueError, match=r"w must be 3-D"):
        quantize(w[0], "row")
    with pytest.raises(ValueError, match=r"scale \(block scheme\) must have shape \(2, 2, 1\), got \(2, 130, 1\)"):
        QuantizedTensor(q.values, torch.ones(2, 130, 1), "block")
    with pytest.raises(TypeError, match=r"scale \(row scheme\) must have dtype in \['torch.float32'\]"):
        QuantizedTensor(q.values, torch.ones(2, 130, 1, dtype=torch.float64), "row")
    with pytest.raises(TypeError, match="values must have dtype in"):
        QuantizedTensor(q.values.float(), q.scale, "block")
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        quantize(w, "block", block_size=0)
    row = quantize(torch.randn(2, 70, 65), "row")
    with pytest.raises(ValueError, match="share one scheme"):
        QuantizedMoEWeights(q, row, torch.randn(2, 70))
    with pytest.raises(ValueError, match=r"w_down must have shape \(2, 70, 65\)"):
        QuantizedMoEWeights(q, quantize(torch.randn(2, 70, 64), "block"), torch.randn(2, 70))
