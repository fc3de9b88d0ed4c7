"""`moekit bench journey`: the optimisation levels of expert compute, each a registered backend, timed
on one problem (time, speedup over level 0, change over the previous level, TFLOP/s, % of the dense
matmul rate measured in the same run), and the same levels over a scale of token counts."""

from __future__ import annotations

from moekit.bench.ceilings import Ceilings
from moekit.bench.forward import ForwardTiming, time_forward
from moekit.bench.progress import CaseProgress
from moekit.bench.tables import NotRun
from moekit.config import MoEConfig
from moekit.experts import JOURNEY
from moekit.problem import make_problem


def run_journey(
    config: MoEConfig, tokens: int, device, ceilings: Ceilings, progress: CaseProgress, *, runs: int, warmup: int
) -> list[ForwardTiming]:
    """Every level on one problem of `tokens` tokens, each a case of progress."""
    problem = make_problem(config, tokens, seed=0, device=device)
    timings = []
    for level in JOURNEY:
        progress.case(f"{level} at T={tokens}")
        timings.append(time_forward(problem, level, ceilings, runs=runs, warmup=warmup))
    return timings


def journey_rows(timings: list[ForwardTiming]) -> list[list]:
    """Table rows: level, backend, ms, x level 0, x previous, TFLOP/s, % matmul (n/a where it did not run)."""
    rows, level0, previous = [], timings[0].ms, None
    for level, t in enumerate(timings):
        if t.ms is None:
            rows.append([level, t.backend, NotRun(t.backend, t.status), "-", "-", "-", "-"])
            continue
        speedup = f"{level0 / t.ms:.1f}x" if level0 else "-"
        step = f"{previous / t.ms:.2f}x" if previous else "-"
        rows.append([level, t.backend, t.ms, speedup, step, t.tflops, t.pct_of_matmul])
        previous = t.ms
    return rows


def scale_rows(by_tokens: dict[int, list[ForwardTiming]]) -> list[list]:
    """Table rows: backend, then its ms at each token count (n/a where it did not run)."""
    return [
        [timings[0].backend] + [t.ms if t.ms is not None else NotRun(t.backend, t.status) for t in timings]
        for timings in zip(*by_tokens.values())  # one level at every token count
    ]
