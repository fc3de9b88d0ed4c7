"""FP8 expert parallelism (issue #22) on gloo ranks: dispatch_quantized sends e4m3 rows and float32 scales, the
local experts run on them, combine stays in the dispatcher's dtype.

One spawn per world size runs every check on every rank and returns what each rank saw; the tests compare it
with single-process computations here:
  - layout: the QuantizedRows each rank received are, bit for bit, quantize_rows of the rows it should receive
    (who-should-receive-what computed here, in the documented order: local expert, source rank, source token),
    with the metadata and handle of the unquantized dispatch, and combine in the dispatcher's dtype; a rank with
    no tokens, ranks that receive none (every token on expert 0) and K = E among the cases;
  - the wire: during an FP8 layer forward the dispatch sends uint8 rows and float32 scales, combine its dtype;
  - the layer: MoELayer(quantization=..., dispatcher="nccl") against the single-process FP8 recipe
    (reference_experts_fp8 + the shared experts, the kernels' own error) and against the float64 oracle on the
    original weights (TOLERANCE[float8_e4m3fn]); chunks and shared_overlap change nothing;
  - argument errors, raised before any communication.
The layer's Triton kernels run on the CPU under TRITON_INTERPRET=1 (the ranks inherit it); without it those tests
skip and the layout ones still run.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moekit import MoEConfig, MoELayer, make_problem, quantize_weights, route
from moekit.ep import DISPATCHERS
from moekit.kernels.availability import fp8_triton_support
from moekit.quantize import BLOCK_SIZE, SCHEMES, QuantizedRows, quantize_rows
from moekit.reference import reference_experts_fp8, reference_moe, reference_shared_experts
from moekit.testing import assert_close_to_reference
from moekit.testing.fp8_cases import activation_margin, requantization_flip_error, with_spread_blocks
from moekit.testing.numerics import fp8_kernel_tolerance
from moekit.testing.spawn import spawn_ranks
from moekit.weights import router_logits

WORLD_SIZES = (1, 2, 4)
F32, BF16 = torch.float32, torch.bfloat16
H = BLOCK_SIZE + 16  # two tiles per row, the second partial
MAX_TOKENS = 24
UNEVEN = {1: [11], 2: [13, 0], 4: [5, 0, 9, 16]}  # a rank without tokens from 2 ranks on
SEED = 20250322
LAYER_RUNS = fp8_triton_support(torch.device("cpu"), F32)[0]
NEEDS_TRITON = pytest.mark.skipif(not LAYER_RUNS, reason=fp8_triton_support(torch.device("cpu"), F32)[1])


# ---- layout problems -----------------------------------------------------------------------------------


def layout_cases(world_size: int) -> list[tuple[str, list[int], int, int]]:
    """(name, tokens_per_rank, num_experts, top_k)."""
    W = world_size
    return [
        ("uneven", UNEVEN[W], 3 * W, 2),
        ("every-token-on-expert-0", [7] * W, 2 * W, 1),  # ranks 1.. receive nothing
        ("k-equals-e", [4] * W, 2 * W, 2 * W),  # every token to every rank's every expert
    ]


def layout_problem(case, dtype: torch.dtype):
    """x [N, H] in dtype (rows and tiles of spread magnitude: a scale from the wrong row or tile fails),
    topk_ids [N, K] int32 distinct per token, topk_weights [N, K] float32, for all ranks' tokens."""
    name, tokens, num_experts, top_k = case
    g = torch.Generator().manual_seed(SEED + len(name) + 7 * top_k)
    N = sum(tokens)
    x = torch.randn(N, H, generator=g) * torch.exp(torch.randn(N, 1, generator=g))
    x[:, BLOCK_SIZE:] *= 16.0
    ids = torch.rand(N, num_experts, generator=g).argsort(dim=1)[:, :top_k].to(torch.int32)
    if name == "every-token-on-expert-0":
        ids.zero_()
    weights = torch.rand(N, top_k, generator=g) + 0.1
    return x.to(dtype), ids, weights


def rank_slice(tokens: list[int], rank: int) -> slice:
    start = sum(tokens[:rank])
    return slice(start, start + tokens[rank])


