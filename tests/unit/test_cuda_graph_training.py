"""cuda_graph's captured training step against the eager path it captures (the oracle tests of every training
backend hold it to float64, test_expert_gradients.py): replays on fresh inputs, gradients accumulated over
replays, and the graph's buffers never overwritten while someone still holds them."""

import dataclasses

import pytest
import torch

from moekit import EXPERT_BACKENDS, MoEConfig, make_problem, route
from moekit.experts.cuda_graph import best_training_path, release_graphs
from moekit.experts.cuda_graph_training import training_graph_segments
from moekit.experts.grouped_mm_fused import grouped_mm_fused
from moekit.experts.triton_grouped import triton_grouped
from moekit.testing.numerics import relative_error

pytestmark = [
    pytest.mark.gpu,
    # a .grad accumulated on the capture's side stream races the caller's reads of it
    pytest.mark.filterwarnings("error:The AccumulateGrad node's stream"),
]

# the two paths cuda_graph trains on: small experts (grouped_mm_fused) and large ones (triton_grouped), bf16
SIZES = {"small experts": (128, 96, grouped_mm_fused), "large experts": (1024, 2304, triton_grouped)}
REPLAYED_LIKE_EAGER = 1e-3  # the same kernels on the same inputs: only the order of atomic adds may differ
NAMES = ("x", "topk_weights", "w_gate_up", "w_down")


def problem_and_leaves(sizes: str, seed: int = 1):
    hidden, ffn, path = SIZES[sizes]
    config = MoEConfig(hidden_size=hidden, ffn_size=ffn, num_experts=4, top_k=2, dtype=torch.bfloat16)
    problem = make_problem(config, 200, seed=seed, device="cuda")
    assert best_training_path(problem.x, problem.weights) is path
    w = problem.weights
    gate_up, down = (t.detach().clone().requires_grad_() for t in (w.w_gate_up, w.w_down))
    return problem, dataclasses.replace(w, w_gate_up=gate_up, w_down=down), path


