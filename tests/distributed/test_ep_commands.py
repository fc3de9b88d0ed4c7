"""`moekit layer` and `moekit bench ep` on gloo ranks, small: tables, JSON, the oracle check, load skew."""

import json
import math
import re

import pytest

from moekit.bench.ep import PHASES, eta_overlap
from moekit.cli import main

SMALL = ["--hidden", "32", "--ffn", "32", "--experts", "8", "--topk", "2", "--batch", "2", "--seq", "16", "--runs", "2"]


def test_eta_overlap_is_one_when_the_shorter_part_is_hidden_and_zero_when_nothing_overlaps():
    assert eta_overlap(10.0, 20.0, 20.0) == 1.0
    assert eta_overlap(10.0, 20.0, 30.0) == 0.0
    assert eta_overlap(10.0, 20.0, 25.0) == 0.5
    assert math.isnan(eta_overlap(0.0, 20.0, 20.0))


def test_layer_command_checks_against_the_oracle_and_reports_every_phase(tmp_path, capsys):
    out = tmp_path / "layer.json"
    args = ["layer", *SMALL, "--shared", "1", "--dispatcher", "symmetric", "--chunks", "3", "--own-first", "--check"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative error vs oracle" in printed and "PASS" in printed and "own rank first" in printed
    payload = json.loads(out.read_text())
    assert len(payload["ranks"]) == 2
    for rank in payload["ranks"]:
        assert set(rank["ms"]) == set(PHASES) and all(v > 0 for v in rank["ms"].values())
        assert sum(rank["tokens_per_expert"]) == 2 * 16 * 2  # T x K pairs of this rank
    assert payload["summary"]["comm"] > 0 and payload["summary"]["compute"] > 0


def test_layer_command_drops_over_a_capacity_and_reports_it(capsys):
    """capacity 0.5 x the mean pairs per (rank, expert): pairs are dropped, counted, and the check fails."""
    args = ["layer", *SMALL, "--dispatcher", "symmetric", "--capacity-factor", "0.5", "--check"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    dropped = re.search(r"pairs dropped over capacity 4 \(all ranks, last call\)\s*│\s*(\d+)", printed)
    assert dropped and int(dropped.group(1)) > 0 and "FAIL" in printed, printed
    assert main(["layer", *SMALL, "--dispatcher", "symmetric", "--capacity-factor", "4", "--check"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"pairs dropped over capacity 32 \(all ranks, last call\)\s*│\s*0 ", printed), printed


def test_bench_ep_balances_a_skewed_load_with_sinkhorn(tmp_path, capfd):
    out = tmp_path / "ep.json"
    args = ["bench", "ep", *SMALL, "--router", "softmax_topk", "--router", "sinkhorn"]
    args += ["--skew-experts", "1", "--skew-bias", "4", "--json", str(out)]
    assert main(args) == 0
    printed, errors = capfd.readouterr()
    assert "ΔT_select" in printed
    assert "case 1 of" not in printed + errors and "━" not in errors  # not a terminal: no progress
    baseline, sinkhorn = json.loads(out.read_text())["results"]
    assert (baseline["router"], sinkhorn["router"]) == ("softmax_topk", "sinkhorn")
    assert baseline["load"]["expert_max_mean"] > 2.0  # expert 0 takes most tokens
    assert sinkhorn["load"]["expert_max_mean"] < baseline["load"]["expert_max_mean"] / 1.5
    assert baseline["summary"]["eta_overlap"] == pytest.approx(
        eta_overlap(
            baseline["summary"]["comm"], baseline["summary"]["compute"], baseline["summary"]["layer_overlapped"]
        )
    )


def test_bad_sizes_are_refused_before_any_rank_starts():
    with pytest.raises(SystemExit, match=r"--experts \(6\) must be divisible by the 4 ranks"):
        main(["layer", "--ranks", "4", "--experts", "6"])
    with pytest.raises(SystemExit, match="must be >= 1 token per rank"):
        main(["layer", "--batch", "0"])
    with pytest.raises(SystemExit, match="capacity factor applies to the symmetric dispatchers"):
        main(["layer", "--dispatcher", "nccl", "--capacity-factor", "1"])
    with pytest.raises(SystemExit, match="capacity_factor must be > 0"):
        main(["layer", "--dispatcher", "symmetric", "--capacity-factor", "0"])
