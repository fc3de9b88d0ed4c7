"""The fast paths wait for nothing between routing and output: a whole MoE forward (router logits,
routing, permute, experts, unpermute) is captured in a CUDA graph and replayed on fresh inputs."""

import dataclasses

import pytest
import torch

from moekit import EXPERT_BACKENDS, ROUTERS, MoEConfig, make_problem, route
from moekit.experts.cuda_graph import LARGE_EXPERT_BATCH, best_eager_path
from moekit.experts.grouped_mm_fused import grouped_mm_fused
from moekit.experts.triton_grouped import triton_grouped
from moekit.layer import MoELayer
from moekit.reference import reference_experts
from moekit.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu

SYNC_FREE_BACKENDS = ["grouped_mm", "grouped_mm_fused", "triton_grouped"]


@pytest.mark.parametrize("router", ["topk_softmax", "grouped_topk", "fused_select"])
@pytest.mark.parametrize("backend", SYNC_FREE_BACKENDS)
def test_whole_forward_replays_like_eager(backend, router):
    if router not in ROUTERS:
        pytest.skip(f"router {router} is not registered")
    device = torch.device("cuda")
    config = MoEConfig(
        hidden_size=256,
        ffn_size=384,
        num_experts=16,
        top_k=4,
        router=router,
        n_group=4,
        topk_group=2,
        dtype=torch.bfloat16,
    )
    problem = make_problem(config, 200, seed=1, device=device)
    impl = EXPERT_BACKENDS.get(backend)
    bias = problem.weights.score_correction_bias
    x_static = problem.x.clone()

    def forward():
        logits = x_static.float() @ problem.weights.router_weight.T
        routing = route(logits, config, bias, check_values=False)
        return impl.fn(x_static, routing.topk_ids, routing.topk_weights, problem.weights)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = forward()

    for seed in (2, 3):  # fresh tokens: a different routing each time
        x = make_problem(config, 200, seed=seed, device=device).x
        x_static.copy_(x)
        y_static.fill_(float("nan"))
        graph.replay()
        eager = forward()
        assert torch.equal(y_static, eager), "replay differs from eager"
        routing = route(x.float() @ problem.weights.router_weight.T, config, bias)
        ref = reference_experts(x, routing.topk_ids, routing.topk_weights, problem.weights)
        assert_close_to_reference(y_static, ref, torch.bfloat16, f"{backend} replay")


@pytest.mark.parametrize("backend", SYNC_FREE_BACKENDS)
def test_layer_without_value_checks_never_waits_for_the_device(backend):
    """MoELayer(check_values=False): router, routed experts and shared expert with CUDA's sync debug mode set
    to raise on any host synchronisation, then captured whole in a CUDA graph and replayed like eager."""
    device = torch.device("cuda")
    config = MoEConfig(
        hidden_size=256, ffn_size=384, num_experts=16, top_k=4, num_shared_experts=1, dtype=torch.bfloat16
    )
    layer = MoELayer(config, backend=backend, device=device, check_values=False)
    x_static = make_problem(config, 300, seed=4, device=device).x
    layer(x_static)  # compile and autotune first: those wait for the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = layer(x_static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = layer(x_static)
    y_static.fill_(float("nan"))
    graph.replay()
    assert torch.equal(y_static, eager), "replay differs from eager"


@pytest.mark.parametrize("rows_per_expert", [LARGE_EXPERT_BATCH // 4, LARGE_EXPERT_BATCH + 44])
def test_cuda_graph_backend_on_either_eager_path(rows_per_expert):
    """Both paths the cuda_graph backend captures (by rows per expert) replay to the oracle."""
    device = torch.device("cuda")
    config = MoEConfig(hidden_size=128, ffn_size=96, num_experts=4, top_k=2, dtype=torch.bfloat16)
    tokens = rows_per_expert * config.num_experts // config.top_k
    problem = make_problem(config, tokens, seed=6, device=device)
    routing = route(problem.router_logits(), config)
    expected_path = grouped_mm_fused if rows_per_expert >= LARGE_EXPERT_BATCH else triton_grouped
    assert best_eager_path(problem.x, config.top_k, problem.weights) is expected_path
    ref = reference_experts(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
    for _ in range(2):  # capture, then a replay of the cached graph
        y = EXPERT_BACKENDS.get("cuda_graph").fn(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
        assert_close_to_reference(y, ref, torch.bfloat16, f"cuda_graph at {rows_per_expert} rows per expert")


def test_cuda_graph_backend_never_replays_a_graph_of_other_weight_shapes():
    """Two weight sets at the same addresses with other shapes (views of one buffer, as a freed weight's memory
    is reused by the next): the second call captures its own graph instead of replaying the first's."""
    device = torch.device("cuda")
    gate_up_memory = torch.empty(4 * 2 * 64 * 128, dtype=torch.bfloat16, device=device)
    down_memory = torch.empty(4 * 128 * 64, dtype=torch.bfloat16, device=device)
    for ffn_size in (48, 64):
        config = MoEConfig(hidden_size=128, ffn_size=ffn_size, num_experts=4, top_k=2, dtype=torch.bfloat16)
        problem = make_problem(config, 40, seed=ffn_size, device=device)
        w = problem.weights
        w_gate_up = gate_up_memory[: w.w_gate_up.numel()].view(w.w_gate_up.shape).copy_(w.w_gate_up)
        w_down = down_memory[: w.w_down.numel()].view(w.w_down.shape).copy_(w.w_down)
        weights = dataclasses.replace(w, w_gate_up=w_gate_up, w_down=w_down)
        routing = route(problem.router_logits(), config)
        y = EXPERT_BACKENDS.get("cuda_graph").fn(problem.x, routing.topk_ids, routing.topk_weights, weights)
        ref = reference_experts(problem.x, routing.topk_ids, routing.topk_weights, weights)
        assert_close_to_reference(y, ref, torch.bfloat16, f"cuda_graph with F={ffn_size} at reused addresses")
