"""The fast paths wait for nothing between routing and output: a whole MoE forward (router logits,
routing, permute, experts, unpermute) is captured in a CUDA graph and replayed on fresh inputs."""

import pytest
import torch

from moekit import EXPERT_BACKENDS, ROUTERS, MoEConfig, make_problem, route
from moekit.reference import reference_experts
from moekit.testing import assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("router", ["topk_softmax", "grouped_topk", "fused_select"])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton_grouped"])
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
