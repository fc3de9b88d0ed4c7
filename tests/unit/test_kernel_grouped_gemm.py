"""grouped_gemm (Triton) against a float64 per-expert loop: plain and SwiGLU, with and without row scales."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.kernels.availability import KERNEL_DTYPES
from moekit.kernels.grouped_gemm import grouped_gemm
from moekit.testing import assert_close_to_reference
from moekit.testing.strategies import expert_row_counts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def dev(triton_device):
    """The device, or conftest's triton_device skip (checked in float32; these tests loop over dtypes_for)."""
    return triton_device


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    # the interpreter computes bfloat16 wrongly, so bf16 is checked where the kernel is compiled
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def make_inputs(device, dtype, counts, pad, K, N, *, seed, offsets_dtype=torch.int32, a_layout="row"):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    M = sum(counts) + pad
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()], dtype=offsets_dtype)
    # unit-variance operands keep fp16 results well inside its range at these sizes (K <= 48)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(E, N, K, generator=g).to(dtype)
    if a_layout == "column":
        a = a.t().contiguous().t()  # same values, stride (1, M): K is not the contiguous dimension
    scale = torch.rand(M, generator=g) + 0.5
    return a.to(device), b.to(device), offsets.to(device), scale.to(device)


def reference(a, b, offsets, *, swiglu, row_scale):
    """float64 per-expert loop over rows [0, offsets[E]) -> [offsets[E], N or F]."""
    bounds = offsets.cpu().tolist()
    pieces = []
    for e in range(b.shape[0]):
        y = a[bounds[e] : bounds[e + 1]].double().cpu() @ b[e].double().cpu().T
        if swiglu:
            gate, up = y.chunk(2, dim=1)
            y = F.silu(gate) * up
        pieces.append(y)
    ref = torch.cat(pieces)
    if row_scale is not None:
        ref = ref * row_scale[: bounds[-1]].double().cpu()[:, None]
    return ref


