"""The expert-parallel layer study, run on every rank: per-phase times of the synchronous layer, the
layer synchronous and overlapped, load skew, and (on request) the outputs for a check against the oracle.

  T_comm    = T_dispatch + T_combine
  T_compute = T_route + T_experts + T_shared
  eta_overlap = (T_comm + T_compute - T_layer_overlapped) / min(T_comm, T_compute): 1.0 when the shorter
  part is fully hidden, 0 when nothing overlaps, negative when overlapping costs more than it hides.
Each phase is timed on its own after a barrier (median of `runs`); a rank reports its own times, and tables
show the slowest rank's (the layer is as fast as its slowest rank). With a fixed-shape dispatcher
(nvshmem_triton_graph, symmetric_triton_graph) on GPUs every phase, the layers included, is captured in a CUDA
graph and its replays are timed: the decode setting, where Python and launch overheads would otherwise
dominate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from moekit.bench.timing import as_cuda_graph, time_once
from moekit.config import MoEConfig
from moekit.ep import DISPATCHERS
from moekit.ep.forward import shared_experts
from moekit.ep.local_experts import local_expert_forward
from moekit.ep.symmetric import SymmetricLayout
from moekit.layer import MoELayer
from moekit.problem import make_problem
from moekit.routing import route
from moekit.routing.load_stats import tokens_per_expert
from moekit.testing.spawn import rank_device
from moekit.weights import router_logits

PHASES = ("route", "dispatch", "experts", "combine", "shared", "layer_sync", "layer_overlapped")


@dataclass(frozen=True)
class EPCase:
    """One layer to study: every rank holds tokens_per_rank tokens drawn from one seeded problem."""

    config: MoEConfig
    tokens_per_rank: int
    backend: str
    dispatcher: str
    chunks: int = 2
    own_first: bool = False
    capacity_factor: float | None = None  # symmetric dispatchers: see capacity
    fused_combine: bool = False  # both layers (moekit.ep.ep_forward)
    skew_experts: int = 0
    skew_bias: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.capacity_factor is None:
            return
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if not issubclass(DISPATCHERS.get(self.dispatcher).fn, SymmetricLayout):
            raise ValueError(
                f"a capacity factor applies to the symmetric dispatchers (symmetric, symmetric_triton), not "
                f"{self.dispatcher!r}"
            )

    @property
    def capacity(self) -> int | None:
        """Pairs per (source rank, expert) the symmetric dispatchers keep, from capacity_factor (None: theirs)."""
        if self.capacity_factor is None:
            return None
        config = self.config
        return math.ceil(self.capacity_factor * self.tokens_per_rank * config.top_k / config.num_experts)

    @property
    def dispatcher_options(self) -> dict | None:
        return None if self.capacity is None else {"capacity": self.capacity, "overflow": "drop"}


@dataclass(frozen=True)
class EPResult:
    """Median ms per phase on one rank, the load it saw, and (check) its output."""

    rank: int
    ms: dict[str, float]
    tokens_per_expert: list[int]  # of this rank's tokens, over all E experts
    y: torch.Tensor | None
    dropped: int = 0  # pairs this rank's dispatcher dropped over its capacity in the last layer call

    @property
    def comm_ms(self) -> float:
        return self.ms["dispatch"] + self.ms["combine"]

    @property
    def compute_ms(self) -> float:
        return self.ms["route"] + self.ms["experts"] + self.ms["shared"]


def eta_overlap(comm_ms: float, compute_ms: float, layer_ms: float) -> float:
    """(T_comm + T_compute - T_layer) / min(T_comm, T_compute); nan when either part is 0."""
    shorter = min(comm_ms, compute_ms)
    return (comm_ms + compute_ms - layer_ms) / shorter if shorter > 0 else float("nan")


@dataclass
class PreparedStudy:
    """One EPCase set up on this rank: every phase as a callable (CUDA-graph replays with a fixed-shape
    dispatcher on GPUs), and the state the phases pass along (routing, received rows, the layer's y)."""

    phases: dict[str, Callable[[], object]]
    state: dict


def prepare_study(rank: int, world_size: int, case: EPCase, device: torch.device) -> PreparedStudy:
    """Build the layer of an EPCase on this rank (called on every rank) and its phases."""
    config, T = case.config, case.tokens_per_rank
    problem = make_problem(
        config, T * world_size, seed=case.seed, device=device, skew_experts=case.skew_experts,
        skew_amount=case.skew_bias,
    )  # fmt: skip
    x = problem.x[rank * T : (rank + 1) * T]
    graphs = DISPATCHERS.get(case.dispatcher).fn.fixed_shapes and device.type == "cuda"
    layer = MoELayer(
        config, backend=case.backend, dispatcher=case.dispatcher, weights=problem.weights, max_tokens=T,
        device=device, chunks=case.chunks, own_first=case.own_first, check_values=not graphs,
        dispatcher_options=case.dispatcher_options, fused_combine=case.fused_combine,
    )  # fmt: skip
    weights, dispatcher = layer.weights, layer.dispatcher
    state = {"dispatcher": dispatcher}

    def route_phase():
        logits = router_logits(x, weights)
        state["routing"] = route(logits, config, weights.score_correction_bias, check_values=not graphs)

    def dispatch_phase():
        routing = state["routing"]
        state["received"] = dispatcher.dispatch(x, routing.topk_ids, routing.topk_weights)

    def experts_phase():
        recv_x, meta, _ = state["received"]
        state["expert_out"] = local_expert_forward(recv_x, meta, weights, dispatcher, case.backend)

    def combine_phase():
        dispatcher.combine(state["expert_out"], state["received"][2])

    def layer_phase(overlapped: bool):
        def run():
            layer.shared_overlap, layer.chunks = overlapped, case.chunks if overlapped else 1
            layer.own_first = overlapped and case.own_first
            state["y"] = layer(x)

        return run

    phases = {
        "route": route_phase,
        "dispatch": dispatch_phase,
        "experts": experts_phase,
        "combine": combine_phase,
        "shared": lambda: shared_experts(x, weights),
        "layer_sync": layer_phase(False),
        "layer_overlapped": layer_phase(True),
    }
    if graphs:  # a fixed-shape dispatcher: every phase captured and timed as replays, in pipeline order
        for name in PHASES:
            phases[name] = as_cuda_graph(phases[name])
            phases[name]()  # fills the outputs the next phase's capture reads
    return PreparedStudy(phases, state)


def time_phases(study: PreparedStudy, device: torch.device, runs: int) -> dict[str, float]:
    """Median ms of each phase on this rank, each call after a barrier, two warm-up rounds first."""
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for i in range(runs + 2):
        for name in PHASES:
            dist.barrier()
            ms = time_once(study.phases[name], device)
            if i >= 2:
                times[name].append(ms)
    return {name: statistics.median(values) for name, values in times.items()}


def study_rank(rank: int, world_size: int, case: EPCase, runs: int, check: bool, backend: str) -> EPResult:
    """Entry point of each spawned rank (moekit.testing.spawn): time one EPCase."""
    device = rank_device(rank, backend)
    study = prepare_study(rank, world_size, case, device)
    ms = time_phases(study, device, runs)
    counts = tokens_per_expert(study.state["routing"].topk_ids, case.config.num_experts)
    y = study.state["y"].cpu() if check else None
    return EPResult(rank, ms, counts.cpu().tolist(), y, getattr(study.state["dispatcher"], "last_dropped", 0))


def slowest(results: list[EPResult]) -> dict[str, float]:
    """Per phase, the largest median over the ranks."""
    return {name: max(r.ms[name] for r in results) for name in PHASES}


def as_dict(result: EPResult) -> dict:
    out = asdict(result)
    out.pop("y")
    return out


__all__ = [
    "PHASES", "EPCase", "EPResult", "PreparedStudy", "as_dict", "eta_overlap", "prepare_study", "slowest",
    "study_rank", "time_phases",
]  # fmt: skip
