"""The gate end to end on this machine: a planted 4x slowdown of a CPU path fails it, a clean rerun passes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASE = "test_expert_layout"


def _perf_run(out: Path, *extra: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/perf",
        "-m",
        "perf",
        "-k",
        CASE,
        "-p",
        "no:xdist",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out}",
        *extra,
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _gate(current: Path, baseline: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moekit", "gate", str(current), "--baseline", str(baseline), "--ratios-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_planted_slowdown_fails_the_gate_and_a_clean_run_passes(tmp_path):
    baseline, clean, slowed = tmp_path / "baseline.json", tmp_path / "clean.json", tmp_path / "slowed.json"
    _perf_run(baseline)
    _perf_run(clean)
    _perf_run(slowed, f"--plant-slowdown={CASE}")

    passed = _gate(clean, baseline)
    assert passed.returncode == 0, passed.stdout
    assert "0 of 1 cases failed" in passed.stdout

    failed = _gate(slowed, baseline)
    assert failed.returncode == 1, failed.stdout
    assert "FAIL speedup fell more than" in failed.stdout and CASE in failed.stdout
