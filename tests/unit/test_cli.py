"""`moekit bench router` end to end, small, on the CPU."""

import json
import subprocess
import sys

import pytest
import torch

from moekit.cli import main
from moekit.routing import ROUTERS

CPU_ROUTERS = [n for n in ROUTERS.names() if ROUTERS.get(n).supports(torch.device("cpu"), torch.float32)[0]]


def test_bench_router_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "router.json"
    args = [
        "bench",
        "router",
        "--tokens",
        "256",
        "--hidden",
        "64",
        "--experts",
        "16",
        "--topk",
        "4",
        "--n-group",
        "4",
        "--topk-group",
        "2",
        "--runs",
        "3",
        "--skew-experts",
        "2",
        "--skew-bias",
        "2",
        "--capacity-factor",
        "1.0",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in CPU_ROUTERS:
        assert name in printed
    payload = json.loads(out.read_text())
    assert payload["machine"]["kind"] == "cpu"
    results = {r["router"]: r for r in payload["results"]}
    assert set(results) == set(CPU_ROUTERS)
    for r in results.values():
        assert all(r[k] > 0 for k in ("t_logit_us", "t_select_us", "t_pack_us", "t_route_us"))
        assert sum(r["tokens_per_expert"]) == 256 * 4
        assert r["capacity"] == 64 and r["dropped"] >= 0
    # skewed towards experts 0-1: the softmax router is less balanced than sinkhorn
    assert results["sinkhorn"]["cv"] < results["softmax_topk"]["cv"]


def test_bad_arguments_give_a_clear_error():
    with pytest.raises(SystemExit, match="top_k must be <= num_experts"):
        main(["bench", "router", "--experts", "4", "--topk", "8", "--n-group", "1", "--topk-group", "1"])


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bench" in result.stdout