def inputs(problem, seed: int):
    """Fresh tokens and their routing (x, topk_ids, topk_weights, dy), x and topk_weights requiring grad."""
    fresh = make_problem(problem.config, problem.num_tokens, seed=seed, device="cuda")
    routing = route(fresh.router_logits(), problem.config)
    dy = torch.randn(fresh.x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    x, topk_weights = (t.detach().clone().requires_grad_() for t in (fresh.x, routing.topk_weights))
    return x, routing.topk_ids, topk_weights, dy.to(fresh.x.dtype)


def step_gradients(fn, weights, x, topk_ids, topk_weights, dy, zero: bool = True):
    leaves = (x, topk_weights, weights.w_gate_up, weights.w_down)
    if zero:
        for leaf in leaves:
            leaf.grad = None
    y = fn(x, topk_ids, topk_weights, weights)
    y.backward(dy)
    return y, [leaf.grad.clone() for leaf in leaves]


def assert_replayed_like_eager(got, expected, what: str):
    for name, g, e in zip(NAMES, got, expected):
        err = relative_error(g, e)
        assert err <= REPLAYED_LIKE_EAGER, f"{what} d{name}: relative error {err:.2e} to the eager path"


@pytest.mark.parametrize("sizes", SIZES)
def test_replayed_steps_on_fresh_tokens_match_the_eager_path(sizes):
    problem, weights, path = problem_and_leaves(sizes)
    graphed = EXPERT_BACKENDS.get("cuda_graph").fn
    for seed in (2, 3, 4):  # the first call captures; each call replays on new tokens, routing and dy
        x, ids, topk_weights, dy = inputs(problem, seed)
        y, got = step_gradients(graphed, weights, x, ids, topk_weights, dy)
        x_eager, w_eager = (t.detach().clone().requires_grad_() for t in (x, topk_weights))
        y_eager, expected = step_gradients(path, weights, x_eager, ids, w_eager, dy)
        assert relative_error(y, y_eager) <= REPLAYED_LIKE_EAGER, f"{sizes} forward, tokens {seed}"
        assert_replayed_like_eager(got, expected, f"{sizes}, tokens {seed}")
    assert training_graph_segments(), "the captured step's pool holds its activations"
    release_graphs()


@pytest.mark.parametrize("sizes", SIZES)
def test_gradients_accumulate_over_replays(sizes):
    """Two steps without zeroing: each .grad is the sum of the two steps' gradients. torch.cuda.
    make_graphed_callables gives twice the second (the first .grad is its static buffer, overwritten); a .grad
    left on the buffer until the backward came out wrong for small experts, whose forward graph reuses the
    buffer's memory for its temporaries."""
    problem, weights, path = problem_and_leaves(sizes)
    graphed = EXPERT_BACKENDS.get("cuda_graph").fn
    first, second = inputs(problem, 2), inputs(problem, 3)
    step_gradients(graphed, weights, *first)
    _, accumulated = step_gradients(graphed, weights, *second, zero=False)
    _, eager_first = step_gradients(path, weights, *first)
    _, eager_second = step_gradients(path, weights, *second)
    # x and topk_weights are fresh leaves per step: only the weights accumulate
    expected = [eager_second[0], eager_second[1], eager_first[2] + eager_second[2], eager_first[3] + eager_second[3]]
    assert_replayed_like_eager(accumulated, expected, f"{sizes} accumulated")
    release_graphs()


def test_a_second_backward_of_one_replay_accumulates():
    """The captured backward frees the activations: a second one replays the forward again first."""
    problem, weights, path = problem_and_leaves("small experts")
    x, ids, topk_weights, dy = inputs(problem, 2)
    y = EXPERT_BACKENDS.get("cuda_graph").fn(x, ids, topk_weights, weights)
    y.backward(dy, retain_graph=True)
    once = weights.w_down.grad.clone()
    y.backward(dy)
    assert relative_error(weights.w_down.grad, 2 * once) <= REPLAYED_LIKE_EAGER
    release_graphs()


def test_a_kept_weight_gradient_raises_rather_than_being_overwritten():
    problem, weights, _ = problem_and_leaves("small experts")
    graphed = EXPERT_BACKENDS.get("cuda_graph").fn
    step_gradients(graphed, weights, *inputs(problem, 2))
    kept = weights.w_gate_up.grad  # the graph's buffer, kept past zero_grad
    value = kept.clone()
    x, ids, topk_weights, _ = inputs(problem, 3)
    for leaf in (weights.w_gate_up, weights.w_down):
        leaf.grad = None
    with pytest.raises(RuntimeError, match="w_gate_up gradient of the last backward is still held"):
        graphed(x, ids, topk_weights, weights)  # the forward graph may reuse the buffer's memory
    assert torch.equal(kept, value), "the kept gradient was overwritten"
    release_graphs()


def test_a_backward_after_the_weights_changed_in_place_raises():
    problem, weights, _ = problem_and_leaves("small experts")
    x, ids, topk_weights, dy = inputs(problem, 2)
    y = EXPERT_BACKENDS.get("cuda_graph").fn(x, ids, topk_weights, weights)
    with torch.no_grad():
        weights.w_down.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified in place between this forward and its backward"):
        y.backward(dy)
    release_graphs()


def test_a_backward_after_a_later_forward_of_the_same_graph_raises():
    problem, weights, path = problem_and_leaves("small experts")
    graphed = EXPERT_BACKENDS.get("cuda_graph").fn
    first, second = inputs(problem, 2), inputs(problem, 3)
    y_first = graphed(*first[:3], weights)
    y_second = graphed(*second[:3], weights)
    with pytest.raises(RuntimeError, match="replayed over by a later forward"):
        y_first.backward(first[3])
    y_second.backward(second[3])
    x_eager = second[0].detach().clone().requires_grad_()
    _, expected = step_gradients(path, weights, x_eager, second[1], second[2].detach().clone().requires_grad_(),
                                 second[3])  # fmt: skip
    assert relative_error(second[0].grad, expected[0]) <= REPLAYED_LIKE_EAGER
    release_graphs()
