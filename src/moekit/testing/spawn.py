"""Run a function on N ranks, one process each, with a process group set up and a deadline.

Used by the distributed tests and by the multi-rank benchmarks. A collective that hangs fails with
TimeoutError after `timeout_s` instead of hanging the caller.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.bench.profiling import PROFILE_DIR_ENV, profiled

# Never let NVLink multicast run on the shared GPU machines (KINDS.md): set in every rank we start.
SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_cpu_threads(processes: int) -> int:
    """Give this process its share of the cores among `processes` busy ones, times the pytest-xdist workers
    running beside it, and return it. Every torch process takes all cores by default: sixteen processes
    on sixteen cores then spin-wait on each other, running tiny CPU ops ten times slower than one core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // (processes * workers))
    torch.set_num_threads(threads)
    return threads


def _rank_main(rank, fn, world_size, port, backend, timeout_s, args, results) -> None:
    os.environ.update(SAFE_GPU_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # gloo ranks compute on the CPU, side by side
        share_cpu_threads(world_size)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        # serialised to bytes: a tensor sent through the queue as is lives in the rank's shared memory,
        # which is gone once the rank exits
        buffer = io.BytesIO()
        profile_dir = os.environ.get(PROFILE_DIR_ENV) if rank == 0 else None
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        with profiled(profile_dir and Path(profile_dir), device, label=f"rank{rank}"):
            result = fn(rank, world_size, *args)
        torch.save(result, buffer)
        results.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """Run fn(rank, world_size, *args) on world_size spawned ranks; return their results by rank.

    fn must be importable (module level). An exception on any rank is raised here; a rank that is
    still running after timeout_s is killed and TimeoutError raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend nccl with world_size {world_size} needs that many GPUs, found {torch.cuda.device_count()}"
        )
    os.environ.update(SAFE_GPU_ENV)
    results = mp.get_context("spawn").Queue()
    context = mp.start_processes(
        _rank_main,
        args=(fn, world_size, free_port(), backend, timeout_s, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    by_rank: dict[int, bytes] = {}
    # read while the ranks run: a rank cannot exit before its result has left the pipe (64 KiB)
    while len(by_rank) < world_size or not context.join(timeout=0.1):
        try:
            rank, payload = results.get(timeout=0.1)
            by_rank[rank] = payload
        except queue.Empty:
            if len(by_rank) < world_size and context.join(timeout=0):
                missing = sorted(set(range(world_size)) - set(by_rank))
                raise RuntimeError(f"ranks {missing} exited without a result") from None
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks of {fn.__name__} still running after {timeout_s:.0f} s")
    return [torch.load(io.BytesIO(by_rank[r]), weights_only=False) for r in range(world_size)]
