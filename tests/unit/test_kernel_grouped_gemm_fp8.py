"""The FP8 kernels apart from quantization error: grouped_gemm_fp8 against a float64 per-expert loop on the
dequantized operands (what remains is float32 accumulation), its re-quantized epilogue and quantize_rows_triton
bit for bit against moekit.quantize.quantize_rows. Under TRITON_INTERPRET=1 the e4m3 loads and products run in
the interpreter and only the conversion to e4m3 is torch's (the interpreter converts wrongly: see
moekit.kernels.quantize_rows); on the GPU all of it is compiled."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit.kernels.availability import fp8_triton_support
from moekit.kernels.grouped_gemm_fp8 import grouped_gemm_fp8
from moekit.kernels.quantize_rows import quantize_rows_triton
from moekit.permute import expert_layout
from moekit.quantize import SCHEMES, quantize, quantize_rows
from moekit.testing import assert_close_to_reference
from moekit.testing.fp8_cases import spread_blocks
from moekit.testing.numerics import fp8_kernel_tolerance


@pytest.fixture
def dev(triton_device):
    ok, reason = fp8_triton_support(triton_device, torch.float32)
    if not ok:
        pytest.skip(reason)
    return triton_device


def out_dtypes(device: torch.device) -> list[torch.dtype]:
    # the interpreter computes bfloat16 wrongly, so bf16 output is checked where the kernel is compiled
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@st.composite
def problems(draw, k_multiple: int = 1):
    """Expert row counts (empty experts, every row on one), K (a multiple of k_multiple) and N around and off the
    128 block, both scale forms of each operand, outlier rows (amax 1e4 times the rest) and all-zero blocks."""
    E = draw(st.integers(1, 4))
    counts = draw(st.one_of(st.lists(st.integers(0, 24), min_size=E, max_size=E),
                            st.just([0] * (E - 1) + [29])))  # fmt: skip
    K = k_multiple * draw(st.integers(1, 300 // k_multiple))
    N = 2 * draw(st.integers(1, 300))  # SwiGLU outputs span 1 to 3 tiles of 128
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    M = sum(counts) + draw(st.integers(0, 3))  # padding rows past offsets[E]
    a = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    b = spread_blocks(torch.randn(E, N, K, generator=g), g)
    if M and draw(st.booleans()):
        a[draw(st.integers(0, M - 1))] *= 1e4
    if draw(st.booleans()):
        b[0, :128, :128] = 0
    # the products' amax in [1, 2): inside float16's range at both ends (a draw of tiny rows and K = 1 underflowed
    # it to zero); a power of two, exact through quantization (the scales make any magnitude the same to the kernel)
    a, b = (t / t.abs().amax().clamp(min=1e-30) if t.numel() else t for t in (a, b))
    products = expert_products(a.double(), b.double(), offsets_of(counts, "cpu"))
    if products.numel() and products.abs().amax() > 0:
        a = a * 2.0 ** -torch.floor(torch.log2(products.abs().amax())).item()
    return counts, a, b, draw(st.sampled_from(SCHEMES)), draw(st.sampled_from(SCHEMES))


def offsets_of(counts, device):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=device)


def expert_products(a, b, offsets):
    """float64 a[rows of e] @ b[e].T for the rows [0, offsets[E])."""
    bounds = offsets.tolist()
    return torch.cat([a[bounds[e] : bounds[e + 1]] @ b[e].T for e in range(b.shape[0])])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), swiglu=st.booleans(), with_row_scale=st.booleans(), data=st.data())
def test_grouped_gemm_fp8_is_the_float64_product_of_the_dequantized_operands(dev, problem, swiglu, with_row_scale,
                                                                             data):  # fmt: skip
    counts, a, b, a_scheme, b_scheme = problem
    out_dtype = data.draw(st.sampled_from(out_dtypes(dev)))
    qa, qb = quantize_rows(a, a_scheme), quantize(b, b_scheme)
    offsets = offsets_of(counts, "cpu")
    row_scale = torch.rand(a.shape[0]) + 0.5 if with_row_scale else None
    out, out_scale = grouped_gemm_fp8(
        qa.values.to(dev), qa.scale.to(dev), qb.values.to(dev), qb.scale.to(dev), offsets.to(dev),
        out_dtype=out_dtype, swiglu=swiglu, row_scale=None if row_scale is None else row_scale.to(dev),
    )  # fmt: skip
    assert out_scale is None and out.dtype == out_dtype
    expected = expert_products(qa.dequantize(torch.float64), qb.dequantize(torch.float64), offsets)
    if swiglu:
        gate, up = expected.chunk(2, dim=1)
        expected = F.silu(gate) * up
    if row_scale is not None:
        expected = expected * row_scale[: offsets[-1]].double()[:, None]
    what = f"a {a_scheme}, b {b_scheme}, swiglu {swiglu}, row scale {with_row_scale}, counts {counts}"
    fast = a_scheme == b_scheme == "row" and dev.type == "cuda"  # the interpreter adds exactly
    tolerance = fp8_kernel_tolerance(out_dtype, fast_accumulation=fast)
    assert_close_to_reference(out[: offsets[-1]], expected, out_dtype, what, tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("schemes", [("row", "row"), ("block", "block")], ids=str)
def test_the_tensor_cores_sum_over_mixtrals_k_within_the_accumulation_tolerance(dev, schemes):
    """K = 14336 (Mixtral's down projection), where Hopper's reduced-precision additions add up most: the row
    scheme's tensor cores sum all of K (FP8_FAST_ACCUMULATION_TOLERANCE), the block scheme promotes every 128."""
    g = torch.Generator().manual_seed(7)
    counts, K, N = [96, 160], 14336, 256
    a = torch.randn(sum(counts), K, generator=g)
    b = spread_blocks(torch.randn(len(counts), N, K, generator=g), g)
    qa, qb = quantize_rows(a, schemes[0]), quantize(b, schemes[1])
    offsets = offsets_of(counts, "cpu")
    out, _ = grouped_gemm_fp8(qa.values.to(dev), qa.scale.to(dev), qb.values.to(dev), qb.scale.to(dev),
                              offsets.to(dev), out_dtype=torch.float32)  # fmt: skip
    expected = expert_products(qa.dequantize(torch.float64), qb.dequantize(torch.float64), offsets)
    tolerance = fp8_kernel_tolerance(torch.float32, fast_accumulation=schemes[0] == "row")
    assert_close_to_reference(out, expected, torch.float32, f"K = {K}, {schemes}", tolerance)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), swiglu=st.booleans(), programs_per_sm=st.sampled_from([1, 2]))
