"""ONNX export of the models in moekit.models, laid out for Netron: out_dir/__model__ (the graph) and
out_dir/__params__ (every weight, in one external-data file the graph refers to).

The exported graph routes by data: the router's stable sort becomes an ONNX TopK (whose ties go to the
lower index, as moekit's routers promise), so no routing is frozen at export. The MoE layers must compute
with an export-friendly expert backend (EXPORT_BACKENDS): a dense one, whose graph has no data-dependent
shapes. The batch and sequence dims are dynamic.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.layer import MoELayer
from moekit.models import MODELS, model_name

MODEL_FILE = "__model__"
PARAMS_FILE = "__params__"
# dense expert compute: every expert on every token, masked by the routing (no data-dependent shapes)
EXPORT_BACKENDS = ("masked_matmul",)
# torch ops the exporter translates (fused_select is a Triton kernel; sinkhorn takes math.log of the token
# count, which is a dynamic dim in the graph)
EXPORT_ROUTERS = ("softmax_topk", "topk_softmax", "grouped_topk", "sinkhorn")
# ONNX Runtime's CPU kernels run every exported op in these (bf16: no Mul, among others)
EXPORT_DTYPES = (torch.float32, torch.float16, torch.float64)


@dataclass(frozen=True)
class OnnxExport:
    """What export_onnx wrote: the graph, its weights, the ops it uses (op_type -> count, most used first)
    and the model's parameter count."""

    model_path: Path
    params_path: Path
    op_histogram: dict[str, int]
    param_count: int

    @property
    def params_bytes(self) -> int:
        return self.params_path.stat().st_size


def _sort_as_topk(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable -> ONNX TopK over the whole dim (no torchlib function exists for the stable
    overload). TopK's ties go to the lower index, which is what a stable sort keeps."""
    from onnxscript import opset18 as op

    dim_size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), [1])
    return op.TopK(self, dim_size, axis=dim, largest=descending, sorted=True)


def check_exportable(model: nn.Module) -> str:
    """Raise ValueError unless model is a registered model in an EXPORT_DTYPES dtype whose MoE layers route
    with an EXPORT_ROUTERS router, compute with an EXPORT_BACKENDS backend and have no dispatcher; return its
    registered name."""
    name = model_name(model)
    if name is None:
        raise ValueError(
            f"model must be one of the models in moekit.models {MODELS.names()}, got {type(model).__name__}"
        )
    dtype = model.config.dtype
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"model dtype must be one of {[str(d) for d in EXPORT_DTYPES]} for ONNX export "
            f"(ONNX Runtime's CPU kernels lack some ops in the others), got {dtype}"
        )
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        if layer.backend.name not in EXPORT_BACKENDS:
            raise ValueError(
                f"expert_backend must be one of {list(EXPORT_BACKENDS)} for ONNX export (a dense backend routes by "
                f"data inside the graph), got {layer.backend.name!r}; build the model with expert_backend="
                f"{EXPORT_BACKENDS[0]!r} (the same seed gives the same weights)"
            )
        if layer.config.router not in EXPORT_ROUTERS:
            raise ValueError(
                f"router must be one of {list(EXPORT_ROUTERS)} for ONNX export, got {layer.config.router!r}"
            )
        if layer.dispatcher is not None:
            raise ValueError("an MoE layer with a dispatcher (expert parallel) cannot be exported; build it without")
    return name


def _check_inputs(model: nn.Module, example_inputs) -> tuple[torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not (isinstance(example_inputs, tuple) and len(example_inputs) == 1):
        got = type(example_inputs).__name__
        if isinstance(example_inputs, (tuple, list)):
            got += f" of {len(example_inputs)}"
        raise ValueError(f"example_inputs must be a tuple of one tensor ({model.input_name}), got a {got}")
    (x,) = example_inputs
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or min(x.shape[:2]) < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"example_inputs: {model.input_name} must be a tensor [B, S, ...] with B >= 2 and S >= 2 "
            f"(torch.export fixes dims of size 0 or 1 instead of making them dynamic), got {shape}"
        )
    with torch.inference_mode():
        model(x)  # the model's own argument checks, with their clear errors, before anything is written
    return (x,)