def check(dev, dtype, counts, pad, K, n, *, swiglu, scale, out_kind, seed=0, offsets_dtype=torch.int32, a_layout="row"):
    """Run grouped_gemm once and compare rows below offsets[E]; n is N, or F with swiglu."""
    N = 2 * n if swiglu else n
    a, b, offsets, row_scale = make_inputs(
        dev, dtype, counts, pad, K, N, seed=seed, offsets_dtype=offsets_dtype, a_layout=a_layout
    )
    row_scale = row_scale if scale else None
    M, valid = a.shape[0], sum(counts)
    given_out = None
    if out_kind == "contiguous":
        given_out = torch.full((M, n), math.nan, dtype=dtype, device=dev)
    elif out_kind == "strided":  # a column window of a wider buffer: row stride n + 3
        given_out = torch.full((M, n + 3), math.nan, dtype=dtype, device=dev)[:, 1 : n + 1]
    out = grouped_gemm(a, b, offsets, swiglu=swiglu, row_scale=row_scale, out=given_out)

    assert out.shape == (M, n) and out.dtype == dtype and out.device == a.device
    if given_out is not None:
        assert out is given_out
        assert bool(torch.isnan(out[valid:]).all()), "padding rows past offsets[E] were written"
    assert bool(torch.isfinite(out[:valid]).all()), "a row below offsets[E] was not written"
    ref = reference(a, b, offsets, swiglu=swiglu, row_scale=row_scale)
    assert_close_to_reference(out[:valid], ref, dtype, f"grouped_gemm(swiglu={swiglu}, scale={scale}) {dtype}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # triton_device only skips
@given(data=st.data())
def test_grouped_gemm_matches_float64_loop(triton_device, dtype, data):
    """Drawn shapes in each kernel dtype; the dtype is a parameter, so a skip comes before Hypothesis runs."""
    check(
        triton_device,
        dtype,
        data.draw(expert_row_counts(), label="counts"),
        data.draw(st.integers(0, 3), label="pad"),
        data.draw(st.integers(1, 48), label="K"),
        data.draw(st.integers(1, 48), label="N or F"),
        swiglu=data.draw(st.booleans(), label="swiglu"),
        scale=data.draw(st.booleans(), label="scale"),
        out_kind=data.draw(st.sampled_from(["none", "contiguous", "strided"]), label="out"),
        seed=data.draw(st.integers(0, 2**31 - 1), label="seed"),
        offsets_dtype=data.draw(st.sampled_from([torch.int32, torch.int64]), label="offsets dtype"),
        a_layout=data.draw(st.sampled_from(["row", "column"]), label="a layout"),
    )


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tensor_descriptor_loads_give_the_pointer_loads_result(dev, monkeypatch, data):
    """The copy-engine path reads whole tiles (the next expert's rows, padding rows, the up rows past a gate tile,
    zeros past K) and stores only the tile's own rows and columns; the masked pointer loads read none of those.
    Both give the same output, bit for bit, and leave the padding rows of a given out as they were, even with NaN
    in the padding rows of a. The weight is read either along K (the forward's) or, as the transposed view of an
    [E, K, N] tensor, along N (the backward's input gradients: one expert per descriptor slice, so the K tail
    reads zeros, not the next expert's rows). The interpreter runs the descriptor path too."""
    import moekit.kernels.grouped_gemm as kernels

    dtype = data.draw(st.sampled_from(dtypes_for(dev)), label="dtype")
    counts, pad = data.draw(expert_row_counts(), label="counts"), data.draw(st.integers(0, 3), label="pad")
    sixteen_bytes = 16 // dtype.itemsize
    K = sixteen_bytes * data.draw(st.integers(1, 6), label="K / (16 bytes)")  # TMA's 16-byte rows
    along_n = data.draw(st.booleans(), label="weight rows along N")
    n, swiglu = data.draw(st.integers(1, 48), label="N or F"), data.draw(st.booleans(), label="swiglu")
    n = sixteen_bytes * -(-n // sixteen_bytes) if along_n else n
    a, b, offsets, row_scale = make_inputs(dev, dtype, counts, pad, K, 2 * n if swiglu else n, seed=0)
    if along_n:
        b = b.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride (K * N, 1, N)
    a[sum(counts) :] = math.nan
    row_scale = row_scale if data.draw(st.booleans(), label="scale") else None
    outs = {}
    for loads in (True, False):
        monkeypatch.setattr(kernels, "copy_engine_loads", lambda device, loads=loads: loads)
        assert kernels.tma_loads(a, b) or kernels.transposed_tma_loads(a, b) or not loads, "descriptors not taken"
        outs[loads] = torch.full((a.shape[0], n), math.nan, dtype=dtype, device=dev)
        grouped_gemm(a, b, offsets, swiglu=swiglu, row_scale=row_scale, out=outs[loads])
    valid = sum(counts)
    assert torch.equal(outs[True][:valid], outs[False][:valid])
    assert bool(torch.isnan(outs[True][valid:]).all()), "padding rows past offsets[E] were written"


@pytest.mark.parametrize(
    "counts, K, n",
    [
        ([5, 0, 17, 3], 7, 5),  # odd K and F, an empty expert in the middle
        ([0, 0, 40, 0], 16, 16),  # every row on one expert, block-aligned sizes
        ([33], 7, 33),  # E = 1
        ([0, 0, 0], 5, 3),  # no rows at all: nothing to write
        ([17, 1, 16, 40, 2, 39], 48, 48),  # more tiles than programs, several per program
        ([150, 3], 9, 40),  # 10 m-tiles of 16 rows: two swizzle groups of 8, the second one short
    ],
    ids=["odd-sizes", "one-expert", "E1", "all-empty", "many-tiles", "swizzle-groups"],
)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_grouped_gemm_edge_cases(dev, counts, K, n, swiglu):
    for dtype in dtypes_for(dev):
        check(dev, dtype, counts, 2, K, n, swiglu=swiglu, scale=True, out_kind="contiguous")


@pytest.mark.parametrize("given_out", [False, True])
def test_grouped_gemm_with_no_rows_returns_without_launching(dev, given_out):
    a = torch.empty(0, 8, device=dev)
    b = torch.randn(3, 6, 8, device=dev)
    offsets = torch.zeros(4, dtype=torch.int32, device=dev)
    out = torch.empty(0, 3, device=dev) if given_out else None
    result = grouped_gemm(a, b, offsets, swiglu=True, out=out)
    assert result.shape == (0, 3) and result.dtype == torch.float32
    if given_out:
        assert result is out


def _args(**changes):
    """Valid CPU arguments for M = 4, K = 8, E = 2, N = 6, with some replaced."""
    args = {
        "a": torch.randn(4, 8),
        "b": torch.randn(2, 6, 8),
        "expert_offsets": torch.tensor([0, 1, 4], dtype=torch.int32),
        "swiglu": False,
        "row_scale": None,
        "out": None,
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"a": [[1.0]]}, TypeError, "a must be a torch.Tensor"),
        ({"a": torch.randn(4, 8, 1)}, ValueError, r"a must be 2-D \(M, K\)"),
        ({"b": torch.randn(6, 8)}, ValueError, r"b must be 3-D \(E, N, K\)"),
        ({"a": torch.randn(4, 8, dtype=torch.float64)}, TypeError, "a must be float16, bfloat16 or float32"),
        ({"b": torch.randn(2, 6, 8, dtype=torch.float16)}, TypeError, "b must have a's dtype"),
        ({"b": torch.randn(2, 6, 7)}, ValueError, r"K = a.shape\[1\] = 8"),
        ({"expert_offsets": torch.tensor([0.0, 1.0, 4.0])}, TypeError, "expert_offsets must be int32 or int64"),
        ({"expert_offsets": torch.tensor([0, 4], dtype=torch.int32)}, ValueError, r"expert_offsets must have shape"),
        ({"swiglu": 1}, TypeError, "swiglu must be a bool"),
        ({"b": torch.randn(2, 5, 8), "swiglu": True}, ValueError, "N = 2F .* to be even, got N = 5"),
        ({"row_scale": torch.rand(3)}, ValueError, r"row_scale must have shape \(M,\) = \(4,\)"),
        ({"row_scale": torch.rand(4, dtype=torch.float64)}, TypeError, "row_scale must be float32"),
        ({"out": torch.empty(4, 6, dtype=torch.float16)}, TypeError, "out must have a's dtype"),
        ({"out": torch.empty(4, 6), "swiglu": True}, ValueError, r"out must have shape \(M, F\) = \(4, 3\)"),
        ({"out": torch.empty(4, 5)}, ValueError, r"out must have shape \(M, N\) = \(4, 6\)"),
        ({"out": torch.empty(4, 6, device="meta")}, ValueError, "out is on meta, a is on cpu"),
        ({"row_addresses": torch.zeros(3, dtype=torch.int64)}, ValueError, r"row_addresses must be int64 of shape"),
        ({"row_addresses": torch.zeros(4, dtype=torch.int32)}, ValueError, r"row_addresses must be int64 of shape"),
        ({"row_addresses": torch.zeros(4, dtype=torch.int64), "out": torch.empty(4, 6)}, ValueError, "not both"),
    ],
)
def test_grouped_gemm_rejects_bad_arguments(changes, error, match):
    args = _args(**changes)
    with pytest.raises(error, match=match):
        grouped_gemm(args.pop("a"), args.pop("b"), args.pop("expert_offsets"), **args)


