"""The gate's rules on hand-made runs: ratio margins, absolute margins, missing cases, machine kinds."""

import json

import pytest

from moekit.bench.gate import compare_runs, load_run, plot_report, print_report
from moekit.cli import main


def run(kind="cpu", **cases):
    """A pytest-benchmark-shaped run: cases maps name -> (speedup, median seconds[, ratio_margin])."""
    benchmarks = []
    for name, (speedup, median, *margin) in cases.items():
        extra = {"speedup": speedup, **({"ratio_margin": margin[0]} if margin else {})}
        benchmarks.append({"fullname": f"tests/perf/x.py::{name}", "stats": {"median": median}, "extra_info": extra})
    return {"machine_info": {"moekit": {"kind": kind}}, "benchmarks": benchmarks}


def verdicts(baseline, current, ratios_only=False):
    return {v.case: v for v in compare_runs(baseline, current, ratios_only=ratios_only)}


def test_speedup_within_margin_passes_and_beyond_fails():
    base = run(a=(10.0, 1.0), b=(10.0, 1.0), c=(10.0, 1.0, 0.3), d=(10.0, 1.0, 0.3))
    now = run(a=(9.1, 1.0), b=(8.9, 1.0), c=(7.1, 1.0), d=(7.1, 1.0, 0.1))
    v = verdicts(base, now)
    assert v["a"].ok and not v["b"].ok and v["c"].ok
    assert not v["d"].ok  # the margin this run's case definition gives wins over the baseline's
    assert v["b"].reason == "speedup fell more than 10%"
    assert v["b"].speedup_change == pytest.approx(-0.11)


def test_planted_2x_slowdown_fails_even_the_wide_cpu_margin():
    v = verdicts(run(a=(3.0, 1e-3, 0.25)), run(a=(1.5, 2e-3, 0.25)), ratios_only=True)
    assert not v["a"].ok


def test_absolute_median_is_gated_only_when_asked():
    base, now = run(a=(2.0, 1.0)), run(a=(2.0, 1.3))
    assert verdicts(base, now, ratios_only=True)["a"].ok
    v = verdicts(base, now)["a"]
    assert not v.ok and v.reason == "median grew more than 25%"


def test_a_case_may_widen_its_absolute_margin():
    base = run(a=(2.0, 1.0), b=(2.0, 1.0))
    base["benchmarks"][0]["extra_info"]["abs_margin"] = 1.0  # a host-bound case: medians follow the host CPU
    now = run(a=(2.0, 1.6), b=(2.0, 1.6))
    v = verdicts(base, now)
    assert v["a"].ok and not v["b"].ok
    now = run(a=(2.0, 2.1))
    assert verdicts(base, now)["a"].reason == "median grew more than 100%"


def test_missing_case_fails_and_new_case_is_reported():
    v = verdicts(run(a=(2.0, 1.0), gone=(2.0, 1.0)), run(a=(2.0, 1.0), fresh=(5.0, 1.0)))
    assert not v["gone"].ok and v["gone"].reason == "missing from this run"
    assert v["fresh"].ok and v["fresh"].reason.startswith("new")


def test_other_machine_kind_is_never_compared():
    with pytest.raises(ValueError, match="measured on 'h100', this run on 'h200'"):
        compare_runs(run("h100", a=(2.0, 1.0)), run("h200", a=(2.0, 1.0)), ratios_only=False)


def test_cli_exit_code_table_and_plot(tmp_path, capsys):
    base, now = tmp_path / "base.json", tmp_path / "now.json"
    base.write_text(json.dumps(run(a=(4.0, 1.0), b=(2.0, 1.0))))
    now.write_text(json.dumps(run(a=(4.1, 1.0), b=(1.0, 1.0))))
    png = tmp_path / "gate.png"
    assert main(["gate", str(now), "--baseline", str(base), "--plot", str(png)]) == 1
    out = capsys.readouterr().out
    assert "FAIL speedup fell more than 10%" in out and "1 of 2 cases failed: b" in out
    assert png.stat().st_size > 1000
    assert main(["gate", str(base), "--baseline", str(base)]) == 0


def test_non_perf_json_is_rejected(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="is not a moekit perf run"):
        load_run(path)


def test_report_prints_every_case(capsys):
    print_report(compare_runs(run(a=(2.0, 1.0)), run(a=(2.0, 1.0), z=(1.0, 1.0)), ratios_only=True), "t")
    out = capsys.readouterr().out
    assert "a" in out and "z" in out


def test_plot_skips_cases_without_both_runs(tmp_path):
    plot_report(compare_runs(run(a=(2.0, 1.0)), run(z=(1.0, 1.0)), ratios_only=True), tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").exists()
