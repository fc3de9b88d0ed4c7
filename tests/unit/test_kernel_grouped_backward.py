"""The expert MLP's backward kernels against float64 torch: grouped_weight_grad (a per-expert a.T @ b),
grouped_gemm's kept pre-activation (gate_up_out) and grouped_gemm_swiglu_backward (SwiGLU's backward and the
row-scale gradient in the epilogue of the GEMM on the transposed down weight)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit.kernels.availability import KERNEL_DTYPES
from moekit.kernels.grouped_gemm import grouped_gemm, grouped_gemm_swiglu_backward
from moekit.kernels.grouped_weight_grad import grouped_weight_grad
from moekit.testing import assert_close_to_reference
from moekit.testing.numerics import gradient_tolerance
from moekit.testing.strategies import expert_row_counts

SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # triton_device only skips


def offsets_of(counts, device, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype, device=device)


def randn(*shape, generator, dtype, device, layout="row") -> torch.Tensor:
    t = torch.randn(*shape, generator=generator).to(dtype)
    if layout == "column":  # same values, the first dimension contiguous
        t = t.t().contiguous().t()
    return t.to(device)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@SETTINGS
@given(data=st.data())
def test_grouped_weight_grad_matches_float64_loop(triton_device, dtype, data):
    counts = data.draw(expert_row_counts(), label="counts")
    pad = data.draw(st.integers(0, 3), label="pad")
    P, Q = data.draw(st.integers(1, 40), label="P"), data.draw(st.integers(1, 40), label="Q")
    layout = data.draw(st.sampled_from(["row", "column"]), label="a layout")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    M = sum(counts) + pad
    a = randn(M, P, generator=g, dtype=dtype, device=triton_device, layout=layout)
    b = randn(M, Q, generator=g, dtype=dtype, device=triton_device)
    a[sum(counts) :] = math.nan  # padding rows must not be read
    offsets = offsets_of(counts, triton_device, data.draw(st.sampled_from([torch.int32, torch.int64])))

    out = grouped_weight_grad(a, b, offsets)

    assert out.shape == (len(counts), P, Q) and out.dtype == dtype
    bounds = offsets.tolist()
    for e, count in enumerate(counts):
        if count == 0:
            assert bool((out[e] == 0).all()), f"expert {e} has no rows: its gradient must be zero"
            continue
        rows = slice(bounds[e], bounds[e + 1])
        ref = a[rows].double().cpu().T @ b[rows].double().cpu()
        assert_close_to_reference(out[e], ref, dtype, f"grouped_weight_grad expert {e} of {counts}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@SETTINGS
@given(data=st.data())
def test_ragged_descriptor_loads_give_the_pointer_loads_result(triton_device, monkeypatch, dtype, data):
    """The copy-engine path reads whole row blocks, bounded per expert by its ragged descriptors; the masked
    pointer loads read only the expert's rows. Both give the same gradient, bit for bit, with NaN and inf in the
    padding rows past offsets[E] (a row of the next expert or of the padding in the sum would show). The
    interpreter runs the descriptor path too."""
    import moekit.kernels.grouped_gemm as kernels

    counts, pad = data.draw(expert_row_counts(), label="counts"), data.draw(st.integers(0, 3), label="pad")
    P, Q = (8 * data.draw(st.integers(1, 5), label=f"{name} / (16 bytes)") for name in "PQ")  # TMA's 16-byte rows
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    M = sum(counts) + pad
    a = randn(M, P, generator=g, dtype=dtype, device=triton_device)
    b = randn(M, Q, generator=g, dtype=dtype, device=triton_device)
    a[sum(counts) :], b[sum(counts) :] = math.nan, math.inf
    offsets = offsets_of(counts, triton_device)
    outs = {}
    for loads in (True, False):
        monkeypatch.setattr(kernels, "copy_engine_loads", lambda device, loads=loads: loads)
        outs[loads] = grouped_weight_grad(a, b, offsets)
    assert torch.equal(outs[True], outs[False])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@SETTINGS
@given(counts=expert_row_counts(), K=st.integers(1, 40), F_=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_keeps_the_pre_activation(triton_device, dtype, counts, K, F_, seed):
    g = torch.Generator().manual_seed(seed)
    M, valid = sum(counts) + 2, sum(counts)
    a = randn(M, K, generator=g, dtype=dtype, device=triton_device)
    b = randn(len(counts), 2 * F_, K, generator=g, dtype=dtype, device=triton_device)
    offsets = offsets_of(counts, triton_device)
    gate_up = torch.full((M, 2 * F_), math.nan, dtype=dtype, device=triton_device)

    activation = grouped_gemm(a, b, offsets, swiglu=True, gate_up_out=gate_up)

    bounds = offsets.tolist()
    ref = torch.cat([a[bounds[e] : bounds[e + 1]].double().cpu() @ b[e].double().cpu().T for e in range(len(counts))])
    assert bool(torch.isnan(gate_up[valid:]).all()), "padding rows past offsets[E] were written"
    assert_close_to_reference(gate_up[:valid], ref, dtype, "gate_up_out")
    gate, up = ref.chunk(2, dim=1)
    assert_close_to_reference(activation[:valid], F.silu(gate) * up, dtype, "activation beside gate_up_out")


def swiglu_backward_reference(d_out, w_down, offsets, gate_up, row_scale):
    """float64 autograd of out = row_scale * (silu(gate) * up) @ w_down[e].T over rows [0, offsets[E])."""
    bounds = offsets.tolist()
    valid = bounds[-1]
    gate_up = gate_up[:valid].double().cpu().requires_grad_()
    scale = (row_scale[:valid] if row_scale is not None else torch.ones(valid)).double().cpu().requires_grad_()
    gate, up = gate_up.chunk(2, dim=1)
    activation = F.silu(gate) * up * scale[:, None]
    out = torch.cat([activation[bounds[e] : bounds[e + 1]] @ w_down[e].double().cpu().T for e in range(len(w_down))])
    d_gate_up, d_scale = torch.autograd.grad(out, (gate_up, scale), d_out[:valid].double().cpu())
    return d_gate_up, activation.detach(), d_scale


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@SETTINGS
@given(
    counts=expert_row_counts(),
    H=st.integers(1, 40),
    F_=st.integers(1, 40),
    scaled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_grouped_gemm_swiglu_backward_matches_float64_autograd(triton_device, dtype, counts, H, F_, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    M, valid = sum(counts) + 2, sum(counts)
    d_out = randn(M, H, generator=g, dtype=dtype, device=triton_device)
    w_down = randn(len(counts), H, F_, generator=g, dtype=dtype, device=triton_device)
    gate_up = randn(M, 2 * F_, generator=g, dtype=dtype, device=triton_device)
    row_scale = (torch.rand(M, generator=g) + 0.5).to(triton_device) if scaled else None
    offsets = offsets_of(counts, triton_device)

    d_gate_up, activation, d_scale = grouped_gemm_swiglu_backward(d_out, w_down, offsets, gate_up, row_scale)

    ref_d_gate_up, ref_activation, ref_d_scale = swiglu_backward_reference(d_out, w_down, offsets, gate_up, row_scale)
    what = f"swiglu backward {dtype} counts {counts}"
    assert_close_to_reference(d_gate_up[:valid], ref_d_gate_up, dtype, f"{what}: d_gate_up")
    assert_close_to_reference(activation[:valid], ref_activation, dtype, f"{what}: scaled activation")
    if scaled:
        assert d_scale.dtype == torch.float32 and bool((d_scale[valid:] == 0).all())
        assert_close_to_reference(d_scale[:valid], ref_d_scale, dtype, f"{what}: d_row_scale")
    else:
        assert d_scale is None


@pytest.mark.parametrize("triton_gemms", [None, "all"], ids=["default-gemms", "triton-gemms"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@SETTINGS
@given(
    counts=expert_row_counts(max_rows=24),
    # 16-byte rows take torch._grouped_mm's path; (16, 12) in 2-byte dtypes: only the gate/up GEMM's backward
    sizes=st.sampled_from([(16, 8), (8, 24), (13, 7), (16, 5), (16, 12)]),
    pad=st.integers(0, 3),
    scaled=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(counts=[1], sizes=(8, 24), pad=0, scaled=True, seed=327)  # one row whose row-scale gradient cancels
def test_sorted_rows_mlp_backward_matches_float64_autograd(
    triton_device, monkeypatch, triton_gemms, dtype, counts, sizes, pad, scaled, seed
):
    """The whole backward of the expert MLP on sorted rows, each GEMM's on either path (backward_on_grouped_mm;
    MOEKIT_TRITON_BACKWARD=all puts the aligned sizes on the Triton kernels too): gradients of rows (zero on
    padding rows past offsets[E]), both weights and the row scale."""
    from moekit.kernels import differentiable

    if triton_gemms:
        monkeypatch.setenv("MOEKIT_TRITON_BACKWARD", triton_gemms)

    (H, F_), g = sizes, torch.Generator().manual_seed(seed)
    E, valid = len(counts), sum(counts)
    rows = randn(valid + pad, H, generator=g, dtype=dtype, device=triton_device)
    w_gate_up = randn(E, 2 * F_, H, generator=g, dtype=dtype, device=triton_device) / H**0.5
    w_down = randn(E, H, F_, generator=g, dtype=dtype, device=triton_device) / F_**0.5
    scale = (torch.rand(valid + pad, generator=g) + 0.5).to(triton_device) if scaled else None
    d_out = randn(valid + pad, H, generator=g, dtype=dtype, device=triton_device)
    offsets = offsets_of(counts, triton_device)
    leaves = [t.clone().requires_grad_() for t in (rows, w_gate_up, w_down, *([scale] if scaled else []))]
    out = differentiable.sorted_rows_mlp(*leaves[:3], offsets, leaves[3] if scaled else None)
    got = torch.autograd.grad(out, leaves, d_out)
    what = f"backward GEMMs {backward_paths(w_gate_up, w_down)}, counts {counts}, H {H}, F {F_}, pad {pad}"
    assert bool((got[0][valid:] == 0).all()), f"{what}: padding rows got a gradient"
    check_mlp(out, got, leaves, offsets, d_out, dtype, what)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@SETTINGS
@given(
    counts=expert_row_counts(max_rows=24),
    sizes=st.sampled_from([(16, 8), (8, 24), (32, 16)]),  # 16-byte rows in every dtype: torch._grouped_mm's
    seed=st.integers(0, 2**31 - 1),
)
def test_sorted_rows_mlp_with_grouped_mm_forward_matches_float64_autograd(triton_device, dtype, counts, sizes, seed):
    """grouped_mm_fused's training form: the forward's GEMMs on torch._grouped_mm with the Triton SwiGLU between
    them (no padding rows, no row scale), the same backward."""
    from moekit.experts.grouped_mm import grouped_mm_support
    from moekit.kernels import differentiable

    ok, reason = grouped_mm_support(triton_device, dtype)
    if not ok:
        pytest.skip(reason)
    (H, F_), g = sizes, torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    rows = randn(M, H, generator=g, dtype=dtype, device=triton_device)
    w_gate_up = randn(E, 2 * F_, H, generator=g, dtype=dtype, device=triton_device) / H**0.5
    w_down = randn(E, H, F_, generator=g, dtype=dtype, device=triton_device) / F_**0.5
    d_out = randn(M, H, generator=g, dtype=dtype, device=triton_device)
    offsets = offsets_of(counts, triton_device)
    leaves = [t.clone().requires_grad_() for t in (rows, w_gate_up, w_down)]
    out = differentiable.sorted_rows_mlp(*leaves, offsets, padded=False, forward_on_grouped_mm=True)
    got = torch.autograd.grad(out, leaves, d_out)
    what = f"forward on torch._grouped_mm, backward GEMMs {backward_paths(w_gate_up, w_down)}, counts {counts}"
    check_mlp(out, got, leaves, offsets, d_out, dtype, what)


def test_a_grouped_mm_forward_refuses_padding_and_a_row_scale():
    from moekit.kernels import differentiable

    rows, w_gate_up, w_down = torch.randn(4, 8), torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    offsets = torch.tensor([0, 1, 3])
    for padded, scale in ((True, None), (False, torch.ones(4))):
        with pytest.raises(ValueError, match="forward_on_grouped_mm needs padded=False .* and row_scale=None"):
            differentiable.sorted_rows_mlp(rows, w_gate_up, w_down, offsets, scale, padded=padded,
                                           forward_on_grouped_mm=True)  # fmt: skip


def backward_paths(w_gate_up, w_down) -> dict[str, str]:
    """Which path each of sorted_rows_mlp's backward GEMMs takes for these weights."""
    from moekit.kernels import differentiable

    return {
        gemm: "torch._grouped_mm" if differentiable.backward_on_grouped_mm(w, gemm) else "Triton"
        for gemm, w in zip(differentiable.BACKWARD_GEMMS, (w_gate_up, w_gate_up, w_down, w_down))
    }


