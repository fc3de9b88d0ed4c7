"""`moekit run`: forward passes of the models in moekit.models, timed per expert backend; with
--export-onnx-dir, each model exported to ONNX (DIR/<model>/__model__ + __params__) and checked with
ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from moekit.bench.machine import machine_info
from moekit.bench.progress import each_case
from moekit.bench.tables import NotRun, print_table
from moekit.bench.timing import Timing, measure, time_once
from moekit.experts import EXPERT_BACKENDS
from moekit.models import MODELS, DecoderConfig, build_model
from moekit.routing import ROUTERS

CPU_BACKEND = "grouped_loop"  # top-K routed compute in torch ops: the sensible one without a GPU
DENSE_MODELS = ("transformer_decoder",)  # no MoE layer: timed once, backend "-"
CPU_BUDGET_S = 5.0  # timed seconds per case on the CPU, after CPU_MIN_RUNS runs
CPU_MIN_RUNS = 3


@dataclass(frozen=True)
class RunResult:
    """One model x backend: median and fastest forward in ms over `runs` timed runs, tokens (B * S) per second;
    status "ok", or why it did not run ("OOM: ..."), with the times None."""

    model: str
    backend: str
    params: int
    median_ms: float | None
    min_ms: float | None
    runs: int
    tokens_per_s: float | None
    status: str = "ok"


def add_run_parser(commands, common) -> None:
    p = commands.add_parser("run", parents=[common], help="time forward passes of the models; export them to ONNX")
    p.add_argument("--model", action="append", choices=MODELS.names(), help="repeatable; default all")
    p.add_argument("--batch", type=int, default=2, help="B (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="S (default 128)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--mlp-hidden-dim", type=int, default=2048, help="the MLP's and each expert's hidden size")
    p.add_argument("--moe-n-experts", type=int, default=8)
    p.add_argument("--moe-top-k", type=int, default=2)
    p.add_argument("--router", default="softmax_topk", choices=ROUTERS.names(), help="default softmax_topk")
    p.add_argument(
        "--expert-backend",
        action="append",
        choices=EXPERT_BACKENDS.names(),
        help=f"repeatable; default every backend that runs on the GPU, {CPU_BACKEND} on the CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument(
        "--export-onnx-dir",
        type=Path,
        metavar="DIR",
        help="export each model to DIR/<model>/__model__ + __params__ (needs the export extra)",
    )
    p.set_defaults(run=run_command)


def _config(args, dtype: torch.dtype) -> DecoderConfig:
    for flag in ("batch", "seq_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return DecoderConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_layers=args.n_layers,
        mlp_hidden_dim=args.mlp_hidden_dim,
        moe_n_experts=args.moe_n_experts,
        moe_top_k=args.moe_top_k,
        router=args.router,
        dtype=dtype,
    )


def _backends(args, config: DecoderConfig, device: torch.device) -> list[str]:
    """The expert backends asked for (each must run here), or the default for the device."""
    dtype = config.dtype
    if args.expert_backend:
        for name in args.expert_backend:
            ok, reason = EXPERT_BACKENDS.get(name).supports(device, dtype)
            if not ok:
                raise ValueError(f"--expert-backend {name} cannot run on {device} with {dtype}: {reason}")
        return list(dict.fromkeys(args.expert_backend))
    if device.type != "cuda":
        return [CPU_BACKEND]
    sizes = (config.d_model, config.mlp_hidden_dim)
    return [
        impl.name
        for impl in EXPERT_BACKENDS
        if impl.supports(device, dtype)[0] and all(s % impl.size_multiple(dtype) == 0 for s in sizes)
    ]


def _check_export(out_dir: Path, config: DecoderConfig) -> None:
    """Before any timing: the export extra is installed, out_dir can hold the exports, the router exports."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--export-onnx-dir needs {missing}: install moekit[export]")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--export-onnx-dir {out_dir} exists and is not a directory")
    if not out_dir.exists() and not out_dir.absolute().parent.is_dir():
        raise ValueError(f"--export-onnx-dir {out_dir}: the parent {out_dir.absolute().parent} is not a directory")
    from moekit.export import EXPORT_ROUTERS

    if config.router not in EXPORT_ROUTERS:
        raise ValueError(
            f"--router must be one of {list(EXPORT_ROUTERS)} with --export-onnx-dir, got {config.router!r}"
        )


def _measure(fn, device: torch.device, runs: int) -> Timing:
    """On GPU: 3 warm-ups, then the median of `runs` (CUDA events). On the CPU: 1 warm-up, then up to `runs`
    runs, stopping early once CPU_BUDGET_S of timed runs have passed (after at least CPU_MIN_RUNS), so the
    seed-size defaults take seconds on a busy 2-core machine."""
    if device.type == "cuda":
        return measure(fn, device, warmup=3, runs=runs)
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < CPU_MIN_RUNS or time.perf_counter() - start < CPU_BUDGET_S):
        times.append(time_once(fn, device))
    return Timing(statistics.median(times), min(times), len(times))


def time_model(
    name: str, config: DecoderConfig, device: torch.device, batch: int, seq_len: int, *, runs: int, seed: int
) -> RunResult:
    """Build model `name` from config on device and time its forward on [batch, seq_len] inputs
    (inference mode; warm-up, then the median of up to `runs`, see _measure)."""
    model = build_model(name, config, device=device, seed=seed)
    inputs = model.example_inputs(batch, seq_len, seed=seed + 1)
    backend = "-" if name in DENSE_MODELS else config.expert_backend
    params = sum(p.numel() for p in model.parameters())
    try:
        with torch.inference_mode():
            timing = _measure(lambda: model(*inputs), device, runs)
    except torch.OutOfMemoryError as error:  # e.g. batched's per-token weight copies: a row says so, the run goes on
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return RunResult(name, backend, params, None, None, 0, None, "OOM: " + " ".join(str(error).split()[:8]))
    tokens_per_s = batch * seq_len / (timing.median_ms / 1e3)
    return RunResult(name, backend, params, timing.median_ms, timing.min_ms, timing.runs, tokens_per_s)


