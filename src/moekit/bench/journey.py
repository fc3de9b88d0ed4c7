"""`moekit bench journey`: the optimisation levels of expert compute, each a registered backend, timed
on one problem (time, speedup over level 0, change over the previous level, TFLOP/s, % of the dense
matmul rate measured in the same run), and the same levels over a scale of token counts."""

from __future__ import annotations

from moekit.bench.ceilings import Ceilings
from moekit.bench.forward import ForwardTiming, time_forward
from moekit.config import MoEConfig
from moekit.experts import JOURNEY
from moekit.problem import make_problem


def run_journey(config: MoEConfig, tokens: int, device, ceilings: Ceilings, runs: int) -> list[ForwardTiming]:
    problem = make_problem(config, tokens, seed=0, device=device)
    return [time_forward(problem, level, ceilings, runs=runs) for level in JOURNEY]


def journey_rows(timings: list[ForwardTiming]) -> list[list]:
    """Table rows: level, backend, ms, x level 0, x previous, TFLOP/s, % matmul (or the status)."""
    rows, level0, previous = [], timings[0].ms, None
    for level, t in enumerate(timings):
        if t.ms is None:
            rows.append([level, t.backend, t.status, "-", "-", "-", "-"])
            continue
        speedup = f"{level0 / t.ms:.1f}x" if level0 else "-"
        step = f"{previous / t.ms:.2f}x" if previous else "-"
        rows.append([level, t.backend, t.ms, speedup, step, t.tflops, t.pct_of_matmul])
        previous = t.ms
    return rows
