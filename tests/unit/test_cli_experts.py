"""`moekit bench journey` and `moekit bench experts` end to end on the CPU, small."""

import json

import pytest

from moekit.cli import main
from moekit.experts import JOURNEY


def test_journey_prints_every_level_and_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "journey.json", tmp_path / "journey.png"
    args = "bench journey --device cpu --tokens 64 --scale 32,64 --hidden 32 --ffn 48 --runs 2".split()
    args += ["--json", str(out), "--plot", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
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


def test_experts_runs_each_shape_and_backend(tmp_path, capsys):
    out = tmp_path / "experts.json"
    args = "bench experts --device cpu --shapes mixtral,qwen3 --shrink 64 --tokens-list 4,16 --runs 2".split()
    args += ["--backends", "grouped_loop,grouped_mm", "--json", str(out)]
    assert main(args) == 0
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


def test_experts_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown expert backend 'nope'"):
        main(["bench", "experts", "--backends", "nope"])
    with pytest.raises(SystemExit, match="--shapes: unknown shape 'gpt'"):
        main(["bench", "experts", "--shapes", "gpt", "--shrink", "64", "--tokens-list", "4"])
