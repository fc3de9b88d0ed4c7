"""`moekit bench journey` and `moekit bench experts` end to end on the CPU, small."""

import json
import os
import re
import sys
import time

import pytest

from moekit.cli import main
from moekit.experts import JOURNEY

TINY_JOURNEY = "bench journey --device cpu --tokens 64 --scale 32,64 --hidden 32 --ffn 48 --runs 2".split()


def shows_no_progress(out: str, err: str) -> bool:
    """No CaseProgress text, no rich bar on stderr (the tables on stdout draw with the bar's line)."""
    return "case 1 of" not in out + err and "━" not in err


def test_journey_prints_every_level_and_writes_json_and_plot(tmp_path, capfd):
    out, png = tmp_path / "journey.json", tmp_path / "journey.png"
    assert main([*TINY_JOURNEY, "--json", str(out), "--plot", str(png)]) == 0
    printed, errors = capfd.readouterr()
    assert shows_no_progress(printed, errors)  # not a terminal
    payload = json.loads(out.read_text())
    levels = payload["levels"]
    assert [t["backend"] for t in levels] == list(JOURNEY)
    for t in levels:
        assert t["backend"] in printed
        assert (t["ms"] is None) == (t["status"] != "ok")  # a level that did not run says why
        if t["ms"] is not None:
            assert t["ms"] > 0 and t["tflops"] > 0
    assert levels[0]["status"] == "ok"  # level 0 always runs
    assert set(payload["scale"]) == {"32", "64"}
    assert png.stat().st_size > 1000
    # a level that cannot run on the CPU: n/a in its cells, the reason once under each table
    assert re.search(r"│ compiled\s*│\s*n/a\s*│\s*n/a\s*│", printed), printed  # the scale table, not "uns"
    assert printed.count("n/a  compiled: unsupported: compiled is checked on GPU") == 2
    assert max(len(line) for line in printed.splitlines() if line.startswith("│")) < 100


@pytest.mark.parametrize("quiet", [False, True])
def test_journey_shows_progress_on_a_terminal_unless_quiet(quiet, capsys, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = "bench journey --device cpu --tokens 16 --scale 16 --hidden 16 --ffn 16 --runs 1".split()
    assert main(args + ["--quiet"] * quiet) == 0
    out, err = capsys.readouterr()
    if quiet:
        assert shows_no_progress(out, err)
    else:
        assert f"case 1 of {len(JOURNEY)}: naive at T=16" in err and "━" in err and "case 1 of" not in out


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter's default sizes")
def test_journey_under_the_interpreter_takes_small_defaults_and_says_why(tmp_path, capsys):
    out = tmp_path / "journey.json"
    start = time.perf_counter()
    assert main(["bench", "journey", "--device", "cpu", "--runs", "1", "--json", str(out)]) == 0
    assert time.perf_counter() - start < 60  # over 15 minutes at the CPU's default sizes
    assert "TRITON_INTERPRET=1: the levels with Triton kernels run in the Triton interpreter" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["tokens"] == 32 and "hidden_size=32" in payload["config"] and "ffn_size=64" in payload["config"]
    assert {t["backend"]: t["status"] for t in payload["levels"]}["triton_grouped"] == "ok"


def test_experts_runs_each_shape_and_backend(tmp_path, capfd):
    out = tmp_path / "experts.json"
    args = "bench experts --device cpu --shapes mixtral,qwen3 --shrink 64 --tokens-list 4,16 --runs 2".split()
    args += ["--backends", "grouped_loop,grouped_mm", "--json", str(out)]
    assert main(args) == 0
    printed, errors = capfd.readouterr()
    assert "mixtral" in printed and "qwen3" in printed
    assert shows_no_progress(printed, errors)
    results = json.loads(out.read_text())["results"]
    assert {(r["shape"], r["backend"], r["tokens"]) for r in results} == {
        (s, b, t) for s in ("mixtral", "qwen3") for b in ("grouped_loop", "grouped_mm") for t in (4, 16)
    }
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["weight_gbps"] > 0 for r in results)


def test_experts_reports_sizes_a_backend_cannot_take(tmp_path, capsys):
    out = tmp_path / "experts.json"
    args = "bench experts --device cpu --shapes qwen3 --shrink 256 --tokens-list 4 --runs 2".split()  # F = 3
    assert main([*args, "--backends", "grouped_loop,grouped_mm", "--json", str(out)]) == 0
    loop, grouped = json.loads(out.read_text())["results"]
    assert loop["status"] == "ok" and loop["ms"] > 0
    assert grouped["status"] == "unsupported: H and F must be multiples of 4, got 8 and 3" and grouped["ms"] is None
    printed = capsys.readouterr().out
    assert re.search(r"│ grouped_mm\s*│\s*4\s*│\s*n/a\s*│", printed), printed
    assert printed.count("n/a  grouped_mm: unsupported: H and F must be multiples of 4, got 8 and 3") == 1


def test_experts_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown expert backend 'nope'"):
        main(["bench", "experts", "--backends", "nope"])
    with pytest.raises(SystemExit, match="--shapes: unknown shape 'gpt'"):
        main(["bench", "experts", "--shapes", "gpt", "--shrink", "64", "--tokens-list", "4"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the FP8 kernels run on the CPU under the "
                    "Triton interpreter only")  # fmt: skip
def test_experts_fp8_table_has_the_bf16_speedups_and_no_queued_figures_without_graphs(tmp_path, capsys):
    out = tmp_path / "experts.json"
    args = "bench experts --device cpu --dtype fp8 --quant row --shapes mixtral --shrink 64 --tokens-list 4 --runs 2"
    assert main([*args.split(), "--quiet", "--json", str(out)]) == 0
    results = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert results["triton_grouped_fp8"]["status"] == "ok" and results["triton_grouped"]["status"] == "ok"
    assert results["cuda_graph_fp8"]["status"] == "unsupported: CUDA graphs need a CUDA device"
    assert all(r["queued_ms"] is None and r["queued_pct_of_copy"] is None for r in results.values())
    printed = capsys.readouterr().out
    assert "queued x bf16" in printed and "x best bf16" in printed
    speedup = results["triton_grouped"]["ms"] / results["triton_grouped_fp8"]["ms"]
    assert re.search(rf"│ triton_grouped_fp8 .*│\s*{speedup:.2f} │\s*- │", printed), printed


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda_graph", "triton_grouped"])
def test_graph_replays_are_also_timed_queued(backend):
    """A replayed forward gets the queued rate beside its synced one (at most the synced time, give or take
    noise: queuing only hides the launch latency); an eager backend gets none."""
    import torch

    from moekit import MoEConfig, make_problem
    from moekit.bench.ceilings import Ceilings
    from moekit.bench.forward import time_forward

    config = MoEConfig(hidden_size=256, ffn_size=512, num_experts=8, top_k=2, router="fused_select",
                       dtype=torch.bfloat16)  # fmt: skip
    problem = make_problem(config, 64, seed=0, device="cuda")
    t = time_forward(problem, backend, Ceilings(700.0, 4000.0), runs=10)
    assert t.status == "ok" and t.ms > 0
    if backend == "cuda_graph":
        assert 0 < t.queued_ms <= 1.5 * t.ms
        assert t.queued_pct_of_copy == pytest.approx(t.pct_of_copy * t.ms / t.queued_ms)
    else:
        assert t.queued_ms is None and t.queued_pct_of_copy is None