def run_layout(rank: int, world_size: int, case, dtype: torch.dtype, scheme: str) -> dict:
    """This rank's FP8 dispatch of the case, the unquantized one beside it, and combine of both handles."""
    tokens, num_experts = case[1], case[2]
    x, ids, w = (t[rank_slice(tokens, rank)] for t in layout_problem(case, dtype))
    dispatcher = DISPATCHERS.get("nccl").fn(None, num_experts, H, MAX_TOKENS, dtype, "cpu")
    rows, meta, handle = dispatcher.dispatch_quantized(x, ids, w, scheme)
    plain_x, plain_meta, plain_handle = dispatcher.dispatch(x, ids, w)
    expert_out = rows.dequantize(dtype) * 0.5  # anything in the dispatcher's dtype, one row per received row
    return {
        "rows": rows,
        "meta": meta,
        "plain_meta": plain_meta,
        "plain_x": plain_x,
        "y": dispatcher.combine(expert_out, handle),
        "plain_y": dispatcher.combine(expert_out, plain_handle),
        "handles_agree": all(
            torch.equal(getattr(handle, f), getattr(plain_handle, f))
            for f in ("send_counts", "recv_counts", "send_token_idx", "send_slots", "recv_slot_of_row", "row_weight")
        ),
    }


# ---- the layer ------------------------------------------------------------------------------------------


def layer_cases(world_size: int) -> list[tuple[str, MoEConfig, list[int], int, float]]:
    """(name, config, tokens_per_rank, skew_experts, skew_amount)."""
    W = world_size
    shared = MoEConfig(H, 48, 2 * W, 2, num_shared_experts=1, shared_ffn_size=32, dtype=F32)
    plain = MoEConfig(H, 48, 2 * W, 1, dtype=F32)
    return [("uneven-shared", shared, UNEVEN[W], 0, 0.0), ("every-token-on-expert-0", plain, [6] * W, 1, 60.0)]


def layer_problem(case):
    """The problem (x of every rank's tokens) and its routed experts' weights with spread blocks."""
    _, config, tokens, skew_experts, skew_amount = case
    problem = make_problem(config, sum(tokens), seed=SEED, skew_experts=skew_experts, skew_amount=skew_amount)
    return problem, with_spread_blocks(problem.weights, seed=3)


class WireLog:
    """Records the dtype and shape of every tensor dist.all_to_all_single sends while active."""

    def __init__(self) -> None:
        self.sent: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __enter__(self):
        self.original = torch.distributed.all_to_all_single

        def logged(output, input, *args, **kwargs):
            self.sent.append((input.dtype, tuple(input.shape)))
            return self.original(output, input, *args, **kwargs)

        torch.distributed.all_to_all_single = logged
        return self

    def __exit__(self, *exc) -> None:
        torch.distributed.all_to_all_single = self.original


def run_layers(rank: int, world_size: int) -> dict:
    out = {}
    for case in layer_cases(world_size):
        name, config, tokens = case[0], case[1], case[2]
        problem, weights = layer_problem(case)
        x = problem.x[rank_slice(tokens, rank)]
        for scheme in SCHEMES:
            layer = MoELayer(config, weights=weights, quantization=scheme, dispatcher="nccl", max_tokens=MAX_TOKENS)
            with WireLog() as log:
                out[name, scheme] = layer(x)
            out[name, scheme, "wire"] = log.sent
        overlapped = MoELayer(
            config, weights=weights, quantization="block", dispatcher="nccl", max_tokens=MAX_TOKENS,
            shared_overlap=True, chunks=2,
        )  # fmt: skip
        out[name, "overlapped"] = overlapped(x)
    return out


# ---- the rank function ----------------------------------------------------------------------------------


def caught(fn, *args) -> str:
    try:
        fn(*args)
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def rank_main(rank: int, world_size: int, with_layer: bool) -> dict:
    nccl = DISPATCHERS.get("nccl").fn(None, 2 * world_size, H, MAX_TOKENS, F32, "cpu")
    x, ids, w = torch.randn(3, H), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)
    # every rank makes the mistake: every rank raises before any collective, and the ones below still pair up
    errors = {"scheme": caught(nccl.dispatch_quantized, x, ids, w, "int8")}
    layouts = {
        (case[0], dtype, scheme): run_layout(rank, world_size, case, dtype, scheme)
        for case in layout_cases(world_size)
        for dtype in (F32, BF16)
        for scheme in SCHEMES
    }
    return {"errors": errors, "layouts": layouts, "layers": run_layers(rank, world_size) if with_layer else None}


