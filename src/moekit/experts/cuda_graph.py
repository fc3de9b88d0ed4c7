"""cuda_graph (level 7a): the best eager path (triton_grouped) captured once per shape in a CUDA graph
and replayed, so a small batch pays one graph launch instead of one launch per kernel."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from moekit.experts.registry import EXPERT_BACKENDS
from moekit.experts.triton_grouped import sixteen, triton_grouped
from moekit.kernels.availability import triton_support
from moekit.validation import check_routing
from moekit.weights import MoEWeights

MAX_GRAPHS = 8  # graphs kept (least recently used goes first); each holds its static buffers


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


def _capture(x, topk_ids, topk_weights, weights) -> _Captured:
    static = [t.clone() for t in (x, topk_ids, topk_weights)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and autotune the kernels outside the capture
        triton_grouped(*static, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = triton_grouped(*static, weights)
    return _Captured(graph, *static, y)


@EXPERT_BACKENDS.register("cuda_graph", supports=cuda_graph_support, size_multiple=sixteen)
def cuda_graph(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H] (a new tensor): copy the inputs into the graph's buffers, replay, copy y out.

    One graph per (shapes, dtypes, device, weight storage); weights must not be reallocated in between.
    """
    check_routing(topk_ids, topk_weights, weights.w_gate_up.shape[0])
    key = (
        x.shape,
        x.dtype,
        topk_ids.shape,
        topk_ids.dtype,
        topk_weights.dtype,
        x.device,
        weights.w_gate_up.data_ptr(),
        weights.w_down.data_ptr(),
    )
    captured = _graphs.pop(key, None) or _capture(x, topk_ids, topk_weights, weights)
    _graphs[key] = captured
    while len(_graphs) > MAX_GRAPHS:
        _graphs.popitem(last=False)
    captured.x.copy_(x)
    captured.topk_ids.copy_(topk_ids)
    captured.topk_weights.copy_(topk_weights)
    captured.graph.replay()
    return captured.y.clone()
