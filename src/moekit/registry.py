"""A registry per pipeline stage: name -> implementation, with what each one can run on.

Tests walk the registries, so an implementation is held to the oracle as soon as it is registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass

import torch

Support = tuple[bool, str]


def runs_anywhere(device: torch.device, dtype: torch.dtype) -> Support:
    return True, ""


def any_size(dtype: torch.dtype) -> int:
    return 1


@dataclass(frozen=True)
class Implementation:
    """One registered implementation of a stage.

    supports(device, dtype) -> (ok, reason); size_multiple(dtype): the oracle tests draw H and F as
    multiples of this. For torch._grouped_mm it is a requirement (16-byte rows; other sizes raise); for
    the Triton backends a compile-cost choice (their kernels' own tests draw odd sizes). trains: its
    gradients are held to the oracle's (a stage whose registry guards training refuses the others'
    grad-requiring calls).
    """

    name: str
    fn: Callable
    supports: Callable[[torch.device, torch.dtype], Support]
    size_multiple: Callable[[torch.dtype], int] = any_size
    trains: bool = False


def needs_grad(value) -> bool:
    """Whether value, or a tensor field of it (a weights dataclass), requires grad."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if is_dataclass(value):
        return any(needs_grad(getattr(value, f.name)) for f in fields(value))
    return isinstance(value, (list, tuple)) and any(needs_grad(v) for v in value)


class Registry:
    """Implementations of one stage, by name, in registration order.

    guard_training: an implementation registered with trains=False, called in grad mode with an argument that
    requires grad, raises a ValueError naming itself and the ones that train, before it computes anything
    (rather than an autograd error from deep inside, or gradients nobody checked).
    """

    def __init__(self, stage: str, guard_training: bool = False) -> None:
        self.stage = stage
        self.guard_training = guard_training
        self._entries: dict[str, Implementation] = {}

    def register(
        self,
        name: str,
        supports: Callable[[torch.device, torch.dtype], Support] = runs_anywhere,
        size_multiple: Callable[[torch.dtype], int] = any_size,
        trains: bool = False,
    ):
        """Decorator: register fn under name; see Implementation for supports, size_multiple and trains.
        Returns fn itself; the registry holds the guarded fn where the stage guards training."""

        def decorate(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.stage} {name!r} is registered twice")
            held = fn if trains or not self.guard_training else self._refusing_grad(name, fn)
            self._entries[name] = Implementation(name, held, supports, size_multiple, trains)
            return fn

        return decorate

    def _refusing_grad(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            if torch.is_grad_enabled() and (needs_grad(args) or needs_grad(tuple(kwargs.values()))):
                raise ValueError(
                    f"{self.stage} {name!r} has no backward; with inputs that require grad use one that trains: "
                    f"{self.training_names()} (or run {name!r} under torch.no_grad())"
                )
            return fn(*args, **kwargs)

        return guarded

    def training_names(self) -> list[str]:
        """The names registered with trains=True."""
        return [name for name, impl in self._entries.items() if impl.trains]

    def get(self, name: str) -> Implementation:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.stage} {name!r}; expected one of {self.names()}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[Implementation]:
        return iter(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