@functools.cache
def world(world_size: int) -> list[dict]:
    return spawn_ranks(rank_main, world_size, LAYER_RUNS, timeout_s=240)


# ---- who should receive what --------------------------------------------------------------------------


def expected_receipt(case, dtype: torch.dtype, scheme: str, rank: int, world_size: int) -> dict:
    """The rows rank should receive, grouped by local expert, then source rank, then source token, quantized
    here on their own; with their counts, sources and router weights."""
    tokens, num_experts = case[1], case[2]
    x, ids, w = layout_problem(case, dtype)
    E_local = num_experts // world_size
    rows, src_rank, src_token, weight, counts = [], [], [], [], []
    for e in range(E_local):
        expert = rank * E_local + e
        before = len(rows)
        for q in range(world_size):
            for t in range(tokens[q]):
                token = rank_slice(tokens, q).start + t
                for k in torch.nonzero(ids[token] == expert).flatten().tolist():
                    rows.append(token), src_rank.append(q), src_token.append(t), weight.append(float(w[token, k]))
        counts.append(len(rows) - before)
    index = torch.tensor(rows, dtype=torch.int64)
    return {
        "rows": quantize_rows(x.index_select(0, index), scheme),
        "x": x.index_select(0, index),
        "src_rank": torch.tensor(src_rank, dtype=torch.int64),
        "src_token": torch.tensor(src_token, dtype=torch.int64),
        "weight": torch.tensor(weight, dtype=torch.float32),
        "counts": torch.tensor(counts, dtype=torch.int64),
    }


def assert_same_rows(got: QuantizedRows, expected: QuantizedRows, what: str) -> None:
    """Bit for bit: the e4m3 values (as bytes), the float32 scales, the scheme."""
    assert isinstance(got, QuantizedRows) and got.scheme == expected.scheme, what
    assert got.values.shape == expected.values.shape, f"{what}: {tuple(got.values.shape)}"
    assert torch.equal(got.values.view(torch.uint8), expected.values.view(torch.uint8)), f"{what}: values differ"
    assert torch.equal(got.scale, expected.scale), f"{what}: scales differ"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_received_fp8_rows_are_the_quantized_rows_each_rank_should_receive(world_size):
    results = world(world_size)
    for case in layout_cases(world_size):
        for dtype in (F32, BF16):
            for scheme in SCHEMES:
                for rank, result in enumerate(results):
                    got = result["layouts"][case[0], dtype, scheme]
                    what = f"{world_size} ranks, {case[0]}, {dtype}, {scheme}, rank {rank}"
                    expected = expected_receipt(case, dtype, scheme, rank, world_size)
                    assert_same_rows(got["rows"], expected["rows"], what)
                    assert torch.equal(got["plain_x"], expected["x"]), f"{what}: the unquantized rows"
                    meta = got["meta"]
                    assert torch.equal(meta.local_expert_counts, expected["counts"]), what
                    assert torch.equal(meta.src_rank, expected["src_rank"]), what
                    assert torch.equal(meta.src_token, expected["src_token"]), what
                    assert torch.equal(meta.weight, expected["weight"]), what
                    for field in ("local_expert_offsets", "src_rank", "src_token", "weight"):
                        assert torch.equal(getattr(meta, field), getattr(got["plain_meta"], field)), what
                    assert got["handles_agree"], f"{what}: the handle differs from the unquantized dispatch's"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_combine_after_an_fp8_dispatch_stays_in_the_dispatchers_dtype(world_size):
    """expert_out = half the dequantized rows: y = sum_k w_k * dequantized x / 2, summed in float32."""
    results = world(world_size)
    for case in layout_cases(world_size):
        tokens = case[1]
        for dtype in (F32, BF16):
            x, ids, w = layout_problem(case, dtype)
            for scheme in SCHEMES:
                deq = quantize_rows(x, scheme).dequantize(dtype).double()
                expected = 0.5 * deq * w.double().sum(1, keepdim=True)  # each token's K rows are its own row
                y = torch.cat([r["layouts"][case[0], dtype, scheme]["y"] for r in results])
                plain = torch.cat([r["layouts"][case[0], dtype, scheme]["plain_y"] for r in results])
                what = f"{world_size} ranks, {case[0]}, {dtype}, {scheme}"
                assert y.dtype == dtype and y.shape == (sum(tokens), H), what
                assert torch.equal(y, plain), f"{what}: combine on the FP8 handle differs"
                assert_close_to_reference(y, expected, dtype, what)


