"""The whole MoE layer (router + routed experts + a shared expert) against the same layer on the naive
backend (on GPU: on grouped_mm, which never waits on the host), the dispatch + combine of every
expert-parallel path against the nccl path, on one rank (the packing and unpacking every path does around
its collectives), and the expert-parallel layer overlapped against synchronous (moekit bench ep's pair)."""

import pytest
import torch

from moekit import MoEConfig, make_problem, route
from moekit.bench.flops import routed_expert_flops
from moekit.ep import DISPATCHERS, ep_forward
from moekit.experts import EXPERT_BACKENDS
from moekit.layer import MoELayer

from sizes import DTYPE, EXPERT_SHAPE, EXPERT_TOKENS, GPU

pytestmark = pytest.mark.perf

CONFIG = MoEConfig(**EXPERT_SHAPE, num_shared_experts=1, router="softmax_topk", dtype=DTYPE)
REFERENCE = "grouped_mm" if GPU else "naive"
LAYER_BACKENDS = [b for b in ["grouped_mm", "grouped_mm_fused", "triton_grouped"] if b != REFERENCE]


@pytest.mark.benchmark(group="layer")
@pytest.mark.parametrize("backend", LAYER_BACKENDS)
def test_layer(backend, perf, perf_device):
    ok, reason = EXPERT_BACKENDS.get(backend).supports(perf_device, DTYPE)
    if not ok:
        pytest.skip(reason)
    problem = make_problem(CONFIG, EXPERT_TOKENS, seed=0, device=perf_device)
    # check_values=False: the hot path, with no NaN check waiting for the device
    fast = MoELayer(CONFIG, backend=backend, weights=problem.weights, device=perf_device, check_values=False)
    reference = MoELayer(CONFIG, backend=REFERENCE, weights=problem.weights, device=perf_device, check_values=False)
    flops = routed_expert_flops(EXPERT_TOKENS, CONFIG) * (CONFIG.top_k + 1) / CONFIG.top_k  # + the shared expert
    with torch.inference_mode():
        perf(lambda: fast(problem.x), lambda: reference(problem.x), reference_name=f"layer[{REFERENCE}]", flops=flops)


@pytest.mark.benchmark(group="dispatch")
@pytest.mark.parametrize("path", [n for n in DISPATCHERS.names() if n != "nccl"])
def test_dispatch_combine_on_one_rank(path, perf, perf_device):
    ok, reason = DISPATCHERS.get(path).fn.supports(1, perf_device.type)
    if not ok:
        pytest.skip(reason)
    problem = make_problem(CONFIG, EXPERT_TOKENS, seed=0, device=perf_device)
    routing = route(problem.router_logits(), CONFIG)
    H, T = CONFIG.hidden_size, EXPERT_TOKENS

    def round_trip(name: str):
        dispatcher = DISPATCHERS.get(name).fn(None, CONFIG.num_experts, H, T, DTYPE, perf_device)

        def run():
            recv_x, _, handle = dispatcher.dispatch(problem.x, routing.topk_ids, routing.topk_weights)
            return dispatcher.combine(recv_x, handle)

        return run

    rows_moved = 2 * T * CONFIG.top_k * H * problem.x.element_size()  # there and back, one row per pair
    # every path reads its split sizes or counts on the host
    perf(round_trip(path), round_trip("nccl"), reference_name="nccl", bytes_moved=rows_moved, host_bound=True)


EP_CASES = [("nccl", "grouped_mm_fused" if GPU else "grouped_mm"), ("nvshmem_triton_graph", "triton_grouped")]


@pytest.mark.benchmark(group="ep_layer")
@pytest.mark.parametrize(("path", "backend"), EP_CASES, ids=[path for path, _ in EP_CASES])
def test_ep_layer_overlapped(path, backend, perf, perf_device):
    """moekit bench ep's two layers on one rank: overlapped (the shared expert on a second stream, two token
    chunks in flight) against the synchronous layer on the same dispatcher, timed in the same run; a fixed-
    shape dispatcher's layers as CUDA-graph replays."""
    for ok, reason in (
        DISPATCHERS.get(path).fn.supports(1, perf_device.type),
        EXPERT_BACKENDS.get(backend).supports(perf_device, DTYPE),
    ):
        if not ok:
            pytest.skip(reason)
    problem = make_problem(CONFIG, EXPERT_TOKENS, seed=0, device=perf_device)
    dispatcher = DISPATCHERS.get(path).fn(
        None, CONFIG.num_experts, CONFIG.hidden_size, EXPERT_TOKENS, DTYPE, perf_device
    )

    def layer(chunks: int, overlap: bool):
        return lambda: ep_forward(
            problem.x, problem.weights, CONFIG, dispatcher, backend, chunks=chunks, shared_overlap=overlap,
            check_values=False,
        )  # fmt: skip

    flops = routed_expert_flops(EXPERT_TOKENS, CONFIG) * (CONFIG.top_k + 1) / CONFIG.top_k  # + the shared expert
    fixed = dispatcher.fixed_shapes
    with torch.inference_mode():
        perf(layer(2, True), layer(1, False), reference_name="ep_forward synchronous", flops=flops, graphs=fixed,
             host_bound=not fixed)  # fmt: skip
