"""Timing one callable: warm-up, then the median of many runs (CUDA events on GPU, perf_counter on CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Times of one callable in milliseconds."""

    median_ms: float
    min_ms: float
    runs: int


def _time_cuda(fn: Callable[[], object], runs: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_cpu(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, runs: int = 20) -> Timing:
    """Run fn warmup times, then time `runs` calls on device and return the median and minimum."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = _time_cuda(fn, runs)
    else:
        times = _time_cpu(fn, runs)
    return Timing(statistics.median(times), min(times), runs)
