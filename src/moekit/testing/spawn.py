"""Run a function on N ranks, one process each, with a process group set up and a deadline.

spawn_ranks starts the ranks for one function; RankPool keeps them up for many calls (and whatever state the
functions leave in the ranks between calls). Used by the distributed tests, the multi-rank benchmarks and
the multi-GPU perf cases. A collective that hangs fails with TimeoutError after `timeout_s` instead of
hanging the caller.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
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


def rank_device(rank: int, backend: str) -> torch.device:
    """The device a spawned rank computes on: its own GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _init_rank(rank, world_size, port, backend, timeout_s) -> None:
    os.environ.update(SAFE_GPU_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # gloo ranks compute on the CPU, side by side
        share_cpu_threads(world_size)
    device_id = torch.device("cuda", rank) if backend == "nccl" else None  # NCCL need not guess the mapping
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), device_id=device_id
    )


def _as_bytes(result) -> bytes:
    """Serialised: a tensor sent through a queue as is lives in the rank's shared memory, gone once it exits."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def _check_world(world_size: int, backend: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend nccl with world_size {world_size} needs that many GPUs, found {torch.cuda.device_count()}"
        )


def _rank_main(rank, fn, world_size, port, backend, timeout_s, args, results) -> None:
    _init_rank(rank, world_size, port, backend, timeout_s)
    try:
        profile_dir = os.environ.get(PROFILE_DIR_ENV) if rank == 0 else None
        with profiled(profile_dir and Path(profile_dir), rank_device(rank, backend), label=f"rank{rank}"):
            result = fn(rank, world_size, *args)
        results.put((rank, _as_bytes(result)))
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """Run fn(rank, world_size, *args) on world_size spawned ranks; return their results by rank.

    fn must be importable (module level). An exception on any rank is raised here; a rank that is
    still running after timeout_s is killed and TimeoutError raised.
    """
    _check_world(world_size, backend)
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


def _serve(rank, world_size, port, backend, timeout_s, inboxes, outbox) -> None:
    """A RankPool rank: run each (fn, args) from its inbox until None comes, answering (rank, result, error)."""
    _init_rank(rank, world_size, port, backend, timeout_s)
    try:
        while (task := inboxes[rank].get()) is not None:
            fn, args = task
            try:
                outbox.put((rank, _as_bytes(fn(rank, world_size, *args)), None))
            except Exception:
                outbox.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """world_size ranks spawned once, each with the process group up, running every function sent to them;
    what a function leaves in its rank (a module-level cache) is there for the next call.

        with RankPool(2, backend="nccl") as ranks:
            ranks.run(build, ...)            # fn(rank, world_size, *args) on every rank
            timings = ranks.run(measure)     # results by rank

    A rank that raises makes run raise RuntimeError with its traceback, and a call still running after
    timeout_s raises TimeoutError; either closes the pool (the other ranks may wait in a collective)."""

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout_s: float = 120.0) -> None:
        _check_world(world_size, backend)
        os.environ.update(SAFE_GPU_ENV)
        spawn = mp.get_context("spawn")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._inboxes = [spawn.Queue() for _ in range(world_size)]
        self._outbox = spawn.Queue()
        self._context = mp.start_processes(
            _serve,
            args=(world_size, free_port(), backend, timeout_s, self._inboxes, self._outbox),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )

    def run(self, fn: Callable, *args) -> list:
        """fn(rank, world_size, *args) on every rank (fn importable); its results by rank."""
        if self._context is None:
            raise RuntimeError("this RankPool is closed")
        for inbox in self._inboxes:
            inbox.put((fn, args))
        deadline = time.monotonic() + self.timeout_s
        by_rank: dict[int, bytes] = {}
        while len(by_rank) < self.world_size:
            try:
                rank, payload, error = self._outbox.get(timeout=0.1)
            except queue.Empty:
                if not all(p.is_alive() for p in self._context.processes):
                    self.close()
                    raise RuntimeError(f"a rank of the pool exited during {fn.__name__}") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(
                        f"{fn.__name__} still running on the pool after {self.timeout_s:.0f} s"
                    ) from None
                continue
            if error is not None:
                self.close()
                raise RuntimeError(f"rank {rank} raised in {fn.__name__}:\n{error}")
            by_rank[rank] = payload
        return [torch.load(io.BytesIO(by_rank[r]), weights_only=False) for r in range(self.world_size)]

    def close(self) -> None:
        """Stops the ranks: asks them to finish, kills those still running a few seconds later."""
        if self._context is None:
            return
        for inbox in self._inboxes:
            inbox.put(None)
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in self._context.processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in self._context.processes:
            if process.is_alive():
                process.kill()
        self._context = None

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
