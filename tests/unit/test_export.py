"""moekit.export: the __model__ + __params__ pair, ONNX Runtime against torch on fresh shapes, routing by
data inside the graph, and bad input that leaves nothing behind."""

import os
from dataclasses import replace

import onnx
import pytest
import torch
from onnx import TensorProto

import moekit.export as export
from moekit.experts.masked_matmul import masked_matmul
from moekit.export import MODEL_FILE, PARAMS_FILE, export_onnx, run_onnxruntime
from moekit.models import MODELS, DecoderConfig, build_model
from moekit.routing import route
from moekit.testing import TOLERANCE, relative_error
from moekit.weights import router_logits

TINY = DecoderConfig(
    vocab_size=64,
    d_model=32,
    n_heads=4,
    n_layers=2,
    mlp_hidden_dim=48,
    moe_n_experts=4,
    moe_top_k=2,
    expert_backend="masked_matmul",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, OnnxExport): each model exported once from a [2, 6] example."""
    out = {}
    for name in MODELS.names():
        model = build_model(name, TINY, seed=1)
        out[name] = model, export_onnx(model, model.example_inputs(2, 6), tmp_path_factory.mktemp(name) / "onnx")
    return out


def _ort(result, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(run_onnxruntime(result.model_path.parent, x)[0])


@pytest.mark.parametrize("name", MODELS.names())
def test_export_writes_exactly_the_pair_with_every_weight_outside_the_graph(exported, name):
    model, result = exported[name]
    out_dir = result.model_path.parent
    assert sorted(os.listdir(out_dir)) == [MODEL_FILE, PARAMS_FILE]
    assert not [p for p in os.listdir(out_dir.parent) if p.startswith(".")]  # no staging directory left
    onnx.checker.check_model(str(result.model_path))  # a path: external data checked too
    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    external, inline = [], []
    for tensor in graph.initializer:
        (external if tensor.data_location == TensorProto.EXTERNAL else inline).append(tensor)
    for tensor in external:
        location = {e.key: e.value for e in tensor.external_data}["location"]
        assert location == PARAMS_FILE, tensor.name
    # inline: only small integer shapes and axes, which ONNX Runtime reads while loading
    assert all(t.data_type == TensorProto.INT64 and len(t.raw_data) <= 64 for t in inline), [t.name for t in inline]
    nodes = list(graph.node)
    assert not [n for n in nodes if n.op_type == "Constant" and len(n.SerializeToString()) > 256]
    external_bytes = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external)
    assert external_bytes == result.params_bytes
    # named weights survive (the ones the optimizer did not fold into a transposed copy)
    names = {t.name for t in external}
    assert {"moe.w_gate_up" if name == "moe_layer" else "embed_tokens"} <= names
    assert result.param_count == sum(p.numel() for p in model.parameters())
    assert sum(result.op_histogram.values()) == len(nodes)


@pytest.mark.parametrize("shape", [(3, 11), (1, 1), (1, 17), (4, 2)])
@pytest.mark.parametrize("name", MODELS.names())
def test_onnxruntime_matches_torch_on_fresh_shapes(exported, name, shape):
    model, result = exported[name]
    (x,) = model.example_inputs(*shape, seed=100 + shape[0] * shape[1])
    with torch.inference_mode():
        expected = model(x)
    got = _ort(result, x)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("router", ["topk_softmax", "sinkhorn"])
def test_other_routers_export_with_a_dynamic_batch(tmp_path, router):
    """sinkhorn's column mass log(T / E) stays a graph op of the symbolic T, so other batches still match."""
    model = build_model("moe_layer", replace(TINY, router=router), seed=3)
    result = export_onnx(model, model.example_inputs(2, 6), tmp_path / "onnx")
    for shape in [(3, 11), (1, 1)]:
        (x,) = model.example_inputs(*shape, seed=7)
        with torch.inference_mode():
            expected = model(x)
        assert relative_error(_ort(result, x), expected) <= TOLERANCE[torch.float32], (router, shape)


def test_histogram_has_a_topk_per_moe_layer(exported):
    assert exported["moe_layer"][1].op_histogram["TopK"] == 1
    assert exported["decoder_moe"][1].op_histogram["TopK"] == TINY.n_layers
    assert "TopK" not in exported["transformer_decoder"][1].op_histogram
    histogram = exported["decoder_moe"][1].op_histogram
    assert list(histogram.values()) == sorted(histogram.values(), reverse=True)