def test_k_steps_of_two_scale_blocks_under_row_scales(dev, monkeypatch, problem, swiglu, programs_per_sm):
    """The decode tiles whose K step spans 256 (valid only where no scale changes along K: the tuner drops them for
    block scales) against the float64 product, as the tuned runs on the GPU would pick them."""
    import triton

    from moekit.kernels import grouped_gemm_fp8 as module

    counts, a, b, _, _ = problem
    kernel = module._grouped_gemm_fp8_kernel
    tile = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "PROGRAMS_PER_SM": programs_per_sm}
    monkeypatch.setattr(kernel, "configs", [triton.Config(tile, num_warps=4, num_stages=1 if dev.type == "cpu" else 3)])
    monkeypatch.setattr(kernel, "cache", {})
    qa, qb = quantize_rows(a, "row"), quantize(b, "row")
    offsets = offsets_of(counts, "cpu")
    out, _ = grouped_gemm_fp8(qa.values.to(dev), qa.scale.to(dev), qb.values.to(dev), qb.scale.to(dev),
                              offsets.to(dev), out_dtype=torch.float32, swiglu=swiglu)  # fmt: skip
    expected = expert_products(qa.dequantize(torch.float64), qb.dequantize(torch.float64), offsets)
    if swiglu:
        gate, up = expected.chunk(2, dim=1)
        expected = F.silu(gate) * up
    tolerance = fp8_kernel_tolerance(torch.float32, fast_accumulation=dev.type == "cuda")
    assert_close_to_reference(out[: offsets[-1]], expected, torch.float32, f"swiglu {swiglu}, counts {counts}",
                              tolerance)  # fmt: skip


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(k_multiple=16), swiglu=st.booleans(), quantize_out=st.booleans())
def test_tensor_descriptor_loads_give_the_pointer_loads_result(dev, monkeypatch, problem, swiglu, quantize_out):
    """The copy-engine path reads whole tiles (the next expert's rows, the up rows past a gate tile, zeros past K)
    and drops what is not the tile's by its zero scales; the masked pointer loads read zeros there. Both give the
    same output and scales, bit for bit. The interpreter runs the descriptor path too."""
    import moekit.kernels.grouped_gemm as kernels

    counts, a, b, a_scheme, b_scheme = problem
    qa, qb = quantize_rows(a, a_scheme), quantize(b, b_scheme)
    operands = (qa.values.to(dev), qa.scale.to(dev), qb.values.to(dev), qb.scale.to(dev), offsets_of(counts, dev))
    options = {"out_dtype": torch.float32, "swiglu": swiglu or quantize_out, "quantize_out": quantize_out}
    results = {}
    for loads in (True, False):
        monkeypatch.setattr(kernels, "copy_engine_loads", lambda device, loads=loads: loads)
        results[loads] = grouped_gemm_fp8(*operands, **options)
    used = sum(counts)
    for with_tma, with_pointers in zip(results[True], results[False]):
        if with_pointers is not None:
            assert torch.equal(with_tma[:used].float(), with_pointers[:used].float()), (a_scheme, b_scheme, counts)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_the_requantized_epilogue_is_quantize_rows_of_the_activation(dev, problem):
    """quantize_out gives, bit for bit, quantize_rows(.., "block") of the same kernel's float32 activation."""
    counts, a, b, a_scheme, b_scheme = problem
    qa, qb = quantize_rows(a, a_scheme), quantize(b, b_scheme)
    operands = (qa.values.to(dev), qa.scale.to(dev), qb.values.to(dev), qb.scale.to(dev), offsets_of(counts, dev))
    used = sum(counts)
    activation, _ = grouped_gemm_fp8(*operands, out_dtype=torch.float32, swiglu=True)
    values, scale = grouped_gemm_fp8(*operands, swiglu=True, quantize_out=True)
    expected = quantize_rows(activation[:used], "block")
    assert scale.shape == (a.shape[0], -(-b.shape[1] // 2 // 128))
    assert torch.equal(values[:used].float(), expected.values.float())
    assert torch.equal(scale[:used], expected.scale)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(0, 20), H=st.integers(0, 400), K=st.integers(1, 4), E=st.integers(1, 6),
    pad_to=st.sampled_from([1, 8]), scheme=st.sampled_from(SCHEMES),
    dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99),
)  # fmt: skip
@example(T=3, H=8192 + 136, K=2, E=3, pad_to=1, scheme="row", dtype=torch.float32, seed=1)  # a row of two blocks
def test_quantize_rows_triton_is_quantize_rows_permuted(dev, T, H, K, E, pad_to, scheme, dtype, seed):
    """Each token's e4m3 values and scales land, bit-equal to quantize_rows', in its K rows; padding rows hold 0
    with scale 1. Rows span outliers (amax 1e4 times the rest), zeros and fp16's whole range."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * torch.exp(3 * torch.randn(T, 1, generator=g))).clamp(-6e4, 6e4)
    if T:
        x[0] = 0
        x[-1, : H // 2] *= 1e-4
    x = x.to(dtype)
    topk_ids = torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].to(torch.int32)
    layout = expert_layout(topk_ids.to(dev), E, pad_to=pad_to)
    got = quantize_rows_triton(x.to(dev), scheme, layout)
    expected = quantize_rows(x, scheme)
    rows = layout.assignment_rows.cpu().view(T, K)
    for k in range(K):
        assert torch.equal(got.values.cpu()[rows[:, k]].float(), expected.values.float())
        assert torch.equal(got.scale.cpu()[rows[:, k]], expected.scale)
    padding = torch.ones(layout.num_rows, dtype=torch.bool)
    padding[rows.flatten()] = False
    assert bool((got.values.cpu()[padding].float() == 0).all()) and bool((got.scale.cpu()[padding] == 1).all())
    plain = quantize_rows_triton(x.to(dev), scheme)
    assert torch.equal(plain.values.cpu().float(), expected.values.float())
    assert torch.equal(plain.scale.cpu(), expected.scale)


def test_bad_input_is_refused_before_the_kernel(dev):
    qa = quantize_rows(torch.randn(10, 300), "block")
    qb = quantize(torch.randn(2, 64, 300), "block")
    offsets = torch.tensor([0, 4, 10], device=dev)
    a, a_scale, b, b_scale = (t.to(dev) for t in (qa.values, qa.scale, qb.values, qb.scale))
    with pytest.raises(TypeError, match=r"a must have dtype in \['torch.float8_e4m3fn'\]"):
        grouped_gemm_fp8(a.float(), a_scale, b, b_scale, offsets)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(10, 3\) \(one scale per 1 x 128 tile"):
        grouped_gemm_fp8(a, a_scale[:, :2], b, b_scale, offsets)
    with pytest.raises(ValueError, match=r"b_scale must have shape \(2, 1, 3\) \(one scale per 128 x 128 block"):
        grouped_gemm_fp8(a, a_scale, b, b_scale.repeat(1, 2, 1), offsets)
    with pytest.raises(TypeError, match=r"b_scale must have dtype in \['torch.float32'\]"):
        grouped_gemm_fp8(a, a_scale, b, b_scale.double(), offsets)
    with pytest.raises(ValueError, match=r"b must be contiguous along K"):
        grouped_gemm_fp8(a, a_scale, b.transpose(1, 2).contiguous().transpose(1, 2), b_scale, offsets)
    with pytest.raises(ValueError, match=r"expert_offsets must have shape \(3,\)"):
        grouped_gemm_fp8(a, a_scale, b, b_scale, offsets[:2])
    with pytest.raises(TypeError, match=r"out_dtype must be one of"):
        grouped_gemm_fp8(a, a_scale, b, b_scale, offsets, out_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"quantize_rows_triton's block scheme takes block_size 128, got 64"):
        quantize_rows_triton(torch.randn(3, 8, device=dev), "block", block_size=64)
    with pytest.raises(ValueError, match=r"scheme must be one of \('block', 'row'\), got 'tensor'"):
        quantize_rows_triton(torch.randn(3, 8, device=dev), "tensor")
