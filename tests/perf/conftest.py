"""Perf-suite fixtures: the device, the ceilings measured once per run, and `perf`, which times a
fast path and its reference path in the same run and records the figures the gate compares."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moekit.bench.ceilings import measure_ceilings
from moekit.bench.machine import machine_info as describe_machine
from moekit.bench.timing import as_cuda_graph, measure_interleaved

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    # one thread: on a shared 2-core machine two threads made ratios swing by 25% between runs
    torch.set_num_threads(1)

# Same-machine spread of the CPU ratios is about 4% with one thread, but CI's CPU is another model: there
# masked_matmul (one dense (T, E*I) matmul) against naive (E small ones) fell 26% with no code change, since
# BLAS efficiency by shape differs between CPUs. CPU cases allow 40%, so a 2x slowdown (-50%) still fails;
# GPU cases keep the gate's default, 10%, against a baseline measured on the same machine kind.
CPU_RATIO_MARGIN = 0.40
# On GPU, a path that waits on the host (a .tolist(), a boolean mask, a per-expert nonzero) runs as fast as
# the host CPU of that lease lets it, and each lease is another host: between two leases of nvidia-h200 such
# ratios moved by up to 26% and such medians by up to 2.5x with no code change (nvshmem_triton's round trip:
# 0.52 ms in one lease's baseline, 1.19-1.33 ms on a later lease for the same kernels), while the sync-free
# paths' medians stayed within 6%. A case with such a path (host_bound=True) allows 35% and 200%: a 2x
# slowdown of its fast path still fails the ratio, and the median only catches what no lease explains.
# Sync-free pairs are timed as CUDA-graph replays (graphs=True) or are long enough to be GPU-bound, and keep
# the 10% default.
HOST_BOUND_RATIO_MARGIN = 0.35
HOST_BOUND_ABS_MARGIN = 2.0
# --plant-slowdown runs the fast path this many times: a 2x slowdown fell only 33% once on a noisy CI
# machine, inside the CPU cases' 40% margin, so the gate test flaked
PLANTED_SLOWDOWN = 4


def pytest_addoption(parser):
    parser.addoption(
        "--plant-slowdown",
        default=None,
        metavar="CASE",
        help=f"run the fast path of every perf case whose id contains CASE {PLANTED_SLOWDOWN} times (the gate bites)",
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["moekit"] = describe_machine(DEVICE)


@pytest.fixture(scope="session")
def perf_device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def ceilings():
    return measure_ceilings(DEVICE)


def _synchronised(fn: Callable[[], object]) -> Callable[[], object]:
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.fixture
def perf(benchmark, ceilings, request):
    """perf(fast, reference, reference_name=..., flops=..., bytes_moved=..., ratio_margin=..., graphs=...,
    host_bound=...): time both interleaved (CUDA events on GPU; graphs=True: both captured once and timed as
    CUDA-graph replays), then let pytest-benchmark time `fast` for the JSON, and record speedup, TFLOP/s,
    GB/s and their share of the ceilings in extra_info. host_bound=True: on GPU, either path waits on the
    host, and the case takes the wider host-bound margins. measured=(fast_ms, reference_ms) instead of a
    reference: the pair was timed elsewhere in this run (on the ranks of a multi-GPU case), and `fast` is
    what pytest-benchmark times."""
    planted = request.config.getoption("--plant-slowdown")
    gpu = DEVICE.type == "cuda"

    def run(
        fast,
        reference=None,
        *,
        reference_name: str,
        flops=None,
        bytes_moved=None,
        ratio_margin=None,
        runs=None,
        graphs: bool = False,
        host_bound: bool = False,
        measured: tuple[float, float] | None = None,
    ):
        if (reference is None) == (measured is None):
            raise ValueError("perf takes a reference to time or the measured (fast_ms, reference_ms), not both")
        if planted and planted in request.node.name:
            original = fast

            def fast():  # 4x: the ratio falls ~75%, clear of the widest margin (40%) and of CPU noise
                for _ in range(PLANTED_SLOWDOWN):
                    original()

        if gpu and graphs:
            fast, reference = as_cuda_graph(fast), as_cuda_graph(reference)

        runs = runs or (50 if gpu else 25)
        if measured is None:
            measured = tuple(t.median_ms for t in measure_interleaved([fast, reference], DEVICE, warmup=3, runs=runs))
        fast_ms, reference_ms = measured
        benchmark.pedantic(_synchronised(fast), rounds=runs, warmup_rounds=2, iterations=1)
        info = benchmark.extra_info
        info.update(
            reference=reference_name,
            fast_ms=fast_ms,
            reference_ms=reference_ms,
            speedup=reference_ms / fast_ms,
            matmul_ceiling_tflops=ceilings.matmul_tflops,
            copy_ceiling_gbps=ceilings.copy_gbps,
        )
        if ratio_margin is None and not gpu:
            ratio_margin = CPU_RATIO_MARGIN
        if gpu and host_bound:
            ratio_margin = max(ratio_margin or 0.0, HOST_BOUND_RATIO_MARGIN)
            info["abs_margin"] = HOST_BOUND_ABS_MARGIN
        if ratio_margin is not None:
            info["ratio_margin"] = ratio_margin
        info["timed_as"] = "cuda_graph" if gpu and graphs else "eager"
        if flops:
            info["tflops"] = flops / fast_ms / 1e9
            info["pct_of_matmul"] = 100 * info["tflops"] / ceilings.matmul_tflops
        if bytes_moved:
            info["gbps"] = bytes_moved / fast_ms / 1e6
            info["pct_of_copy"] = 100 * info["gbps"] / ceilings.copy_gbps
        return info

    return run