def export_model(name: str, config: DecoderConfig, out_dir: Path, batch: int, seq_len: int, *, seed: int) -> dict:
    """Export model `name`, built on the CPU from config with an export backend (the same seed gives the same
    weights), to out_dir/name; then run the graph with ONNX Runtime on fresh [batch, seq_len] inputs against
    torch. config.dtype must be one of moekit.export.EXPORT_DTYPES."""
    from moekit.export import EXPORT_BACKENDS, export_onnx, run_onnxruntime
    from moekit.testing import relative_error

    config = replace(config, expert_backend=EXPORT_BACKENDS[0])
    model = build_model(name, config, device="cpu", seed=seed)
    # torch.export makes a dim dynamic only when the example's size is >= 2
    result = export_onnx(model, model.example_inputs(max(batch, 2), max(seq_len, 2), seed=seed), out_dir / name)
    inputs = model.example_inputs(batch, seq_len, seed=seed + 2)
    with torch.inference_mode():
        expected = model(*inputs)
    error = relative_error(torch.from_numpy(run_onnxruntime(result.model_path.parent, *inputs)[0]), expected)
    return {
        "model": name,
        "dtype": str(config.dtype).removeprefix("torch."),
        "backend": "-" if name in DENSE_MODELS else config.expert_backend,
        "model_path": str(result.model_path),
        "params_path": str(result.params_path),
        "params_bytes": result.params_bytes,
        "param_count": result.param_count,
        "op_histogram": result.op_histogram,
        "ort_relative_error": error,
    }


def _print_exports(exports: list[dict]) -> None:
    print_table(
        "ONNX exports, checked with ONNX Runtime on fresh inputs (relative error against torch)",
        ["model", "dtype", "backend", "parameters", "__params__ MB", "nodes", "ORT rel. error", "graph"],
        [
            [
                e["model"],
                e["dtype"],
                e["backend"],
                f"{e['param_count']:,}",
                e["params_bytes"] / 2**20,
                sum(e["op_histogram"].values()),
                f"{e['ort_relative_error']:.2e}",
                e["model_path"],
            ]
            for e in exports
        ],
    )
    totals: Counter[str] = Counter()
    for e in exports:
        totals.update(e["op_histogram"])
    ops = sorted(totals, key=lambda op: (-totals[op], op))  # the most used first, over all models
    print_table(
        "ONNX op histogram (op_type -> count)",
        ["op_type", *[e["model"] for e in exports]],
        [[op, *[e["op_histogram"].get(op, 0) for e in exports]] for op in ops],
    )


def run_command(args, device: torch.device, dtype: torch.dtype) -> int:
    config = _config(args, dtype)
    names = list(dict.fromkeys(args.model or MODELS.names()))
    backends = _backends(args, config, device)
    if args.export_onnx_dir is not None:
        _check_export(args.export_onnx_dir, config)
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    if args.plot:
        raise ValueError("--plot: moekit run draws no plot; --json writes its results")
    cases = [(n, b) for n in names for b in (backends[:1] if n in DENSE_MODELS else backends)]
    results = each_case(
        cases,
        lambda case: time_model(
            case[0], replace(config, expert_backend=case[1]), device, args.batch, args.seq_len, runs=args.runs,
            seed=args.seed,
        ),
        lambda case: f"{case[0]} ({case[1]})",
        quiet=args.quiet,
    )  # fmt: skip
    info = machine_info(device)
    title = (
        f"forward passes on {info['device']} ({info['kind']}): B={args.batch} S={args.seq_len} V={config.vocab_size} "
        f"D={config.d_model} heads={config.n_heads} layers={config.n_layers} F={config.mlp_hidden_dim} "
        f"E={config.moe_n_experts} K={config.moe_top_k} {config.router} {dtype}, median ms"
    )
    print_table(
        title,
        ["model", "backend", "parameters", "ms", "tokens/s", "runs"],
        [
            [
                r.model,
                r.backend,
                f"{r.params:,}",
                r.median_ms if r.median_ms is not None else NotRun(f"{r.model} ({r.backend})", r.status),
                r.tokens_per_s or "-",
                r.runs,
            ]
            for r in results
        ],
    )
    exports = []
    if args.export_onnx_dir is not None:
        from moekit.export import EXPORT_DTYPES

        export_config = config
        if dtype not in EXPORT_DTYPES:
            export_config = replace(config, dtype=torch.float32)
            print(f"exporting in float32: ONNX Runtime's CPU kernels cannot run the exported graph in {dtype}")
        args.export_onnx_dir.mkdir(exist_ok=True)
        out_dir = args.export_onnx_dir
        exports = each_case(
            names,
            lambda name: export_model(name, export_config, out_dir, args.batch, args.seq_len, seed=args.seed),
            lambda name: f"exporting {name} to ONNX",
            quiet=args.quiet,
        )
        _print_exports(exports)
    if args.json:
        payload = {
            "machine": info,
            "config": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in asdict(config).items()},
            "batch": args.batch,
            "seq_len": args.seq_len,
            "results": [asdict(r) for r in results],
            "exports": exports,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0
