"""Training step timings: forward + backward of the routed experts, or of the whole layer, per path, on one problem.

A path is an expert backend registered with trains=True, or the peer written here: torchtitan's MoE experts as
its users run them, torch._grouped_mm under autograd with an index gather of the tokens into expert order and an
index_add of the weighted rows back (`grouped_mm_peer`). One step: the expert forward on x, topk_weights and the
two weight tensors (all requiring grad), then backward of a fixed random dy; gradients are set to None between
steps, so each step allocates them as a training step does. FLOPs are three times the forward's (the two
gradients of every GEMM). Peak memory is measured on CUDA above what the step starts with (weights, x) and the
weight gradients it leaves behind: the activations and workspace a path keeps; for a captured step (cuda_graph)
also the memory its graphs' pool holds between steps, which is where its activations live. Beside the step, the path's
forward alone is timed twice, interleaved: with the graph recorded (what a training step pays before its
backward) and under no_grad (the inference forward), so a trainable path's forward overhead is a ratio. A step is
timed alone (synchronised: the host's launch latency up to its first kernels counts, as it does for a single
step) and queued, five steps back to back between two events (the rate of a training loop, whose host runs
ahead of the device: a step of many short kernels runs faster so, a step of long GEMMs at the same time).

Stage "experts" times the routed experts on the router's fixed top-k weights (leaves: x, topk_weights, the two
expert weights); stage "layer" the whole layer as MoELayer runs it, router logits -> routing -> routed experts
through the path -> + shared experts (leaves: x and every weight of the layer), its FLOPs three times
layer_flops' (the router's matmul left out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from moekit.bench.ceilings import Ceilings
from moekit.bench.flops import layer_flops, routed_expert_flops
from moekit.bench.timing import measure, measure_interleaved, measure_queued
from moekit.ep.forward import shared_experts
from moekit.experts import EXPERT_BACKENDS
from moekit.experts.cuda_graph import release_graphs
from moekit.experts.cuda_graph_training import training_graph_segments
from moekit.problem import MoEProblem
from moekit.routing import route
from moekit.validation import trusted_values
from moekit.weights import MoEWeights, router_logits

STAGES = ("experts", "layer")

PEER = "torchtitan_peer"


def grouped_mm_peer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H] as torchtitan computes its routed experts: sort the (token, slot) pairs by expert,
    gather the tokens, two torch._grouped_mm with SwiGLU between, weight the rows, index_add them back."""
    T, K = topk_ids.shape
    experts = topk_ids.reshape(-1)
    order = torch.argsort(experts, stable=True)
    token_of_row = order // K
    ends = torch.bincount(experts, minlength=weights.w_gate_up.shape[0]).cumsum(0).to(torch.int32)
    rows = x.index_select(0, token_of_row)
    gate, up = torch._grouped_mm(rows, weights.w_gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, weights.w_down.transpose(1, 2), offs=ends)
    out = out * topk_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add(0, token_of_row, out)


@dataclass(frozen=True)
class TrainTiming:
    """One path on one problem; ms is None when it did not run (status says why)."""

    path: str
    tokens: int
    status: str
    stage: str = "experts"
    ms: float | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None
    peak_activation_gb: float | None = None
    forward_ms: float | None = None  # the forward recording its graph
    inference_ms: float | None = None  # the same forward under no_grad
    queued_ms: float | None = None  # steps queued back to back (measure_queued): a training loop's rate
    queued_pct_of_matmul: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainStep:
    """The callables time_train_step times: step (forward + backward, gradients set to None first), forward
    (recording the graph), inference (the same forward under no_grad); leaves: the tensors that take gradients."""

    step: Callable[[], None]
    forward: Callable[[], torch.Tensor]
    inference: Callable[[], None]
    leaves: tuple[torch.Tensor, ...]


