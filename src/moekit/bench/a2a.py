"""`moekit bench a2a`: dispatch and combine of every expert-parallel path, timed on every rank.

Each rank draws its tokens and a uniform routing (K distinct experts per token), then times dispatch and
combine apart (median of `runs` after warm-up, CUDA events on GPU, a barrier before each call so ranks
start together). Off-rank GB/s counts the rows a rank sends to other ranks (each token once per destination
rank, its own rank excluded), the definition issue #8 asks for. A fixed-shape path (nvshmem_triton_graph,
symmetric_triton_graph) is timed as CUDA-graph replays of its dispatch and of its combine, the way a captured
decode step runs it; the others are timed as called from Python.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from moekit.bench.progress import each_case
from moekit.bench.timing import as_cuda_graph, time_once
from moekit.ep import DISPATCHERS
from moekit.ep.symmetric import SymmetricLayout
from moekit.testing.spawn import rank_device

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class A2AConfig:
    """One problem per rank: tokens T, hidden H, top-k K, experts E (over all ranks), dtype name."""

    name: str
    tokens: int
    hidden: int
    top_k: int
    experts: int
    dtype: str = "bf16"


CONFIGS = {
    "normal": A2AConfig("normal", 4096, 7168, 8, 256),
    "low-latency": A2AConfig("low-latency", 128, 7168, 8, 256),
    "cpu": A2AConfig("cpu", 256, 512, 4, 16, "float32"),
}
SWEEPS = {"batch": "tokens", "local-experts": "experts", "topk": "top_k"}


@dataclass(frozen=True)
class A2ATiming:
    """Medians over runs of the slowest rank, in µs; off-rank GB/s of the dispatch on the busiest rank."""

    config: str
    path: str
    dispatch_us: float
    combine_us: float
    offrank_gbps: float
    padding_fraction: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _uniform_routing(config: A2AConfig, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(config.tokens, config.experts, generator=g, device=device)
    topk_ids = scores.topk(config.top_k, dim=1).indices.to(torch.int32)  # distinct, uniform
    weights = torch.rand(config.tokens, config.top_k, generator=g, device=device) + 0.1
    return topk_ids, weights / weights.sum(1, keepdim=True)


def timed_together(fn, device: torch.device) -> float:
    """µs of one call, after a barrier so every rank starts it together."""
    dist.barrier()
    return time_once(fn, device) * 1e3


def largest_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


@dataclass
class PreparedPath:
    """One path set up on this rank for one config, warmed up: dispatch and combine (CUDA-graph replays for
    a fixed-shape path on GPU), and what the timings are divided into."""

    dispatch: Callable[[], object]
    combine: Callable[[], object]
    offrank_bytes: int  # the rows this rank's dispatch sends to other ranks
    padding_fraction: float | None

    def round_trip(self) -> None:
        self.dispatch()
        self.combine()


def prepare_path(config: A2AConfig, path: str, device: torch.device, seed: int) -> PreparedPath:
    """Build and warm up one path on this rank's group (called on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[config.dtype]
    topk_ids, weights = _uniform_routing(config, device, seed + rank)
    cls = DISPATCHERS.get(path).fn
    options = {}
    if issubclass(cls, SymmetricLayout):  # buffers E * C rows: C = the group's fullest (rank, expert), no drops
        fullest = torch.bincount(topk_ids.reshape(-1).long(), minlength=config.experts).max().reshape(1)
        dist.all_reduce(fullest, op=dist.ReduceOp.MAX)
        options["capacity"] = max(1, int(fullest))
    dispatcher = cls(None, config.experts, config.hidden, config.tokens, dtype, device, **options)
    x = torch.randn(config.tokens, config.hidden, device=device).to(dtype)
    state = {}

    def dispatch():
        state["out"] = dispatcher.dispatch(x, topk_ids, weights)

    def combine():
        recv_x, _, handle = state["out"]
        dispatcher.combine(recv_x, handle)

    for _ in range(3):
        dispatch()
        combine()
    if dispatcher.fixed_shapes and device.type == "cuda":  # no host sync: time it as a graph replays it
        dispatch = as_cuda_graph(dispatch)
        dispatch()  # fills the graph's outputs, which the combine graph reads
        combine = as_cuda_graph(combine)
    dest = topk_ids.long() // (config.experts // world)
    sent = torch.zeros(config.tokens, world, dtype=torch.bool, device=device).scatter_(1, dest, True)
    offrank_rows = int(sent.sum()) - int(sent[:, rank].sum())
    padding = getattr(state["out"][2], "padding_fraction", None)
    return PreparedPath(dispatch, combine, offrank_rows * config.hidden * x.element_size(), padding)


def time_path(config: A2AConfig, path: str, device: torch.device, runs: int, seed: int) -> A2ATiming:
    """Time one path on this rank's group (called on every rank)."""
    prepared = prepare_path(config, path, device, seed)
    dispatch_us, combine_us = [], []
    for _ in range(runs):
        dispatch_us.append(timed_together(prepared.dispatch, device))
        combine_us.append(timed_together(prepared.combine, device))
    d_us = largest_over_ranks(statistics.median(dispatch_us), device)
    c_us = largest_over_ranks(statistics.median(combine_us), device)
    gbps = largest_over_ranks(prepared.offrank_bytes / (d_us * 1e3), device)
    return A2ATiming(config.name, path, d_us, c_us, gbps, prepared.padding_fraction)


def run_ranks(
    rank: int, world_size: int, configs: list[A2AConfig], paths: list[str], runs: int, backend: str, quiet: bool
) -> list[A2ATiming]:
    """Entry point of each spawned rank: every config x path, results from every rank agree; rank 0 shows
    the progress (unless quiet)."""
    device = rank_device(rank, backend)
    return each_case(
        [(c, p) for c in configs for p in paths],
        lambda case: time_path(*case, device, runs, seed=17),
        lambda case: f"{case[0].name} {case[1]}",
        quiet=quiet or rank != 0,
    )


def sweep_configs(base: A2AConfig, sweep: str, values: list[int]) -> list[A2AConfig]:
    """base with one field (SWEEPS[sweep]) set to each value; local-experts values are per rank."""
    field = SWEEPS[sweep]
    return [replace(base, name=f"{sweep}={v}", **{field: v}) for v in values]
