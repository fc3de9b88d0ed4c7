"""Side streams on CUDA: work issued on one runs beside the current stream's (the sending kernels, the
shared experts) and the current stream waits for it where its results are read. Off CUDA, no stream:
the work runs in the caller's order."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new stream on a CUDA device; None elsewhere."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def reused_side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """One side stream per CUDA device, the same for every caller; None elsewhere."""
    if device.type != "cuda":
        return None
    return _reused(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _reused(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(index)


@contextmanager
def on_stream(stream: torch.cuda.Stream | None):
    """Work issued inside runs on stream, after everything queued so far on the current stream (inline
    when stream is None)."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield


def join(stream: torch.cuda.Stream | None) -> None:
    """The current stream waits for everything queued so far on stream (nothing when None)."""
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
