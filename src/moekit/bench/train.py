"""Training step timings: forward + backward of the routed experts, per path, on one problem.

A path is an expert backend registered with trains=True, or the peer written here: torchtitan's MoE experts as
its users run them, torch._grouped_mm under autograd with an index gather of the tokens into expert order and an
index_add of the weighted rows back (`grouped_mm_peer`). One step: the expert forward on x, topk_weights and the
two weight tensors (all requiring grad), then backward of a fixed random dy; gradients are set to None between
steps, so each step allocates them as a training step does. FLOPs are three times the forward's (the two
gradients of every GEMM). Peak memory is measured on CUDA above what the step starts with (weights, x) and the
weight gradients it leaves behind: the activations and workspace a path keeps. Beside the step, the path's
forward alone is timed twice, interleaved: with the graph recorded (what a training step pays before its
backward) and under no_grad (the inference forward), so a trainable path's forward overhead is a ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from moekit.bench.ceilings import Ceilings
from moekit.bench.flops import routed_expert_flops
from moekit.bench.timing import measure, measure_interleaved
from moekit.experts import EXPERT_BACKENDS
from moekit.problem import MoEProblem
from moekit.routing import route
from moekit.validation import trusted_values
from moekit.weights import MoEWeights

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
    ms: float | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None
    peak_activation_gb: float | None = None
    forward_ms: float | None = None  # the forward recording its graph
    inference_ms: float | None = None  # the same forward under no_grad

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


def train_step(problem: MoEProblem, path: str) -> TrainStep:
    """The training step of the routed experts through path (a training backend or PEER) on problem."""
    fn = grouped_mm_peer if path == PEER else EXPERT_BACKENDS.get(path).fn
    device = problem.x.device
    routing = route(problem.router_logits(), problem.config, problem.weights.score_correction_bias)
    x = problem.x.detach().clone().requires_grad_()
    topk_weights = routing.topk_weights.detach().clone().requires_grad_()
    w_gate_up = problem.weights.w_gate_up.detach().clone().requires_grad_()
    w_down = problem.weights.w_down.detach().clone().requires_grad_()
    weights = replace(problem.weights, w_gate_up=w_gate_up, w_down=w_down)
    dy = torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(1)).to(x.dtype)
    leaves = (x, topk_weights, w_gate_up, w_down)

    def forward():
        with trusted_values():
            return fn(x, routing.topk_ids, topk_weights, weights)

    def inference():
        with torch.no_grad():
            forward()

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(dy)

    return TrainStep(step, forward, inference, leaves)


def time_train_step(problem: MoEProblem, path: str, ceilings: Ceilings, *, runs: int = 10) -> TrainTiming:
    """Median ms of forward + backward of the routed experts through path (a training backend or PEER)."""
    device, T = problem.x.device, problem.num_tokens
    ok, reason = path_support(path, device, problem.x.dtype)
    if not ok:
        return TrainTiming(path, T, f"unsupported: {reason}")
    try:
        timed = train_step(problem, path)
        ms = measure(timed.step, device, runs=runs).median_ms
        peak = _peak_activation_gb(timed.step, timed.leaves, device)
        forward_ms, inference_ms = (
            t.median_ms for t in measure_interleaved([timed.forward, timed.inference], device, runs=runs)
        )
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return TrainTiming(path, T, f"OOM: {str(error).splitlines()[0][:80]}")
    tflops = 3 * routed_expert_flops(T, problem.config) / ms / 1e9
    pct = 100 * tflops / ceilings.matmul_tflops
    return TrainTiming(path, T, "ok", ms, tflops, pct, peak, forward_ms, inference_ms)


def _peak_activation_gb(step, leaves, device: torch.device) -> float | None:
    """GB a step allocates at its peak beyond its starting memory and the gradients it leaves (CUDA only)."""
    if device.type != "cuda":
        return None
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    grads = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves if leaf.grad is not None)
    return (torch.cuda.max_memory_allocated(device) - start - grads) / 1e9