def test_unknown_scheme_raises_on_every_rank_before_any_communication():
    for rank, result in enumerate(world(2)):
        message = result["errors"]["scheme"]
        assert "ValueError: scheme must be one of ('block', 'row') for an FP8 dispatch on 'nccl', got 'int8'" in (
            message
        ), f"rank {rank}: {message}"


# ---- the layer against the FP8 recipe and the oracle ----------------------------------------------------


def per_rank_routing(case, problem, weights, world_size: int):
    """Each rank's tokens routed on their own, as its layer routes them, concatenated."""
    tokens, config = case[2], case[1]
    ids, w = [], []
    for q in range(world_size):
        x = problem.x[rank_slice(tokens, q)]
        routing = route(router_logits(x, weights), config, weights.score_correction_bias)
        ids.append(routing.topk_ids), w.append(routing.topk_weights)
    return torch.cat(ids), torch.cat(w)


def assert_fp8_layers_match(layers: list[dict], world_size: int, device: torch.device) -> None:
    """Each rank's FP8 layer outputs (run_layers' dict per rank), concatenated, against the single-process FP8
    recipe (the kernels' own error, activations re-quantized to a neighbour) and the float64 oracle."""
    for case in layer_cases(world_size):
        problem, weights = layer_problem(case)
        ids, w = per_rank_routing(case, problem, weights, world_size)
        if case[0] == "every-token-on-expert-0":
            assert bool((ids == 0).all()), "the skew must put every token on expert 0"
        exact = reference_moe(problem.x, weights, case[1]).y
        for scheme in SCHEMES:
            q = quantize_weights(weights, scheme)
            y = torch.cat([r[case[0], scheme] for r in layers])
            what = f"{world_size} ranks, {case[0]}, {scheme}"
            assert y.dtype == F32 and y.shape == problem.x.shape, what
            recipe = reference_experts_fp8(problem.x, ids, w, q) + reference_shared_experts(problem.x, weights)
            flips = requantization_flip_error(problem.x, ids, w, q, activation_margin(device, scheme, F32))
            fast = scheme == "row" and device.type == "cuda"  # the interpreter adds exactly
            tolerance = fp8_kernel_tolerance(F32, fast_accumulation=fast) + 3 * flips
            assert_close_to_reference(y, recipe, F32, f"{what} vs the FP8 recipe", tolerance)
            assert_close_to_reference(y, exact, torch.float8_e4m3fn, f"{what} vs the float64 oracle")


@NEEDS_TRITON
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fp8_layer_matches_the_fp8_recipe_and_the_oracle(world_size):
    results = world(world_size)
    assert_fp8_layers_match([r["layers"] for r in results], world_size, torch.device("cpu"))
    for case in layer_cases(world_size):
        overlapped = torch.cat([r["layers"][case[0], "overlapped"] for r in results])
        sync = torch.cat([r["layers"][case[0], "block"] for r in results])
        torch.testing.assert_close(overlapped, sync, rtol=1e-6, atol=1e-6, msg=f"{case[0]}: chunks + shared_overlap")


def run_layers_sharing_a_gpu(rank: int, world_size: int) -> dict:
    """run_layers' FP8 layers on cuda:0, every rank's process on the same GPU (gloo carries the exchanges)."""
    torch.cuda.set_device(0)
    out = {}
    for case in layer_cases(world_size):
        name, config, tokens = case[0], case[1], case[2]
        problem, weights = layer_problem(case)
        weights = weights.to("cuda")
        x = problem.x[rank_slice(tokens, rank)].cuda()
        for scheme in SCHEMES:
            layer = MoELayer(config, weights=weights, quantization=scheme, dispatcher="nccl", max_tokens=MAX_TOKENS,
                             device="cuda")  # fmt: skip
            out[name, scheme] = layer(x).cpu()
    return out


