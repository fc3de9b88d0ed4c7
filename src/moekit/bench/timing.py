"""Timing callables: warm-up, then the median of many runs (CUDA events on GPU, perf_counter on CPU).

Paths compared with each other are timed interleaved (a, b, a, b, ...), so a slow spell of a shared
machine lands on both and their ratio holds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Times of one callable in milliseconds."""

    median_ms: float
    min_ms: float
    runs: int


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn: CUDA events on GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def measure_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, *, warmup: int = 3, runs: int = 20
) -> list[Timing]:
    """Warm each fn up, then time them in turn `runs` times; one Timing per fn."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for fn in fns:
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, record in zip(fns, times):
            record.append(time_once(fn, device))
    return [Timing(statistics.median(t), min(t), runs) for t in times]


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, runs: int = 20) -> Timing:
    """Warm fn up, then time `runs` calls on device."""
    return measure_interleaved([fn], device, warmup=warmup, runs=runs)[0]


def measure_queued(
    fn: Callable[[], object], device: torch.device, *, calls: int = 5, warmup: int = 3, runs: int = 20
) -> Timing:
    """Milliseconds per call of fn with `calls` calls queued back to back between two events, no synchronisation
    between them: the rate of a loop whose host runs ahead of the device (a training loop), where `measure` also
    counts the host's launch latency up to each call's first kernels. The median over `runs` such batches."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")

    def batch() -> None:
        for _ in range(calls):
            fn()

    timing = measure(batch, device, warmup=max(1, warmup // calls), runs=runs)
    return Timing(timing.median_ms / calls, timing.min_ms / calls, timing.runs)


def as_cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after a warm-up on a side stream): returns a callable replaying it.

    Timing the replays measures the kernels without the Python and launch overhead of calling fn,
    the figure that matters once a step runs inside a captured forward (METHOD.md).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay() -> None:
        graph.replay()

    replay.captured = fn  # the graph reads the tensors fn closes over: they live as long as the replay does
    return replay
