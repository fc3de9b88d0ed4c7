"""`moekit run` end to end at tiny sizes on the CPU: the timing table, JSON, ONNX export, bad arguments."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from moekit.cli import main
from moekit.experts import EXPERT_BACKENDS
from moekit.export import MODEL_FILE, PARAMS_FILE
from moekit.models import MODELS

TINY = (
    "run --device cpu --batch 2 --seq-len 8 --vocab-size 64 --d-model 32 --n-heads 4 --n-layers 2 --mlp-hidden-dim 48 "
    "--moe-n-experts 4 --moe-top-k 2 --runs 2"
).split()


def test_run_times_every_model_and_writes_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    assert main([*TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "forward passes on" in out and "tokens/s" in out
    for name in MODELS.names():
        assert name in out
    payload = json.loads(path.read_text())
    rows = [(r["model"], r["backend"]) for r in payload["results"]]
    assert rows == [("moe_layer", "grouped_loop"), ("transformer_decoder", "-"), ("decoder_moe", "grouped_loop")]
    for r in payload["results"]:
        assert r["runs"] == 2 and 0 < r["min_ms"] <= r["median_ms"]
        assert r["tokens_per_s"] == pytest.approx(16 / (r["median_ms"] / 1e3))
    assert payload["config"]["d_model"] == 32 and payload["exports"] == []


def test_run_through_pipes_prints_the_table_and_no_progress():
    command = [sys.executable, "-m", "moekit", *TINY, "--model", "moe_layer"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "forward passes on" in result.stdout
    assert "case 1 of" not in result.stdout + result.stderr and "━" not in result.stderr


def test_run_times_each_expert_backend_asked_for(capsys):
    args = [*TINY, "--model", "decoder_moe", "--expert-backend", "naive", "--expert-backend", "masked_matmul"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("decoder_moe") == 2 and "naive" in out and "masked_matmul" in out


def test_a_backend_out_of_memory_is_a_row_not_a_crash(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB.")

    monkeypatch.setitem(EXPERT_BACKENDS._entries, "batched", replace(EXPERT_BACKENDS.get("batched"), fn=out_of_memory))
    path = tmp_path / "run.json"
    args = [*TINY, "--model", "decoder_moe", "--expert-backend", "batched", "--expert-backend", "naive"]
    assert main([*args, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("n/a  decoder_moe (batched): OOM: CUDA out of memory") == 1  # under the table
    batched, naive = json.loads(path.read_text())["results"]
    assert batched["status"].startswith("OOM") and batched["median_ms"] is None and batched["tokens_per_s"] is None
    assert naive["status"] == "ok" and naive["median_ms"] > 0


def test_run_exports_each_model_and_checks_it_with_onnxruntime(tmp_path, capsys):
    out_dir, path = tmp_path / "onnx", tmp_path / "run.json"
    args = [*TINY, "--model", "moe_layer", "--model", "decoder_moe", "--export-onnx-dir", str(out_dir)]
    assert main([*args, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ONNX op histogram" in out and "TopK" in out and "ORT rel. error" in out
    assert sorted(os.listdir(out_dir)) == ["decoder_moe", "moe_layer"]
    for name in ("decoder_moe", "moe_layer"):
        assert sorted(os.listdir(out_dir / name)) == [MODEL_FILE, PARAMS_FILE]
    exports = json.loads(path.read_text())["exports"]
    assert [e["model"] for e in exports] == ["moe_layer", "decoder_moe"]
    for e in exports:
        assert e["backend"] == "masked_matmul" and e["dtype"] == "float32"
        assert e["ort_relative_error"] <= 2e-5
        assert e["op_histogram"]["TopK"] == (1 if e["model"] == "moe_layer" else 2)
        assert e["param_count"] > 0 and e["params_bytes"] >= 4 * 32 * 48  # at least one expert's weights


def test_run_exports_bf16_models_in_float32(tmp_path, capsys):
    """ONNX Runtime has no bf16 kernels for the graph: the export is a float32 copy, and says so."""
    args = [*TINY, "--model", "moe_layer", "--dtype", "bf16", "--export-onnx-dir", str(tmp_path / "onnx")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "exporting in float32: ONNX Runtime's CPU kernels cannot run the exported graph in torch.bfloat16" in out
    assert sorted(os.listdir(tmp_path / "onnx" / "moe_layer")) == [MODEL_FILE, PARAMS_FILE]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-heads", "5"], r"n_heads must divide d_model \(32\), got 5"),
        (["--moe-top-k", "5"], r"moe_top_k must be <= moe_n_experts \(4\), got 5"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--seq-len", "-1"], "--seq-len must be >= 1, got -1"),
        (["--runs", "0"], "--runs must be >= 1, got 0"),
        (
            ["--router", "fused_select", "--export-onnx-dir", "unused"],
            r"--router must be one of \[.*\] with --export-onnx-dir",
        ),
        (["--plot", "unused.png"], "--plot: moekit run draws no plot"),
    ],
)
def test_run_rejects_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit, match=message):
        main([*TINY, *extra])
    assert "forward passes" not in capsys.readouterr().out


def test_run_rejects_an_export_dir_it_cannot_use_before_timing_anything(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for target, message in [(a_file, "exists and is not a directory"), (a_file / "sub", "is not a directory")]:
        with pytest.raises(SystemExit, match=message):
            main([*TINY, "--export-onnx-dir", str(target)])
    assert os.listdir(tmp_path) == ["a_file"]
    assert "forward passes" not in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--model", "--router", "--expert-backend"])
def test_run_rejects_an_unknown_name(flag, capsys):
    with pytest.raises(SystemExit) as error:
        main([*TINY, flag, "nope"])
    assert error.value.code == 2  # argparse
    assert f"argument {flag}: invalid choice: 'nope'" in capsys.readouterr().err