@pytest.mark.gpu
def test_fp8_layer_on_ranks_sharing_a_gpu_matches_the_fp8_recipe_and_the_oracle():
    """The compiled FP8 kernels and the FP8 dispatch on 2 ranks sharing one GPU (NCCL refuses that; gloo)."""
    ok, reason = fp8_triton_support(torch.device("cuda"), F32)
    if not ok:
        pytest.skip(reason)
    layers = spawn_ranks(run_layers_sharing_a_gpu, 2, backend="gloo", timeout_s=240)
    assert_fp8_layers_match(layers, 2, torch.device("cuda"))


@NEEDS_TRITON
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_fp8_layer_sends_e4m3_bytes_and_float32_scales_and_combines_in_its_dtype(world_size):
    """Per layer forward: counts (int64), rows as uint8 [S, H], metadata (int64), scales float32 [S, tiles],
    then combine's float32 [N, H]: no float32 row of H goes out in the dispatch."""
    for rank, result in enumerate(world(world_size)):
        for case in layer_cases(world_size):
            for scheme in SCHEMES:
                sent = result["layers"][case[0], scheme, "wire"]
                dtypes = [dtype for dtype, _ in sent]
                assert dtypes == [torch.int64, torch.uint8, torch.int64, torch.float32, F32], f"rank {rank}: {sent}"
                (_, counts), (_, rows), (_, meta), (_, scale), (_, back) = sent
                tiles = 2 if scheme == "block" else 1
                assert counts == (world_size,) and rows[1] == H and meta[0] == rows[0], f"rank {rank}: {sent}"
                assert scale == (rows[0], tiles) and back[1] == H, f"rank {rank}, {scheme}: {sent}"


# ---- argument errors (one rank, no process group) -------------------------------------------------------


@pytest.mark.parametrize("path", ["padded", "symmetric"])
def test_a_dispatcher_that_cannot_send_fp8_says_so_and_names_the_ones_that_can(path):
    dispatcher = DISPATCHERS.get(path).fn(None, 4, H, MAX_TOKENS, F32, "cpu")
    x, ids, w = torch.randn(5, H), torch.randint(0, 4, (5, 1), dtype=torch.int32), torch.rand(5, 1)
    with pytest.raises(ValueError, match=rf"dispatcher '{path}' cannot send FP8 rows; the ones that can: \['nccl', "):
        dispatcher.dispatch_quantized(x, ids, w, "block")
    config = MoEConfig(H, 32, 4, 1, dtype=F32)
    with pytest.raises(ValueError, match=rf"dispatcher '{path}' cannot send FP8 rows, which FP8 expert parallelism"):
        MoELayer(config, quantization="block", dispatcher=path)


def test_fp8_layer_refuses_backends_and_options_it_cannot_run():
    config = MoEConfig(H, 32, 4, 1, dtype=F32)
    with pytest.raises(ValueError, match=r"'scaled_grouped_mm' has none, \['triton_grouped_fp8'\] do"):
        MoELayer(config, quantization="row", backend="scaled_grouped_mm", dispatcher="nccl")
    with pytest.raises(ValueError, match=r"own_first and fused_combine are not built for FP8 expert parallelism"):
        MoELayer(config, quantization="row", dispatcher="nccl", own_first=True)
    nccl = DISPATCHERS.get("nccl").fn(None, 4, H, MAX_TOKENS, F32, "cpu")
    x, ids, w = torch.randn(5, H), torch.randint(0, 4, (5, 1), dtype=torch.int32), torch.rand(5, 1)
    with pytest.raises(ValueError, match=r"scheme must be one of \('block', 'row'\) for an FP8 dispatch on 'nccl'"):
        nccl.dispatch_quantized(x, ids, w, None)
    with pytest.raises(TypeError, match=r"x must have the dispatcher's dtype torch.float32"):
        nccl.dispatch_quantized(x.half(), ids, w, "block")
