"""cuda_graph (level 7a): the best eager path captured once per shape in a CUDA graph and replayed, so a
batch pays one graph launch instead of one launch per kernel. The best path depends on the rows each expert
sees: moekit's own grouped GEMM (triton_grouped) while they are few, torch._grouped_mm with the Triton glue
(grouped_mm_fused) from LARGE_EXPERT_BATCH mean rows per expert on (measured on an H200: Mixtral, Qwen3 and
DeepSeek-V3 shapes from 512 to 8192 tokens all cross over between 128 and 256 rows per expert).
It trains: with grad-requiring inputs in grad mode the forward and the backward of the best training path are
captured and replayed (moekit.experts.cuda_graph_training)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from moekit.experts.cuda_graph_training import release_training_graphs, replay_training_step
from moekit.experts.grouped_mm import sixteen_byte_rows
from moekit.experts.grouped_mm_fused import grouped_mm_fused, grouped_mm_fused_support
from moekit.experts.registry import EXPERT_BACKENDS
from moekit.experts.triton_grouped import sixteen, triton_grouped
from moekit.kernels.availability import triton_support
from moekit.registry import needs_grad
from moekit.validation import check_routing
from moekit.weights import MoEWeights

MAX_GRAPHS = 8  # graphs kept (least recently used goes first); each holds its static buffers
LARGE_EXPERT_BATCH = 256  # mean rows per expert (T * K / E) from which grouped_mm_fused is the faster path


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    y: torch.Tensor


_graphs: OrderedDict[tuple, _Captured] = OrderedDict()


def cuda_graph_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    return triton_support(device, dtype)


def best_eager_path(x: torch.Tensor, top_k: int, weights: MoEWeights):
    """The backend function cuda_graph captures for x [T, H] routed to top_k experts: see the module docstring."""
    rows_per_expert = x.shape[0] * top_k / max(weights.w_gate_up.shape[0], 1)
    multiple = sixteen_byte_rows(x.dtype)  # torch._grouped_mm's row alignment
    aligned = x.shape[1] % multiple == 0 and weights.w_down.shape[2] % multiple == 0
    if rows_per_expert >= LARGE_EXPERT_BATCH and aligned and grouped_mm_fused_support(x.device, x.dtype)[0]:
        return grouped_mm_fused
    return triton_grouped


def best_training_path(x: torch.Tensor, weights: MoEWeights):
    """The training backend cuda_graph captures for x [T, H]: grouped_mm_fused for experts of at most
    SMALL_WEIGHT_ELEMENTS per weight (its forward runs on torch._grouped_mm, its small weights' gradients on
    Triton), triton_grouped for larger ones (measured on an H200, T = 4096 and 8192: Qwen3-30B-A3B's step 2.85
    against 3.50 ms queued at T = 4096; DeepSeek-V3's 41.4 against 44.7 ms at T = 8192, Mixtral's a tie)."""
    from moekit.kernels.differentiable import SMALL_WEIGHT_ELEMENTS

    small = weights.w_gate_up.shape[1] * weights.w_gate_up.shape[2] <= SMALL_WEIGHT_ELEMENTS
    multiple = sixteen_byte_rows(x.dtype)
    aligned = x.shape[1] % multiple == 0 and weights.w_down.shape[2] % multiple == 0
    if small and aligned and grouped_mm_fused_support(x.device, x.dtype)[0]:
        return grouped_mm_fused
    return triton_grouped


def _capture(path, x, topk_ids, topk_weights, weights) -> _Captured:
    static = [t.clone() for t in (x, topk_ids, topk_weights)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and autotune the kernels outside the capture
        path(*static, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = path(*static, weights)
    return _Captured(graph, *static, y)


@EXPERT_BACKENDS.register("cuda_graph", supports=cuda_graph_support, size_multiple=sixteen, trains=True)
def cuda_graph(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H] (a new tensor): copy the inputs into the graph's buffers, replay, copy y out.

    One graph per (shapes, dtypes, device, weight storage); weights must not be reallocated in between. With
    grad-requiring inputs in grad mode, a training step's graphs (cuda_graph_training.replay_training_step).
    """
    check_routing(topk_ids, topk_weights, weights.w_gate_up.shape[0])
    differentiable = (x, topk_weights, weights.w_gate_up, weights.w_down)
    if torch.is_grad_enabled() and needs_grad(differentiable):
        if x.shape[0] == 0:  # nothing to replay: the eager path's constant empty output
            return best_training_path(x, weights)(x, topk_ids, topk_weights, weights)
        return replay_training_step(best_training_path(x, weights), x, topk_ids, topk_weights, weights)
    path = best_eager_path(x, topk_ids.shape[1], weights)
    return replay_captured(path, x, topk_ids, topk_weights, weights, (weights.w_gate_up, weights.w_down))


def release_graphs() -> None:
    """Drop every graph cuda_graph captured, inference and training, with their memory pools."""
    _graphs.clear()
    release_training_graphs()


def replay_captured(path, x, topk_ids, topk_weights, weights, weight_tensors) -> torch.Tensor:
    """path(x, topk_ids, topk_weights, weights) -> y, replayed from a graph captured on the first call with these
    shapes and weight_tensors (the tensors the graph's kernels read at their addresses): y is a new tensor."""
    key = (
        path.__name__,
        x.shape,
        x.dtype,
        topk_ids.shape,
        topk_ids.dtype,
        topk_weights.dtype,
        x.device,
        # the graph's kernels read the weights at these addresses with these shapes and strides: a new weight
        # that reuses a freed one's memory with another shape must not replay the old graph
        *((w.data_ptr(), tuple(w.shape), w.stride()) for w in weight_tensors),
    )
    captured = _graphs.pop(key, None) or _capture(path, x, topk_ids, topk_weights, weights)
    _graphs[key] = captured
    while len(_graphs) > MAX_GRAPHS:
        _graphs.popitem(last=False)
    captured.x.copy_(x)
    captured.topk_ids.copy_(topk_ids)
    captured.topk_weights.copy_(topk_weights)
    captured.graph.replay()
    return captured.y.clone()
