"""The Triton permute, unpermute and SiLU * up kernels (and SiLU * up's backward) against their torch twins: data
movement bit for bit, reductions within the dtype's tolerance. Run under TRITON_INTERPRET=1 on the CPU, natively on
GPU."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.permute import expert_layout, permute_tokens, unpermute_reduce
from moekit.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def kernels(triton_device):
    """The kernel modules, or triton_device's skip (at setup, before Hypothesis runs an example)."""
    from moekit.kernels import permute, swiglu

    return permute, swiglu


@st.composite
def routed(draw):
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 33)))
    H = draw(st.integers(1, 70))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K)
    return ids.to(torch.int32), E, H, draw(st.sampled_from([1, 4])), g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=routed())
def test_permute_and_unpermute_kernels_match_torch(kernels, dtype, device, case):
    permute, _ = kernels
    ids, E, H, pad_to, g = case
    T, K = ids.shape
    layout = expert_layout(ids.to(device), E, pad_to=pad_to)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    rows = permute.permute_tokens_triton(x, layout)
    assert torch.equal(rows, permute_tokens(x, layout))  # a copy: bit for bit, padding rows zero
    rows = torch.randn(layout.num_rows, H, generator=g).to(device, dtype)
    weights = (torch.rand(T, K, generator=g) + 0.1).to(device)
    for w in (weights, None):
        out = permute.unpermute_reduce_triton(rows, layout, w)
        assert_close_to_reference(out, unpermute_reduce(rows.double(), layout, w), dtype, "unpermute")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=routed(), wide=st.booleans(), asked=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_unpermute_backward_kernel_matches_float64_autograd(kernels, dtype, device, case, wide, asked):
    """d_rows (padding rows zero) and d_weights of the weighted unpermute, each alone and both,
    against float64 autograd of unpermute_reduce; wide rows take several H blocks per token."""
    permute, _ = kernels
    ids, E, H, pad_to, g = case
    H = H + 2100 if wide else H
    T, K = ids.shape
    layout = expert_layout(ids.to(device), E, pad_to=pad_to)
    rows = torch.randn(layout.num_rows, H, generator=g).to(device, dtype)
    weights = (torch.rand(T, K, generator=g) + 0.1).to(device)
    dy = torch.randn(T, H, generator=g).to(device, dtype)
    d_rows, d_weights = permute.unpermute_reduce_backward_triton(dy, rows, layout, weights, *asked)

    ref_rows, ref_weights = rows.double().requires_grad_(), weights.double().requires_grad_()
    if T:
        unpermute_reduce(ref_rows, layout, ref_weights).backward(dy.double())
    ref_d_rows = ref_rows.grad if ref_rows.grad is not None else torch.zeros_like(ref_rows)
    ref_d_weights = ref_weights.grad if ref_weights.grad is not None else torch.zeros_like(ref_weights)
    assert (d_rows is not None, d_weights is not None) == asked
    if d_rows is not None:
        assert d_rows.dtype == dtype and bool(torch.isfinite(d_rows).all()), "a row was left unwritten"
        assert_close_to_reference(d_rows, ref_d_rows, dtype, f"d_rows, pad_to {pad_to}, H {H}")
    if d_weights is not None:
        assert d_weights.dtype == weights.dtype
        assert_close_to_reference(d_weights, ref_d_weights, dtype, f"d_weights, pad_to {pad_to}, H {H}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), f=st.integers(1, 1500), seed=st.integers(0, 2**31 - 1))
def test_swiglu_kernel_matches_torch(kernels, dtype, device, n, f, seed):
    _, swiglu = kernels
    gate_up = torch.randn(n, 2 * f, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    out = torch.full((n, f), float("nan"), device=device, dtype=dtype)  # poisoned: every element written
    swiglu.swiglu(gate_up, out=out)
    ref = F.silu(gate_up[:, :f].double()) * gate_up[:, f:].double()
    assert_close_to_reference(out, ref, dtype, "swiglu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), f=st.integers(1, 1500), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_swiglu_backward_kernel_matches_float64_autograd(kernels, dtype, device, n, f, strided, seed):
    _, swiglu = kernels
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, 2 * f + 3, generator=g).to(device, dtype)
    gate_up = wide[:, : 2 * f] if strided else wide[:, : 2 * f].contiguous()  # rows 2F + 3 apart when strided
    dh = torch.randn(n, f, generator=g).to(device, dtype)
    d_gate_up = swiglu.swiglu_backward(gate_up, dh)
    ref_in = gate_up.double().cpu().requires_grad_()
    out = F.silu(ref_in[:, :f]) * ref_in[:, f:]
    (ref,) = torch.autograd.grad(out, ref_in, dh.double().cpu())
    assert d_gate_up.shape == gate_up.shape and d_gate_up.dtype == dtype
    assert_close_to_reference(d_gate_up, ref, dtype, "swiglu backward")


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_kernel_arguments_are_checked(kernels, dtype, device):
    permute, swiglu = kernels
    with pytest.raises(ValueError, match=r"gate_up must be \[N, 2F\]"):
        swiglu.swiglu(torch.randn(2, 3, device=device))
    with pytest.raises(ValueError, match=r"dh must be \[2, 3\]"):
        swiglu.swiglu_backward(torch.randn(2, 6, device=device), torch.randn(2, 4, device=device))
    layout = expert_layout(torch.zeros(3, 1, dtype=torch.int32, device=device), 2)
    with pytest.raises(ValueError, match="x must have 3 rows"):
        permute.permute_tokens_triton(torch.randn(2, 4, device=device), layout)
    with pytest.raises(ValueError, match=r"topk_weights must be \[3, 1\]"):
        permute.unpermute_reduce_triton(torch.randn(3, 4, device=device), layout, torch.ones(3, 2, device=device))
