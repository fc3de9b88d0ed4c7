"""skip_a2a: one rank, nothing leaves the device; the nccl path's code with no collective at all
(every dispatcher skips communication on a group of one rank; this name makes the choice explicit)."""

from __future__ import annotations

from moekit.ep.nccl import NcclDispatcher
from moekit.ep.registry import DISPATCHERS
from moekit.registry import Support


@DISPATCHERS.register("skip_a2a", trains=True)
class SkipA2ADispatcher(NcclDispatcher):
    """The nccl path restricted to a group of one rank (ValueError on a larger group)."""

    name = "skip_a2a"

    @classmethod
    def supports(cls, world_size: int, device_type: str) -> Support:
        if world_size != 1:
            return False, "skip_a2a runs on one rank only (nothing is communicated)"
        return True, ""
