"""`--profile DIR`: a torch.profiler trace of a command (TensorBoard, Chrome and Perfetto read it) and a
printed table of the top kernels, so "where does the time go" needs no viewer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from moekit.bench.tables import print_table

PROFILE_DIR_ENV = "MOEKIT_PROFILE_DIR"
NAME_WIDTH = 96  # CUTLASS template names run to thousands of characters: the head tells them apart


@dataclass(frozen=True)
class KernelTime:
    """One kernel (GPU) or operator (CPU) summed over its calls; share is of all self time recorded."""

    name: str
    calls: int
    total_ms: float
    share: float


def top_kernels(prof: profile, device: torch.device, limit: int = 15) -> list[KernelTime]:
    """The `limit` kernels with the most self time: GPU kernels on CUDA, operators on the CPU."""
    gpu = device.type == "cuda"

    def self_us(event) -> float:
        return event.self_device_time_total if gpu else event.self_cpu_time_total

    # on CUDA the kernels alone: the operators that launched them also carry their kernels' device time
    kind = DeviceType.CUDA if gpu else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and self_us(e) > 0]
    total = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    return [KernelTime(e.key[:NAME_WIDTH], e.count, self_us(e) / 1e3, self_us(e) / total) for e in events[:limit]]


@contextmanager
def profiled(out_dir: Path | None, device: torch.device, label: str = "moekit") -> Iterator[None]:
    """Profile the block into out_dir/<label>.<id>.pt.trace.json and print the top kernels; nothing
    happens without out_dir. Ranks spawned inside the block (moekit.testing.spawn) find out_dir in
    PROFILE_DIR_ENV and rank 0 profiles itself the same way (label "rank0")."""
    if out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before = os.environ.get(PROFILE_DIR_ENV)
    os.environ[PROFILE_DIR_ENV] = str(out_dir)
    try:
        with profile(activities=activities, on_trace_ready=tensorboard_trace_handler(str(out_dir), label)) as prof:
            yield
    finally:
        if before is None:
            del os.environ[PROFILE_DIR_ENV]
        else:
            os.environ[PROFILE_DIR_ENV] = before
    kernels = top_kernels(prof, device)
    kind = "GPU kernels" if device.type == "cuda" else "CPU operators"
    if kernels:
        rows = [[k.name, k.calls, k.total_ms, f"{100 * k.share:.1f}%"] for k in kernels]
        print_table(f"{label}: top {kind} by self time", ["name", "calls", "total ms", "share"], rows)
    else:
        print(f"{label}: no {kind} ran in this process (spawned ranks write their own traces)")
    print(f"{label}: trace in {out_dir} (TensorBoard, chrome://tracing or ui.perfetto.dev)")


__all__ = ["PROFILE_DIR_ENV", "KernelTime", "profiled", "top_kernels"]
