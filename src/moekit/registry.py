"""A registry per pipeline stage: name -> implementation, with what each one can run on.

Tests walk the registries, so an implementation is held to the oracle as soon as it is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    the Triton backends a compile-cost choice (their kernels' own tests draw odd sizes).
    """

    name: str
    fn: Callable
    supports: Callable[[torch.device, torch.dtype], Support]
    size_multiple: Callable[[torch.dtype], int] = any_size


class Registry:
    """Implementations of one stage, by name, in registration order."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._entries: dict[str, Implementation] = {}

    def register(
        self,
        name: str,
        supports: Callable[[torch.device, torch.dtype], Support] = runs_anywhere,
        size_multiple: Callable[[torch.dtype], int] = any_size,
    ):
        """Decorator: register fn under name; see Implementation for supports and size_multiple."""

        def decorate(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.stage} {name!r} is registered twice")
            self._entries[name] = Implementation(name, fn, supports, size_multiple)
            return fn

        return decorate

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