def check_mlp(out, got, leaves, offsets, d_out, dtype, what) -> None:
    """out and got (d rows, d w_gate_up, d w_down[, d row_scale]) against the per-expert loop on leaves (rows,
    w_gate_up, w_down[, row_scale]) and its float64 autograd; rows past offsets[E] are padding, not compared."""
    scaled, bounds = len(leaves) == 4, offsets.tolist()
    valid = bounds[-1]
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_out = []
    for e in range(len(bounds) - 1):
        r = slice(bounds[e], bounds[e + 1])
        gate, up = (ref_leaves[0][r] @ ref_leaves[1][e].T).chunk(2, dim=1)
        y = (F.silu(gate) * up) @ ref_leaves[2][e].T
        ref_out.append(y * ref_leaves[3][r, None] if scaled else y)
    ref_out = torch.cat(ref_out)
    assert_close_to_reference(out[:valid], ref_out, dtype, f"{what}: output")
    expected = torch.autograd.grad(ref_out, ref_leaves, d_out[:valid].double().cpu(), allow_unused=True)
    for name, value, ref in zip(("rows", "w_gate_up", "w_down", "row_scale"), got, expected):
        ref = ref if ref is not None else torch.zeros(value.shape, dtype=torch.float64)
        value = value[:valid] if name in ("rows", "row_scale") else value
        ref = ref[:valid] if name in ("rows", "row_scale") else ref
        if name == "row_scale":
            check_row_scale_gradient(value, ref, ref_out / ref_leaves[3][:valid, None], d_out[:valid], dtype, what)
        else:
            assert_close_to_reference(value, ref, dtype, f"{what}: d{name}", gradient_tolerance(dtype))


