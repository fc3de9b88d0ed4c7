"""Argument checks that run before any kernel: each error names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

INDEX_DTYPES = (torch.int32, torch.int64)

_values_trusted: ContextVar[bool] = ContextVar("moekit_values_trusted", default=False)


@contextmanager
def trusted_values() -> Iterator[None]:
    """Inside, the value checks that wait for the device (NaN, ids in range) are skipped: for hot paths whose
    values come from moekit itself (a router's ids reach the experts in range by construction), so a forward
    runs without a host synchronisation. Shape, dtype and device checks still run."""
    token = _values_trusted.set(True)
    try:
        yield
    finally:
        _values_trusted.reset(token)


def _skip_value_checks() -> bool:
    # an exported graph (ONNX) cannot branch on values either: shapes only
    return _values_trusted.get() or torch.compiler.is_exporting()


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    floating: bool = False,
) -> None:
    """Raise TypeError/ValueError unless t is a tensor of the given rank, shape (None = any) and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if t holds NaN or inf (synchronises with the device; skipped under torch.export and
    trusted_values())."""
    if _skip_value_checks():
        return
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")


def check_ids_in_range(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless every id is in [0, num_experts) (synchronises with the device; skipped under
    torch.export and trusted_values())."""
    if _skip_value_checks():
        return
    if ids.numel() and not bool(((ids >= 0) & (ids < num_experts)).all()):
        raise ValueError(f"{name} must lie in [0, {num_experts}), got values in [{int(ids.min())}, {int(ids.max())}]")


def capturing_cuda_graph(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream of t's device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> None:
    """topk_ids [T, K] int32/int64 in [0, E), topk_weights [T, K] floating.

    The range check waits for the device: it is skipped under trusted_values() and while a CUDA graph is
    captured (a capture cannot wait; the replayed ids come from a router, in range by construction).
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), floating=True)
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_weights must be on {topk_ids.device}, got {topk_weights.device}")
    if not capturing_cuda_graph(topk_ids):
        check_ids_in_range("topk_ids", topk_ids, num_experts)
