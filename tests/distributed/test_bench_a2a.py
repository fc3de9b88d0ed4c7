"""`moekit bench a2a` end to end on 2 gloo ranks: every path that fits, figures that make sense."""

import json

import pytest

from moekit.cli import main
from moekit.ep import DISPATCHERS

TWO_RANK_PATHS = [impl.name for impl in DISPATCHERS if impl.fn.supports(2, "cpu")[0]]


def test_bench_a2a_sweep_writes_json_and_plot(tmp_path, capfd):
    out, png = tmp_path / "a2a.json", tmp_path / "a2a.png"
    args = [
        "bench",
        "a2a",
        "--ranks",
        "2",
        "--runs",
        "2",
        "--sweep",
        "batch",
        "--values",
        "8,32",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(args) == 0
    printed, errors = capfd.readouterr()
    assert "batch=8" in printed and "batch=32" in printed
    assert "case 1 of" not in printed + errors and "━" not in errors  # the ranks' stderr is no terminal
    results = json.loads(out.read_text())["results"]
    assert {(r["config"], r["path"]) for r in results} == {
        (c, p) for c in ("batch=8", "batch=32") for p in TWO_RANK_PATHS
    }
    for r in results:
        assert r["dispatch_us"] > 0 and r["combine_us"] > 0 and r["offrank_gbps"] > 0
        assert (r["padding_fraction"] is None) == (r["path"] == "nccl")  # the fixed-slot paths report it
        if r["padding_fraction"] is not None:
            assert 0 <= r["padding_fraction"] < 1
    assert png.stat().st_size > 1000


def test_bench_a2a_rejects_experts_that_do_not_split():
    with pytest.raises(SystemExit, match=r"num_experts \(16\) must divide evenly over 3 ranks"):
        main(["bench", "a2a", "--ranks", "3"])
