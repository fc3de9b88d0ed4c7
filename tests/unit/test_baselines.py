"""The committed baselines are real moekit perf runs that the gate and pytest-benchmark both read."""

import subprocess
import sys
from pathlib import Path

import pytest

from moekit.bench.gate import load_run, machine_kind_of

COMPARE = Path(sys.executable).parent / "pytest-benchmark"  # the command of this environment
BASELINES = sorted((Path(__file__).resolve().parents[2] / "baselines").glob("*.json"))


def test_there_is_a_cpu_baseline():
    assert "cpu.json" in [p.name for p in BASELINES]


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.name)
def test_baseline_is_a_moekit_run_of_its_kind(path):
    run = load_run(path)
    assert machine_kind_of(run) == path.stem
    assert run["machine_info"]["moekit"]["torch"]
    assert run["benchmarks"]
    for case in run["benchmarks"]:
        assert case["extra_info"]["speedup"] > 0 and case["extra_info"]["reference"], case["fullname"]


@pytest.mark.skipif(not COMPARE.exists(), reason=f"no pytest-benchmark command beside {sys.executable}")
def test_pytest_benchmark_compare_reads_the_baselines():
    result = subprocess.run([str(COMPARE), "compare", *map(str, BASELINES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test_expert_layout" in result.stdout