def check_row_scale_gradient(value, ref, unscaled_out, d_out, dtype, what) -> None:
    """d row_scale[i] = sum_h d_out[i, h] * unscaled_out[i, h], one dot product over H per row: its rounding error
    scales with the terms, not with a sum they may cancel in (one row of H = 8 gave -0.0099 against -0.0098 in
    float16, 1.4e-2 relative). So the error is taken relative to the terms' magnitude sum_h |d_out * out|, under
    the same gradient tolerance: a wrong term or a dropped row still fails by far."""
    magnitude = (d_out.double().cpu() * unscaled_out.detach()).abs().sum(1)
    err = float((value.detach().double().cpu() - ref).norm() / magnitude.norm().clamp(min=1e-300))
    tol = gradient_tolerance(dtype)
    assert err <= tol, f"{what}: drow_scale: error {err:.3e} of the terms' magnitude exceeds {tol:.1e}"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: grouped_weight_grad(torch.randn(4, 3), torch.randn(5, 2), torch.tensor([0, 4])), ValueError,
         "same rows M, got 4 and 5"),
        (lambda: grouped_weight_grad(torch.randn(4, 3), torch.randn(4), torch.tensor([0, 4])), ValueError, "2-D"),
        (lambda: grouped_weight_grad(torch.randn(4, 3), torch.randn(4, 2).half(), torch.tensor([0, 4])), TypeError,
         "b must have a's dtype"),
        (lambda: grouped_weight_grad(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0.0, 4.0])), ValueError,
         "expert_offsets must be int32 or int64"),
        (lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([0, 1, 4]),
                              gate_up_out=torch.empty(4, 6)), ValueError, "pass swiglu=True"),
        (lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 6, 8), torch.tensor([0, 1, 4]), swiglu=True,
                              gate_up_out=torch.empty(4, 3)), ValueError, r"gate_up_out must be .* of shape \(4, 6\)"),
        (lambda: grouped_gemm_swiglu_backward(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 1, 4]),
                                              torch.empty(4, 5)), ValueError, r"gate_up must be .* of shape \(4, 6\)"),
        (lambda: grouped_gemm_swiglu_backward(torch.randn(4, 8), torch.randn(8, 3), torch.tensor([0, 1, 4]),
                                              torch.empty(4, 6)), ValueError, r"w_down must be 3-D \(E, H, F\)"),
        (lambda: grouped_gemm_swiglu_backward(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 1, 4]),
                                              torch.empty(6, 4).t()), ValueError, "contiguous rows"),
    ],
)  # fmt: skip
def test_backward_kernels_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
def test_small_weights_take_their_gradients_on_triton_where_descriptors_load(monkeypatch):
    """The default split on Hopper: d_rows on Triton, d_act on torch._grouped_mm, and the weight gradients on
    Triton for weights of at most 2**22 elements per expert (Qwen3-30B-A3B's), on torch for larger ones."""
    from moekit.kernels import differentiable
    from moekit.kernels.grouped_gemm import copy_engine_loads

    monkeypatch.delenv("MOEKIT_TRITON_BACKWARD", raising=False)
    if not copy_engine_loads(torch.device("cuda")):
        pytest.skip("tensor-descriptor loads need compute capability 9.0")
    small = torch.empty(2, 1536, 2048, dtype=torch.bfloat16, device="cuda")
    large = torch.empty(2, 4096, 7168, dtype=torch.bfloat16, device="cuda")
    weights = {"small": small, "large": large}
    on_torch = {
        (gemm, name): differentiable.backward_on_grouped_mm(w, gemm)
        for gemm in differentiable.BACKWARD_GEMMS
        for name, w in weights.items()
    }
    assert on_torch == {
        ("gate_up.input", "small"): False, ("gate_up.input", "large"): False,
        ("down.input", "small"): True, ("down.input", "large"): True,
        ("gate_up.weight", "small"): False, ("gate_up.weight", "large"): True,
        ("down.weight", "small"): False, ("down.weight", "large"): True,
    }  # fmt: skip


def test_backward_gemm_names_are_checked(monkeypatch):
    """An unknown GEMM name, from a caller or in MOEKIT_TRITON_BACKWARD, is an error naming it, not a silent
    fall-back to torch._grouped_mm."""
    from moekit.kernels import differentiable

    weight = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="gemm must be one of .*'down.bias'"):
        differentiable.backward_on_grouped_mm(weight, "down.bias")
    monkeypatch.setenv("MOEKIT_TRITON_BACKWARD", "gate_up.input,gate_up.wieght")
    with pytest.raises(ValueError, match=r"MOEKIT_TRITON_BACKWARD names \['gate_up.wieght'\]"):
        differentiable.backward_on_grouped_mm(weight, "gate_up.input")
    monkeypatch.setenv("MOEKIT_TRITON_BACKWARD", "down.weight")
    assert not differentiable.backward_on_grouped_mm(weight, "down.weight")
