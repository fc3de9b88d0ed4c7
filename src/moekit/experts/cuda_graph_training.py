"""cuda_graph's training step: the forward and the backward of the best eager training path, each captured once
per shape in a CUDA graph (the two sharing one memory pool) and replayed under an autograd Function. A step then
pays two graph launches where the eager step's host issued some forty kernel launches through autograd nodes and
Triton's autotuner wrappers: that host work, not the GPU, set the pace of Qwen3-30B-A3B's step at T = 4096.

torch.cuda.make_graphed_callables does the same but hands out its static gradient buffers as the gradients: the
.grad a weight takes over from one backward is overwritten by the next, so gradients accumulated over two backwards
come out as twice the second (pytorch/pytorch#181723). Here nothing is overwritten unseen:
- y, dx and d topk_weights ([T, H], [T, H], [T, K]) are copied out of the graph (its pool keeps their buffers);
- the weight gradients are handed out as the graph's buffers (a copy of them costs a fifth of Qwen3-30B-A3B's step):
  a .grad still holding its buffer at the next replay (the forward graph reuses the buffers' memory for its
  temporaries) first moves to memory of its own, so accumulation stays right, and a buffer held anywhere else
  (a .grad kept after zero_grad, torch.autograd.grad's result) raises;
- the saved activations live in the graph, so a backward after a later forward of the same graph raises, and so
  does one after its weights were changed in place (as autograd's version check does).
The captured backward frees the activations as it goes, as eager autograd does, so the pool is about the eager
step's peak; a second backward of one forward (retain_graph) replays the forward again first.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from moekit.weights import MoEWeights

# Graphs kept (least recently used goes first): a model needs one per MoE layer, and each holds that layer's
# weight gradients (which its weights' .grad use, no copy) and its activations between steps.
MAX_TRAINING_GRAPHS = 64


@dataclass
class _CapturedStep:
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph
    pool: tuple
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    y: torch.Tensor
    dy: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]  # of x, topk_weights, w_gate_up, w_down (None: not wanted)
    lone_use_counts: tuple[int, ...]  # each weight-gradient buffer's storage use count while nobody else holds it
    forwards: int = 0  # forward replays so far: a backward belongs to the latest


_steps: OrderedDict[tuple, _CapturedStep] = OrderedDict()


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _capture(path, x, topk_ids, topk_weights, weights: MoEWeights) -> _CapturedStep:
    x_static = x.detach().clone().requires_grad_(x.requires_grad)
    ids_static = topk_ids.clone()
    weights_static = topk_weights.detach().clone().requires_grad_(topk_weights.requires_grad)
    # the expert weights enter as leaves of their own (aliases of the same memory): the captured graph then never
    # touches the AccumulateGrad nodes of the caller's weights, which would carry the capture's stream afterwards
    gate_up, down = (w.detach().requires_grad_(w.requires_grad) for w in (weights.w_gate_up, weights.w_down))
    aliased = dataclasses.replace(weights, w_gate_up=gate_up, w_down=down)
    inputs = (x_static, weights_static, gate_up, down)
    wanted = [t for t in inputs if t.requires_grad]

    def run():
        return path(x_static, ids_static, weights_static, aliased)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile, autotune and allocate workspaces outside the capture
        for _ in range(2):
            y = run()
            torch.autograd.grad(y, wanted, torch.randn_like(y), allow_unused=True)
    torch.cuda.current_stream().wait_stream(stream)
    pool = torch.cuda.graph_pool_handle()
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    # captured on the warm-up's stream, whose AccumulateGrad nodes (kept alive by its y) carry that stream
    with torch.cuda.graph(forward_graph, pool=pool, stream=stream):
        y = run()
    dy = torch.empty_like(y)
    with torch.cuda.graph(backward_graph, pool=pool, stream=stream):
        computed = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
    grads = tuple(next(computed) if t.requires_grad else None for t in inputs)
    lone = tuple(_use_count(g) if g is not None else 0 for g in grads[2:])
    y = y.detach()  # the captured autograd graph goes (its saved activations live on in the pool)
    return _CapturedStep(forward_graph, backward_graph, pool, x_static, ids_static, weights_static, y, dy, grads, lone)


def _free_gradient_buffers(step: _CapturedStep, weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Before a replay overwrites the weight-gradient buffers (the backward writes them; the forward may reuse
    their memory for its own temporaries, as the two graphs share a pool): a .grad still on its buffer moves to
    memory of its own, and a buffer held anywhere else raises."""
    for name, weight, buffer, lone in zip(("w_gate_up", "w_down"), weights, step.grads[2:], step.lone_use_counts):
        if buffer is None:
            continue
        if weight.is_leaf and weight.grad is not None and weight.grad.data_ptr() == buffer.data_ptr():
            weight.grad = weight.grad.clone()
        if _use_count(buffer) > lone:
            raise RuntimeError(
                f"cuda_graph: the {name} gradient of the last backward is still held (a .grad kept after "
                "zero_grad, or torch.autograd.grad's result) and the next replay would overwrite it: "
                "keep a .clone() of it instead"
            )


