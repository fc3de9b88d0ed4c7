"""What the multi-GPU perf cases (tests/perf/test_multigpu_perf.py) run on the ranks of a RankPool.

A case is prepared once per rank and kept here under a name, timed against its reference in the same run
(a barrier before every call, medians, the slowest rank's), then called `calls` times per pool call for
pytest-benchmark's rounds, and released. Each function runs on every rank: fn(rank, world_size, ...).
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from moekit.bench.a2a import A2AConfig, PreparedPath, largest_over_ranks, prepare_path, timed_together
from moekit.bench.ep import EPCase, PreparedStudy, prepare_study, time_phases
from moekit.testing.spawn import rank_device

_PREPARED: dict[str, PreparedPath | PreparedStudy] = {}


def _device(rank: int) -> torch.device:
    return rank_device(rank, dist.get_backend())


def _synchronize(rank: int) -> None:
    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_round_trips(rank: int, world_size: int, config: A2AConfig, paths: list[str]) -> None:
    """Every path's dispatcher for config, warmed up, kept as `config.name/path`."""
    device = _device(rank)
    for path in paths:
        _PREPARED[f"{config.name}/{path}"] = prepare_path(config, path, device, seed=17)


def time_round_trips(rank: int, world_size: int, fast: str, reference: str, runs: int) -> tuple[float, float, float]:
    """Round trips (dispatch + combine) of two prepared paths, interleaved: their medians in µs and the fast
    path's off-rank GB/s (its rows there and back), each the slowest (busiest) rank's."""
    device = _device(rank)
    paths = _PREPARED[fast], _PREPARED[reference]
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for path, record in zip(paths, times):
            record.append(timed_together(path.round_trip, device))
    fast_us, reference_us = (largest_over_ranks(statistics.median(t), device) for t in times)
    return fast_us, reference_us, largest_over_ranks(2 * paths[0].offrank_bytes / (fast_us * 1e3), device)


def run_round_trips(rank: int, world_size: int, name: str, calls: int) -> None:
    """`calls` round trips of a prepared path back to back, then a device synchronisation."""
    for _ in range(calls):
        _PREPARED[name].round_trip()
    _synchronize(rank)


def prepare_layer(rank: int, world_size: int, name: str, case: EPCase) -> None:
    """moekit bench ep's layer and phases for case, kept as `name`."""
    _PREPARED[name] = prepare_study(rank, world_size, case, _device(rank))


def time_layer_phases(rank: int, world_size: int, name: str, runs: int) -> dict[str, float]:
    """Median ms of every phase of a prepared layer (moekit.bench.ep.PHASES), the slowest rank's."""
    device = _device(rank)
    return {phase: largest_over_ranks(ms, device) for phase, ms in time_phases(_PREPARED[name], device, runs).items()}


def run_layers(rank: int, world_size: int, name: str, calls: int) -> None:
    """`calls` overlapped layers of a prepared case back to back, then a device synchronisation."""
    for _ in range(calls):
        _PREPARED[name].phases["layer_overlapped"]()
    _synchronize(rank)


def release(rank: int, world_size: int, prefix: str) -> None:
    """Drop the prepared cases whose name starts with prefix (their buffers and weights)."""
    for name in [n for n in _PREPARED if n.startswith(prefix)]:
        del _PREPARED[name]
    _synchronize(rank)