def _routed_to(layer, experts: list[int], num_tokens: int, seed: int) -> torch.Tensor:
    """x [T, H]: random rows whose router logits are 6 and 5 at `experts` and 0 elsewhere."""
    weight = layer.router_weight  # [E, H]
    target = torch.zeros(num_tokens, weight.shape[0])
    target[:, experts[0]], target[:, experts[1]] = 6.0, 5.0
    noise = torch.randn(num_tokens, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    pinv = torch.linalg.pinv(weight)  # [H, E]
    return noise - noise @ weight.T @ pinv.T + target @ pinv.T  # noise outside the router's row space


def test_graph_routes_by_data_not_by_the_export_example(exported):
    model, result = exported["moe_layer"]
    layer = model.moe
    x_a = _routed_to(layer, [0, 1], 10, seed=1)
    x_b = _routed_to(layer, [3, 2], 10, seed=2)
    ids_a = route(router_logits(x_a, layer.weights), layer.config).topk_ids
    ids_b = route(router_logits(x_b, layer.weights), layer.config).topk_ids
    assert (ids_a == torch.tensor([0, 1], dtype=torch.int32)).all()
    assert (ids_b == torch.tensor([3, 2], dtype=torch.int32)).all()
    for x in (x_a, x_b):
        with torch.inference_mode():
            expected = model(x[None])
        assert relative_error(_ort(result, x[None]), expected) <= TOLERANCE[torch.float32]
    # had the graph kept x_a's routing, x_b's output would be this, and it is not what the graph gives
    frozen = masked_matmul(x_b, ids_a, torch.full((10, 2), 0.5), layer.weights)
    assert relative_error(_ort(result, x_b[None])[0], frozen) > 0.1


def test_float16_export_matches_torch_float16(tmp_path):
    model = build_model("moe_layer", replace(TINY, dtype=torch.float16), seed=3)
    result = export_onnx(model, model.example_inputs(2, 4), tmp_path / "fp16")
    (x,) = model.example_inputs(3, 5, seed=4)
    with torch.inference_mode():
        expected = model(x)
    got = _ort(result, x)
    assert got.dtype == torch.float16
    assert relative_error(got, expected) <= TOLERANCE[torch.float16]


def test_a_second_export_replaces_the_first(tmp_path):
    out_dir = tmp_path / "onnx"
    first = build_model("moe_layer", TINY, seed=1)
    export_onnx(first, first.example_inputs(2, 2), out_dir)
    second = build_model("moe_layer", TINY, seed=2)
    result = export_onnx(second, second.example_inputs(2, 2), out_dir)
    assert sorted(os.listdir(tmp_path)) == ["onnx"] and sorted(os.listdir(out_dir)) == [MODEL_FILE, PARAMS_FILE]
    (x,) = second.example_inputs(2, 3, seed=5)
    with torch.inference_mode():
        assert relative_error(_ort(result, x), second(x)) <= TOLERANCE[torch.float32]


def _bad_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "keep.txt").write_text("mine")
    moe = build_model("moe_layer", TINY)
    ok = moe.example_inputs(2, 3)
    return [
        (build_model("moe_layer", replace(TINY, dtype=torch.bfloat16)), None, "out", ValueError, "model dtype must"),
        (
            build_model("decoder_moe", replace(TINY, expert_backend="grouped_loop")),
            None,
            "out",
            ValueError,
            r"expert_backend must be one of \['masked_matmul'\] for ONNX export",
        ),
        (build_model("moe_layer", replace(TINY, router="fused_select")), None, "out", ValueError, "router must be one"),
        (torch.nn.Linear(4, 4), (torch.randn(2, 3, 4),), "out", ValueError, "model must be one of the models"),
        ("decoder_moe", None, "out", ValueError, "model must be one of the models"),
        (moe, moe.example_inputs(1, 3), "out", ValueError, "B >= 2 and S >= 2"),
        (moe, (ok[0], ok[0]), "out", ValueError, r"a tuple of one tensor \(x\), got a tuple of 2"),
        (moe, (ok[0].double(),), "out", TypeError, "x must have dtype in"),
        (moe, ok, a_file / "out", ValueError, "is not an existing directory"),
        (moe, ok, a_file, ValueError, "exists and is not a directory"),
        (moe, ok, crowded, ValueError, r"holds files other than __model__ and __params__ \(\['keep.txt'\]\)"),
    ]


def test_bad_input_raises_before_anything_is_written(tmp_path):
    for model, inputs, out, error, message in _bad_cases(tmp_path):
        before = sorted(os.listdir(tmp_path))
        if inputs is None:
            inputs = model.example_inputs(2, 3) if isinstance(model, torch.nn.Module) else None
        with pytest.raises(error, match=message):
            export_onnx(model, inputs, tmp_path / out)
        assert sorted(os.listdir(tmp_path)) == before, message
    assert (tmp_path / "crowded" / "keep.txt").read_text() == "mine"


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_write(model, inputs, directory):
        (directory / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write", half_write)
    model = build_model("moe_layer", TINY)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, model.example_inputs(2, 3), tmp_path / "onnx")
    assert os.listdir(tmp_path) == []


def test_run_onnxruntime_checks_the_input_count(exported):
    model, result = exported["moe_layer"]
    with pytest.raises(ValueError, match=r"the graph takes \['x'\], got 2 tensors"):
        run_onnxruntime(result.model_path.parent, *model.example_inputs(2, 2), *model.example_inputs(2, 2))


def test_an_unwritable_parent_is_a_clear_error(tmp_path, monkeypatch):
    """Root writes into read-only directories, so the refusal is simulated where the export meets it."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    model = build_model("moe_layer", TINY)
    monkeypatch.setattr(export.Path, "mkdir", refuse)
    with pytest.raises(ValueError, match=r"out_dir .*onnx: cannot write in .* \(Permission denied\)"):
        export_onnx(model, model.example_inputs(2, 3), tmp_path / "onnx")
    assert os.listdir(tmp_path) == []