class _ReplayedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: _CapturedStep, topk_ids, x, topk_weights, w_gate_up, w_down):
        step.x.copy_(x)
        step.topk_ids.copy_(topk_ids)
        step.topk_weights.copy_(topk_weights)
        _free_gradient_buffers(step, (w_gate_up, w_down))
        step.forward_graph.replay()
        step.forwards += 1
        ctx.step, ctx.forward_number, ctx.weights = step, step.forwards, (w_gate_up, w_down)
        ctx.versions, ctx.backwards = (w_gate_up._version, w_down._version), 0
        return step.y.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        step: _CapturedStep = ctx.step
        if ctx.forward_number != step.forwards:
            raise RuntimeError(
                "cuda_graph: this backward's forward was replayed over by a later forward of the same shapes, "
                "whose activations the graph now holds; run each backward before the next forward (or train "
                "that loop on triton_grouped or grouped_mm_fused)"
            )
        if ctx.versions != (ctx.weights[0]._version, ctx.weights[1]._version):
            raise RuntimeError(
                "cuda_graph: an expert weight was modified in place between this forward and its backward, "
                "which needs the weights its forward used"
            )
        _free_gradient_buffers(step, ctx.weights)
        if ctx.backwards:  # the first backward freed (and reused) the activations: compute them again
            step.forward_graph.replay()
        ctx.backwards += 1
        step.dy.copy_(dy)
        step.backward_graph.replay()
        dx, d_topk_weights, d_gate_up, d_down = step.grads
        copied = [g.clone() if g is not None else None for g in (dx, d_topk_weights)]
        return None, None, *copied, *(g.detach() if g is not None else None for g in (d_gate_up, d_down))


def replay_training_step(path, x, topk_ids, topk_weights, weights: MoEWeights) -> torch.Tensor:
    """path(x [T, H], topk_ids, topk_weights, weights) -> y [T, H] (a new tensor) with its backward, both replayed
    from graphs captured on the first call with these shapes, requires_grad flags and weight tensors (read at their
    addresses: they must not be reallocated in between)."""
    tensors = (x, topk_weights, weights.w_gate_up, weights.w_down)
    key = (
        path.__name__,
        topk_ids.shape,
        topk_ids.dtype,
        x.device,
        *((t.dtype, tuple(t.shape), t.stride(), t.requires_grad) for t in tensors),
        weights.w_gate_up.data_ptr(),
        weights.w_down.data_ptr(),
    )
    step = _steps.pop(key, None) or _capture(path, x, topk_ids, topk_weights, weights)
    _steps[key] = step
    while len(_steps) > MAX_TRAINING_GRAPHS:
        _steps.popitem(last=False)
    return _ReplayedStep.apply(step, topk_ids, *tensors)


def release_training_graphs() -> None:
    """Drop every captured training step: their memory pools, weight-gradient buffers and saved activations."""
    _steps.clear()


def training_graph_segments() -> list[tuple[int, int]]:
    """(address, bytes) of each memory segment the captured training steps' pools hold on the current device."""
    pools = {step.pool for step in _steps.values()}
    return [(s["address"], s["total_size"]) for s in torch.cuda.memory_snapshot() if s["segment_pool_id"] in pools]