def _prepare_out_dir(out_dir) -> Path:
    """out_dir as a Path whose parent is a directory; out_dir itself is new, empty or an earlier export."""
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        raise ValueError(f"out_dir {out_dir}: the parent {out_dir.parent} is not an existing directory")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"out_dir {out_dir} exists and is not a directory")
        others = sorted(set(os.listdir(out_dir)) - {MODEL_FILE, PARAMS_FILE})
        if others:
            raise ValueError(
                f"out_dir {out_dir} holds files other than {MODEL_FILE} and {PARAMS_FILE} ({others[:3]}); "
                "give a new or empty directory"
            )
    return out_dir


def op_histogram(model_path: Path) -> dict[str, int]:
    """op_type -> count over every node of the graph at model_path (subgraphs included), most used first."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    counts: Counter[str] = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    walk(subgraph)

    walk(proto.graph)
    for function in proto.functions:
        for node in function.node:
            counts[node.op_type] += 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _write(model: nn.Module, inputs: tuple[torch.Tensor], directory: Path) -> None:
    """Export model into directory/__model__ + directory/__params__."""
    import onnx_ir

    batch, seq_len = torch.export.Dim("batch"), torch.export.Dim("seq_len")
    program = torch.onnx.export(
        model,
        inputs,
        dynamo=True,
        input_names=[model.input_name],
        output_names=[model.output_name],
        dynamic_shapes={model.input_name: {0: batch, 1: seq_len}},
        custom_translation_table={torch.ops.aten.sort.stable: _sort_as_topk},
        verbose=False,
    )
    # Every floating initializer (the weights, and the constants folded from them) goes to __params__, in
    # graph order; the integer ones (shapes, axes) stay inline: ONNX Runtime's shape inference reads them
    # while loading and cannot read external data then.
    weights = [v for v in program.model.graph.initializers.values() if v.const_value.dtype.is_floating_point()]
    external = onnx_ir.external_data.convert_tensors_to_external(
        [v.const_value for v in weights], directory, PARAMS_FILE
    )
    for value, tensor in zip(weights, external):
        value.const_value = tensor
    onnx_ir.save(program.model, directory / MODEL_FILE)  # external tensors stay external
    written = sorted(os.listdir(directory))
    if written != sorted([MODEL_FILE, PARAMS_FILE]):
        raise RuntimeError(f"the ONNX export wrote {written}, expected {MODEL_FILE} and {PARAMS_FILE}")


def export_onnx(model: nn.Module, example_inputs, out_dir) -> OnnxExport:
    """Export a model of moekit.models to out_dir/__model__ + out_dir/__params__ (nothing else in out_dir).

    example_inputs: (input [B, S, ...],) as model.example_inputs(B, S) draws, B >= 2 and S >= 2; the graph
    accepts any B and S. The model's dtype must be in EXPORT_DTYPES and its MoE layers' backend in EXPORT_BACKENDS.
    The pair is written into a temporary directory beside out_dir, then renamed into place (an earlier
    export there is replaced): on any error nothing is left behind and out_dir is as it was.
    Raises ValueError for an unknown model, an unexportable dtype, backend or router, bad inputs, or an
    out_dir that cannot be written.
    """
    check_exportable(model)
    inputs = _check_inputs(model, example_inputs)
    out_dir = _prepare_out_dir(out_dir)
    # a new directory beside out_dir (the same file system: renames are atomic), with the umask's mode
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        staging.mkdir()
    except OSError as error:
        raise ValueError(f"out_dir {out_dir}: cannot write in {out_dir.parent} ({error.strerror})") from None
    try:
        _write(model, inputs, staging)
        histogram = op_histogram(staging / MODEL_FILE)
        if out_dir.exists():  # an earlier export: swap it out, then delete it
            previous = staging.with_suffix(".old")
            os.rename(out_dir, previous)
            try:
                os.rename(staging, out_dir)
            except OSError:
                os.rename(previous, out_dir)  # put the earlier export back
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    param_count = sum(p.numel() for p in model.parameters())
    return OnnxExport(out_dir / MODEL_FILE, out_dir / PARAMS_FILE, histogram, param_count)


def run_onnxruntime(out_dir, *inputs: torch.Tensor) -> list:
    """Run out_dir/__model__ (weights from __params__) with ONNX Runtime on the CPU; numpy outputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(Path(out_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"inputs: the graph takes {names}, got {len(inputs)} tensors")
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


__all__ = [
    "EXPORT_BACKENDS",
    "EXPORT_DTYPES",
    "EXPORT_ROUTERS",
    "MODEL_FILE",
    "PARAMS_FILE",
    "OnnxExport",
    "check_exportable",
    "export_onnx",
    "op_histogram",
    "run_onnxruntime",
]
