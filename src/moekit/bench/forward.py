"""Timing one MoE FFN forward (router logits, routing, permute, experts, unpermute) per expert backend as
MoELayer(check_values=False) runs it, with no host synchronisation (the cuda_graph level replays the whole
forward, routing included, as one graph). The figures the expert benchmarks print: TFLOP/s and share of the
dense matmul rate, and for small batches the bandwidth on the active experts' weight bytes and its share of
the copy bandwidth."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from moekit.bench.ceilings import Ceilings
from moekit.bench.flops import routed_expert_flops
from moekit.bench.timing import as_cuda_graph, measure, measure_queued
from moekit.experts import EXPERT_BACKENDS, FP8_EXPERT_BACKENDS
from moekit.experts.cuda_graph import best_eager_path
from moekit.problem import MoEProblem
from moekit.quantize import QuantizedMoEWeights
from moekit.routing import route
from moekit.validation import trusted_values

SHAPES = {
    "mixtral": dict(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2),
    "qwen3": dict(hidden_size=2048, ffn_size=768, num_experts=128, top_k=8),
    "deepseek_v3": dict(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8),
}


def shape_sizes(shapes: str, shrink: int = 1) -> list[tuple[str, dict]]:
    """--shapes ("mixtral,qwen3") -> [(shape, MoEConfig sizes with H and F divided by shrink)], in that order;
    an unknown shape raises."""
    for shape in shapes.split(","):
        if shape not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {shape!r}; expected some of {list(SHAPES)}")
    return [
        (shape, {**SHAPES[shape], "hidden_size": SHAPES[shape]["hidden_size"] // shrink,
                 "ffn_size": SHAPES[shape]["ffn_size"] // shrink})
        for shape in shapes.split(",")
    ]  # fmt: skip


@dataclass(frozen=True)
class ForwardTiming:
    """One backend on one problem; ms is None when it did not run (status says why: OOM, unsupported)."""

    backend: str
    tokens: int
    status: str
    ms: float | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None
    weight_gbps: float | None = None
    pct_of_copy: float | None = None
    pct_of_fp8_matmul: float | None = None
    # graph replays only: five queued back to back between two events (measure_queued), the rate of a serving
    # loop whose host runs ahead; ms, one synced replay, also counts the graph's launch latency (17-47 us of a
    # decode step on an H200)
    queued_ms: float | None = None
    queued_pct_of_copy: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def batched_bytes(problem: MoEProblem) -> int:
    """Memory the batched backend's per-token weight copies take: T*K*3*H*F elements."""
    c = problem.config
    return problem.num_tokens * c.top_k * 3 * c.hidden_size * c.ffn_size * problem.x.element_size()


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def active_weight_bytes(topk_ids: torch.Tensor, weights) -> int:
    """Bytes of the expert weights the batch touches: each active expert's gate, up and down once (FP8: the
    e4m3 values and their float32 scales)."""
    active = int(torch.unique(topk_ids).numel())
    if isinstance(weights, QuantizedMoEWeights):
        tensors = [t for w in (weights.w_gate_up, weights.w_down) for t in (w.values, w.scale)]
    else:
        tensors = [weights.w_gate_up, weights.w_down]
    return active * sum(t[0].numel() * t.element_size() for t in tensors)


def time_forward(
    problem: MoEProblem,
    backend: str,
    ceilings: Ceilings,
    *,
    runs: int = 20,
    warmup: int = 3,
    quantized: QuantizedMoEWeights | None = None,
    graph: bool = False,
) -> ForwardTiming:
    """Time logits -> route -> backend on problem.x; OOM and unsupported backends become a status.

    quantized: the FP8 weights an FP8_EXPERT_BACKENDS backend runs on (problem.weights otherwise); graph: time
    replays of the whole forward captured in a CUDA graph (backends "cuda_graph" and "cuda_graph_fp8" always are)."""
    device, T = problem.x.device, problem.num_tokens
    name = backend + ("+graph" if graph else "")
    if quantized is None:
        impl = EXPERT_BACKENDS.get(backend)
        ok, reason = impl.supports(device, problem.x.dtype)
    else:
        impl = FP8_EXPERT_BACKENDS.get(backend)
        ok, reason = impl.supports(device, problem.x.dtype, quantized.scheme)
    if not ok:
        return ForwardTiming(name, T, f"unsupported: {reason}")
    multiple = impl.size_multiple(problem.x.dtype)
    H, F = problem.config.hidden_size, problem.config.ffn_size
    if H % multiple or F % multiple:
        return ForwardTiming(name, T, f"unsupported: H and F must be multiples of {multiple}, got {H} and {F}")
    if backend == "batched" and batched_bytes(problem) > 0.8 * free_memory(device):
        return ForwardTiming(name, T, f"OOM: needs {batched_bytes(problem) / 2**30:.0f} GiB of weight copies")
    weights, config = quantized or problem.weights, problem.config

    def whole_forward(experts):  # the hot path as MoELayer(check_values=False) runs it: no host synchronisation
        def forward():
            routing = route(problem.router_logits(), config, weights.score_correction_bias, check_values=False)
            with trusted_values():
                return experts(problem.x, routing.topk_ids, routing.topk_weights, weights)

        return forward

    try:
        if backend == "cuda_graph":
            # the whole forward, routing included, in one graph, as a serving engine replays a decode step
            forward = as_cuda_graph(whole_forward(best_eager_path(problem.x, config.top_k, weights)))
        elif backend == "cuda_graph_fp8":  # the same for FP8: its captured path, routing included
            forward = as_cuda_graph(whole_forward(FP8_EXPERT_BACKENDS.get("triton_grouped_fp8").fn))
        elif graph:
            forward = as_cuda_graph(whole_forward(impl.fn))
        else:
            forward = whole_forward(impl.fn)
        ms = measure(forward, device, runs=runs, warmup=warmup).median_ms
        replayed = graph or backend in ("cuda_graph", "cuda_graph_fp8")
        queued_ms = measure_queued(forward, device, runs=runs, warmup=warmup).median_ms if replayed else None
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return ForwardTiming(name, T, f"OOM: {str(error).splitlines()[0][:80]}")
    tflops = routed_expert_flops(T, config) / ms / 1e9
    routing = route(problem.router_logits(), config, weights.score_correction_bias)
    weight_bytes = active_weight_bytes(routing.topk_ids, weights)
    gbps = weight_bytes / ms / 1e6
    queued_pct = 100 * weight_bytes / queued_ms / 1e6 / ceilings.copy_gbps if queued_ms else None
    fp8_pct = 100 * tflops / ceilings.fp8_matmul_tflops if ceilings.fp8_matmul_tflops else None
    return ForwardTiming(
        name,
        T,
        "ok",
        ms,
        tflops,
        100 * tflops / ceilings.matmul_tflops,
        gbps,
        100 * gbps / ceilings.copy_gbps,
        fp8_pct,
        queued_ms,
        queued_pct,
    )
