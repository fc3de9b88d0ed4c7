"""--profile DIR: a trace viewers can open, a top-kernel table, and rank 0's trace for spawned ranks."""

import json
import os

import torch

from moekit.bench.profiling import PROFILE_DIR_ENV, profiled, top_kernels
from moekit.cli import main
from moekit.testing.spawn import spawn_ranks


def _traces(directory):
    return sorted(directory.glob("*.pt.trace.json"))


def _assert_chrome_trace(path, op_name: str) -> None:
    trace = json.loads(path.read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert op_name in names, f"{op_name} not in the trace {path.name}"


def test_bench_command_writes_a_trace_and_prints_the_top_operators(tmp_path, capsys):
    args = ["bench", "router", "--tokens", "128", "--hidden", "32", "--experts", "8", "--topk", "2"]
    args += ["--router", "softmax_topk", "--runs", "2", "--device", "cpu", "--profile", str(tmp_path / "prof")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top CPU operators by self time" in out and "aten::" in out
    [trace] = _traces(tmp_path / "prof")
    _assert_chrome_trace(trace, "aten::_softmax")


def test_profiled_sets_the_rank_variable_only_inside_the_block(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    with profiled(tmp_path, torch.device("cpu"), label="t"):
        assert os.environ[PROFILE_DIR_ENV] == str(tmp_path)
        torch.randn(8, 8).sum()
    assert PROFILE_DIR_ENV not in os.environ
    assert [p.name.split(".")[0] for p in _traces(tmp_path)] == ["t"]


def test_top_kernels_are_sorted_and_their_shares_add_up():
    a = torch.randn(128, 128)
    with torch.profiler.profile() as prof:
        for _ in range(4):
            a @ a
        a.exp()
    kernels = top_kernels(prof, torch.device("cpu"), limit=100)
    times = [k.total_ms for k in kernels]
    assert times == sorted(times, reverse=True)
    assert abs(sum(k.share for k in kernels) - 1) < 1e-6
    assert next(k for k in kernels if k.name == "aten::mm").calls == 4


def _matmul_rank(rank: int, world_size: int) -> int:
    a = torch.randn(64, 64)
    (a @ a).sum()
    return rank


def test_spawned_rank_zero_writes_its_own_trace(tmp_path):
    with profiled(tmp_path, torch.device("cpu"), label="parent"):
        assert spawn_ranks(_matmul_rank, 2) == [0, 1]
    rank_traces = [p for p in _traces(tmp_path) if p.name.startswith("rank")]
    assert [p.name.split(".")[0] for p in rank_traces] == ["rank0"]
    _assert_chrome_trace(rank_traces[0], "aten::mm")