@pytest.mark.skipif(INTERPRET, reason="under the interpreter CPU tensors are accepted")
def test_grouped_gemm_rejects_cpu_tensors_without_interpreter():
    args = _args()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        grouped_gemm(args.pop("a"), args.pop("b"), args.pop("expert_offsets"), **args)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need the compiled kernel")
def test_grouped_gemm_replays_in_a_cuda_graph_with_new_offsets():
    """No host sync: the call captures into a CUDA graph, and a replay follows offsets changed on the device."""
    dev = torch.device("cuda")
    counts, K, n = [7, 0, 30, 5], 40, 24
    a, b, offsets, row_scale = make_inputs(dev, torch.float16, counts, 3, K, 2 * n, seed=1)
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=dev)
    grouped_gemm(a, b, offsets, swiglu=True, row_scale=row_scale, out=out)  # autotunes (syncs) outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_gemm(a, b, offsets, swiglu=True, row_scale=row_scale, out=out)
    new_offsets = torch.tensor([0, 20, 21, 21, 42], dtype=offsets.dtype, device=dev)
    offsets.copy_(new_offsets)
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(a, b, new_offsets, swiglu=True, row_scale=row_scale)
    assert bool(torch.isnan(out[42:]).all())
    assert_close_to_reference(out[:42], ref, torch.float16, "grouped_gemm replayed in a CUDA graph")
