"""The perf regression gate: compare a pytest-benchmark JSON run with the committed baseline.

A case fails when its speedup over its reference path (measured in the same run, in extra_info)
falls by more than its margin (extra_info["ratio_margin"] of this run, else of the baseline, else
10%), or, unless ratios_only, when its absolute median grows by more than abs_margin. Runs of
different machine kinds are never compared: that is an error, not a pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RATIO_MARGIN = 0.10
DEFAULT_ABS_MARGIN = 0.25


@dataclass(frozen=True)
class Verdict:
    """One case side by side: baseline and current speedup and median, and whether it passes."""

    case: str
    baseline_speedup: float | None
    current_speedup: float | None
    baseline_median_ms: float | None
    current_median_ms: float | None
    margin: float
    ok: bool
    reason: str

    @property
    def speedup_change(self) -> float | None:
        if self.baseline_speedup and self.current_speedup is not None:
            return self.current_speedup / self.baseline_speedup - 1
        return None

    @property
    def median_change(self) -> float | None:
        if self.baseline_median_ms and self.current_median_ms is not None:
            return self.current_median_ms / self.baseline_median_ms - 1
        return None


def load_run(path: Path) -> dict:
    """A pytest-benchmark JSON file, checked to carry moekit's machine kind."""
    run = json.loads(Path(path).read_text())
    if "benchmarks" not in run or "moekit" not in run.get("machine_info", {}):
        raise ValueError(f"{path} is not a moekit perf run (pytest --benchmark-json from tests/perf)")
    return run


def machine_kind_of(run: dict) -> str:
    return run["machine_info"]["moekit"]["kind"]


def _cases(run: dict) -> dict[str, dict]:
    return {b["fullname"]: b for b in run["benchmarks"]}


def _case_setting(key: str, now: dict | None, before: dict | None, default: float) -> float:
    """A margin the case defines in extra_info: this run's (the case's definition lives in tests/perf), else
    the baseline's, else the default."""
    for case in (now, before):
        if case and key in case["extra_info"]:
            return case["extra_info"][key]
    return default


def compare_runs(
    baseline: dict, current: dict, *, ratios_only: bool, abs_margin: float = DEFAULT_ABS_MARGIN
) -> list[Verdict]:
    """One Verdict per case of either run (a baseline case missing now fails; a new case passes as new).
    A case's own ratio_margin and abs_margin (extra_info; this run's, else the baseline's) override the
    defaults."""
    if machine_kind_of(baseline) != machine_kind_of(current):
        raise ValueError(
            f"the baseline was measured on {machine_kind_of(baseline)!r}, this run on "
            f"{machine_kind_of(current)!r}: runs of different machine kinds are not compared"
        )
    old, new = _cases(baseline), _cases(current)
    verdicts = []
    for name in sorted(old.keys() | new.keys()):
        before, now = old.get(name), new.get(name)
        margin = _case_setting("ratio_margin", now, before, DEFAULT_RATIO_MARGIN)
        case_abs_margin = _case_setting("abs_margin", now, before, abs_margin)
        speedups = [c["extra_info"]["speedup"] if c else None for c in (before, now)]
        medians = [c["stats"]["median"] * 1e3 if c else None for c in (before, now)]
        ok, reason = True, "ok"
        if now is None:
            ok, reason = False, "missing from this run"
        elif before is None:
            reason = "new: not in the baseline"
        elif speedups[1] < speedups[0] * (1 - margin):
            ok, reason = False, f"speedup fell more than {margin:.0%}"
        elif not ratios_only and medians[1] > medians[0] * (1 + case_abs_margin):
            ok, reason = False, f"median grew more than {case_abs_margin:.0%}"
        verdicts.append(Verdict(name.split("::")[-1], *speedups, *medians, margin, ok, reason))
    return verdicts


def _pct(change: float | None) -> str:
    return "-" if change is None else f"{change:+.1%}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_report(verdicts: list[Verdict], title: str) -> None:
    """Every case side by side as a rich table."""
    from moekit.bench.tables import print_table

    columns = [
        "case",
        "speedup base",
        "speedup now",
        "change",
        "margin",
        "median ms base",
        "median ms now",
        "change",
        "verdict",
    ]
    rows = [
        [
            v.case,
            _num(v.baseline_speedup, ".3g"),
            _num(v.current_speedup, ".3g"),
            _pct(v.speedup_change),
            f"{v.margin:.0%}",
            _num(v.baseline_median_ms, ".4g"),
            _num(v.current_median_ms, ".4g"),
            _pct(v.median_change),
            ("PASS " if v.ok else "FAIL ") + v.reason,
        ]
        for v in verdicts
    ]
    print_table(title, columns, rows)


def plot_report(verdicts: list[Verdict], path: Path, title: str) -> None:
    """Bars of baseline and current speedup per case, failing cases in red (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = [v for v in verdicts if v.baseline_speedup is not None and v.current_speedup is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(both) + 2), 4.5))
    xs = range(len(both))
    ax.bar([x - 0.2 for x in xs], [v.baseline_speedup for v in both], 0.4, label="baseline", color="0.6")
    ax.bar(
        [x + 0.2 for x in xs],
        [v.current_speedup for v in both],
        0.4,
        label="now",
        color=["tab:blue" if v.ok else "tab:red" for v in both],
    )
    ax.set_xticks(list(xs), [v.case for v in both], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the reference path")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