def path_support(path: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason): whether path (a training backend or PEER) runs a training step on device in dtype."""
    if path == PEER:
        return EXPERT_BACKENDS.get("grouped_mm").supports(device, dtype)  # the same op
    impl = EXPERT_BACKENDS.get(path)
    if not impl.trains:
        return False, f"{path} has no backward"
    return impl.supports(device, dtype)


def train_step(problem: MoEProblem, path: str, stage: str = "experts") -> TrainStep:
    """The training step of stage ("experts" or "layer") through path (a training backend or PEER) on problem."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    fn = grouped_mm_peer if path == PEER else EXPERT_BACKENDS.get(path).fn
    config, device = problem.config, problem.x.device
    routing = route(problem.router_logits(), config, problem.weights.score_correction_bias)
    x = problem.x.detach().clone().requires_grad_()
    trained = ["w_gate_up", "w_down"] + (["router_weight", "shared_gate_up", "shared_down"] if stage == "layer" else [])
    tensors = {name: getattr(problem.weights, name) for name in trained if getattr(problem.weights, name) is not None}
    tensors = {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}
    weights = replace(problem.weights, **tensors)
    topk_weights = routing.topk_weights.detach().clone().requires_grad_()
    dy = torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(1)).to(x.dtype)
    leaves = (x, *tensors.values()) + ((topk_weights,) if stage == "experts" else ())

    def forward():
        with trusted_values():
            if stage == "experts":
                return fn(x, routing.topk_ids, topk_weights, weights)
            step_routing = route(router_logits(x, weights), config, weights.score_correction_bias, check_values=False)
            y = fn(x, step_routing.topk_ids, step_routing.topk_weights, weights)
            shared = shared_experts(x, weights)
            return y if shared is None else y + shared

    def inference():
        with torch.no_grad():
            forward()

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(dy)

    return TrainStep(step, forward, inference, leaves)


def time_train_step(
    problem: MoEProblem, path: str, ceilings: Ceilings, *, runs: int = 10, stage: str = "experts"
) -> TrainTiming:
    """Median ms of forward + backward of stage ("experts" or "layer") through path (a training backend or PEER)."""
    device, T = problem.x.device, problem.num_tokens
    ok, reason = path_support(path, device, problem.x.dtype)
    if not ok:
        return TrainTiming(path, T, f"unsupported: {reason}", stage)
    release_graphs()  # another path's captured steps hold their activations and gradients
    try:
        timed = train_step(problem, path, stage)
        ms = measure(timed.step, device, runs=runs).median_ms
        queued_ms = measure_queued(timed.step, device, runs=runs).median_ms
        peak = peak_activation_gb(timed.step, timed.leaves, device)
        forward_ms, inference_ms = (
            t.median_ms for t in measure_interleaved([timed.forward, timed.inference], device, runs=runs)
        )
    except torch.OutOfMemoryError as error:
        release_graphs()
        torch.cuda.empty_cache()
        return TrainTiming(path, T, f"OOM: {str(error).splitlines()[0][:80]}", stage)
    flops = routed_expert_flops(T, problem.config) if stage == "experts" else layer_flops(T, problem.config)
    tflops = 3 * flops / ms / 1e9
    pct, queued_pct = (100 * 3 * flops / t / 1e9 / ceilings.matmul_tflops for t in (ms, queued_ms))
    return TrainTiming(path, T, "ok", stage, ms, tflops, pct, peak, forward_ms, inference_ms, queued_ms, queued_pct)


def peak_activation_gb(step, leaves, device: torch.device) -> float | None:
    """GB a step allocates at its peak beyond its starting memory and the gradients it leaves, plus what captured
    training steps' graph pools hold (allocated before the step: activations, workspace), their gradients apart
    (CUDA only)."""
    if device.type != "cuda":
        return None
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    segments = training_graph_segments()

    def in_a_pool(t: torch.Tensor) -> bool:
        return any(address <= t.data_ptr() < address + size for address, size in segments)

    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    new_grads = sum(g.numel() * g.element_size() for g in grads if not in_a_pool(g))
    pool_grads = sum(g.numel() * g.element_size() for g in grads if in_a_pool(g))
    held = sum(size for _, size in segments) - pool_grads
    return (torch.cuda.max_memory_allocated(device) - start - new_grads + held) / 1e9
