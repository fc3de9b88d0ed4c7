"""`moekit bench journey` and `moekit bench experts`: argument parsing, tables, JSON and plots."""

from __future__ import annotations

import json
import os

import torch

from moekit.bench.ceilings import measure_ceilings
from moekit.bench.forward import SHAPES, shape_sizes, time_forward
from moekit.bench.journey import journey_rows, run_journey, scale_rows
from moekit.bench.machine import machine_info
from moekit.bench.progress import CaseProgress
from moekit.bench.tables import NotRun, print_table
from moekit.config import MoEConfig
from moekit.experts import EXPERT_BACKENDS, FP8_EXPERT_BACKENDS, JOURNEY
from moekit.problem import make_problem
from moekit.quantize import FP8, SCHEMES, quantize_weights
from moekit.routing import ROUTERS

FAST_BACKENDS = ["grouped_loop", "grouped_mm", "grouped_mm_fused", "triton_grouped", "cuda_graph"]
BEST_BF16 = "cuda_graph"  # the bf16 row beside the FP8 ones (on the CPU: triton_grouped, or grouped_loop)
# the journey's default (T of the level table, T of the scale table, H, F) on GPU, on the CPU, and on the CPU
# with TRITON_INTERPRET=1, where the levels with Triton kernels run in the Triton interpreter: small, so that
# it takes seconds, and each level timed over at most INTERPRETER_RUNS runs after one warm-up
JOURNEY_SIZES = {
    "gpu": (8192, [2048, 8192, 16384, 32768], 4096, 14336),
    "cpu": (512, [128, 256, 512, 1024], 256, 512),
    "interpreter": (32, [16, 32, 64], 32, 64),
}
INTERPRETER_RUNS = 3


def _router(device: torch.device) -> str:
    """The fused router where it runs, else the torch top-k + softmax."""
    if "fused_select" in ROUTERS and ROUTERS.get("fused_select").supports(device, torch.bfloat16)[0]:
        return "fused_select"
    return "topk_softmax"


def add_journey_parser(sub, common) -> None:
    p = sub.add_parser("journey", parents=[common], help="expert compute level by level, then over token counts")
    p.add_argument(
        "--tokens", type=int, help="T of the level table (default 8192 on GPU, 512 on CPU, 32 with TRITON_INTERPRET=1)"
    )
    p.add_argument("--scale", help="comma-separated T of the scale table (default 2048,8192,16384,32768 on GPU)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--hidden", type=int, help="H (default 4096 on GPU, 256 on CPU, 32 with TRITON_INTERPRET=1)")
    p.add_argument("--ffn", type=int, help="F (default 14336 on GPU, 512 on CPU, 64 with TRITON_INTERPRET=1)")
    p.set_defaults(run=run_journey_command)


def add_experts_parser(sub, common) -> None:
    p = sub.add_parser("experts", parents=[common], help="expert backends x model shapes x token counts")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--tokens-list", help="comma-separated T (default 16,128,4096,8192,16384 on GPU, 16,128 on CPU)")
    p.add_argument("--backends", help=f"comma-separated (default {','.join(FAST_BACKENDS)})")
    p.add_argument("--skew-experts", type=int, default=0, help="skewed routing: bias the first N experts")
    p.add_argument("--skew-bias", type=float, default=2.0)
    p.add_argument("--shrink", type=int, default=1, help="divide H and F by this (CPU runs of the GPU shapes)")
    p.add_argument("--quant", choices=SCHEMES, help="with --dtype fp8: the weights' scales (default block)")
    p.set_defaults(run=run_experts_command)


def _ints(text: str | None, default: list[int]) -> list[int]:
    return [int(v) for v in text.split(",")] if text else default


def run_journey_command(args, device: torch.device, dtype: torch.dtype) -> int:
    place = "gpu" if device.type == "cuda" else "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"
    default_tokens, default_scale, default_hidden, default_ffn = JOURNEY_SIZES[place]
    runs, warmup = (min(args.runs, INTERPRETER_RUNS), 1) if place == "interpreter" else (args.runs, 3)
    if place == "interpreter":
        print(
            f"TRITON_INTERPRET=1: the levels with Triton kernels run in the Triton interpreter, thousands of times "
            f"slower than compiled, so the sizes default small (T={default_tokens}, scale "
            f"{','.join(map(str, default_scale))}, H={default_hidden}, F={default_ffn}) and each level is timed "
            f"over at most {INTERPRETER_RUNS} runs"
        )
    config = MoEConfig(
        hidden_size=args.hidden or default_hidden,
        ffn_size=args.ffn or default_ffn,
        num_experts=args.experts,
        top_k=args.topk,
        router=_router(device),
        dtype=dtype,
    )
    tokens = args.tokens or default_tokens
    scale = _ints(args.scale, default_scale)
    ceilings = measure_ceilings(device)
    info = machine_info(device)
    token_counts = list(dict.fromkeys([tokens, *scale]))
    with CaseProgress(len(token_counts) * len(JOURNEY), quiet=args.quiet) as progress:
        by_tokens = {
            t: run_journey(config, t, device, ceilings, progress, runs=runs, warmup=warmup) for t in token_counts
        }
    levels = by_tokens[tokens]
    head = (
        f"on {info['device']} ({info['kind']}), E={config.num_experts} K={config.top_k} H={config.hidden_size} "
        f"F={config.ffn_size} {dtype}, router {config.router}; dense matmul {ceilings.matmul_tflops:.3g} TFLOP/s"
    )
    print_table(
        f"journey at T={tokens} {head}",
        ["level", "backend", "ms", "x level 0", "x previous", "TFLOP/s", "% matmul"],
        journey_rows(levels),
    )
    print_table(
        f"journey scale (ms) {head}",
        ["backend"] + [f"T={t}" for t in scale],
        scale_rows({t: by_tokens[t] for t in scale}),
    )
    payload = {
        "machine": info,
        "ceilings": vars(ceilings),
        "config": repr(config),
        "tokens": tokens,
        "levels": [t.as_dict() for t in levels],
        "scale": {str(t): [x.as_dict() for x in by_tokens[t]] for t in scale},
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
    if args.plot:
        from moekit.bench.plots import plot_lines

        series = {
            lv.backend: [(t, by_tokens[t][i].ms) for t in scale if by_tokens[t][i].ms is not None]
            for i, lv in enumerate(levels)
        }
        plot_lines(series, args.plot, title=f"MoE FFN forward by level ({info['kind']})", xlabel="tokens", ylabel="ms")
    return 0


def _fp8_cases(args, device: torch.device) -> list[tuple[str, bool, bool]]:
    """(backend, fp8, graph) per row of an FP8 table: each FP8 backend, on GPU scaled_grouped_mm replayed as a
    CUDA graph too (the peer of cuda_graph_fp8 at decode sizes), then the best bf16 backend."""
    names = args.backends.split(",") if args.backends else FP8_EXPERT_BACKENDS.names()
    for name in names:
        FP8_EXPERT_BACKENDS.get(name)
    cases = [(n, True, False) for n in names]
    if device.type == "cuda" and "scaled_grouped_mm" in names:
        cases.append(("scaled_grouped_mm", True, True))
    return cases + [(BEST_BF16 if device.type == "cuda" else "triton_grouped", False, False)]


def _bf16_of(fp8_rows: list, best: dict, key: str = "ms") -> list:
    """The 'x best bf16' cell of each row: the bf16 row's time (ms, or queued_ms) over this row's."""
    return [f"{best[key] / r[key]:.2f}" if best.get(key) and r.get(key) else "-" for r in fp8_rows]


def run_experts_command(args, device: torch.device, dtype: torch.dtype) -> int:
    gpu = device.type == "cuda"
    token_counts = _ints(args.tokens_list, [16, 128, 4096, 8192, 16384] if gpu else [16, 128])
    fp8 = dtype == FP8
    if args.quant and not fp8:
        raise ValueError("--quant chooses the FP8 weights' scales: pass --dtype fp8 with it")
    if fp8:  # e4m3 weights and activations; the tokens come in bf16 (float32 on the CPU) as a layer's would
        scheme, dtype = args.quant or "block", torch.bfloat16 if gpu else torch.float32
        cases = _fp8_cases(args, device)
    else:
        names = args.backends.split(",") if args.backends else FAST_BACKENDS
        for name in names:
            EXPERT_BACKENDS.get(name)  # unknown names fail before anything runs
        cases = [(n, False, False) for n in names]
    shapes = shape_sizes(args.shapes, args.shrink)
    ceilings = measure_ceilings(device, fp8=fp8)
    info = machine_info(device)
    results, tables = [], []
    with CaseProgress(len(shapes) * len(token_counts) * len(cases), quiet=args.quiet) as progress:
        for shape, sizes in shapes:
            config = MoEConfig(**sizes, router=_router(device), dtype=dtype)
            rows = []
            for tokens in token_counts:
                problem = make_problem(
                    config,
                    tokens,
                    seed=0,
                    device=device,
                    skew_experts=args.skew_experts,
                    skew_amount=args.skew_bias if args.skew_experts else 0.0,
                )
                quantized = quantize_weights(problem.weights, scheme) if fp8 else None
                timed = []
                for backend, on_fp8, graph in cases:
                    progress.case(f"{shape} T={tokens} {backend}{'+graph' if graph else ''}")
                    t = time_forward(
                        problem, backend, ceilings, runs=args.runs, quantized=quantized if on_fp8 else None, graph=graph
                    )
                    timed.append(t)
                    results.append({"shape": shape, "skew_experts": args.skew_experts, "fp8": on_fp8, **t.as_dict()})
                    ms = t.ms if t.ms is not None else NotRun(t.backend, t.status)
                    row = [t.backend, tokens, ms, t.tflops or "-"]
                    if fp8:
                        row.append(t.pct_of_fp8_matmul or "-")
                    rows.append(row + [t.pct_of_matmul or "-", t.weight_gbps or "-", t.pct_of_copy or "-",
                                       t.queued_ms or "-", t.queued_pct_of_copy or "-"])  # fmt: skip
                if fp8:  # each row's speed-up over the bf16 row of its T
                    fp8_rows, best = [x.as_dict() for x in timed], timed[-1].as_dict()
                    speedups = zip(_bf16_of(fp8_rows, best), _bf16_of(fp8_rows, best, "queued_ms"))
                    for row, (speedup, queued_speedup) in zip(rows[-len(timed) :], speedups):
                        row += [speedup, queued_speedup]
                del problem, quantized
            what = f"FP8 e4m3 ({scheme} scales), tokens in {dtype}" if fp8 else str(dtype)
            title = (
                f"{shape} {sizes} {what} on {info['kind']}, routing "
                f"{'skewed' if args.skew_experts else 'uniform'} ({config.router}); dense "
                f"{ceilings.matmul_tflops:.3g} TFLOP/s, copy {ceilings.copy_gbps:.3g} GB/s"
                + (f", FP8 dense {ceilings.fp8_matmul_tflops:.4g} TFLOP/s" if ceilings.fp8_matmul_tflops else "")
            )
            tables.append((title, rows))
    columns = ["backend", "T", "ms", "TFLOP/s", "% FP8 dense", "% matmul", "weight GB/s", "% copy", "queued ms",
               "queued % copy", "x best bf16", "queued x bf16"]  # fmt: skip
    if not fp8:
        columns = [c for c in columns if c not in ("% FP8 dense", "x best bf16", "queued x bf16")]
    for title, rows in tables:
        print_table(title, columns, rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "ceilings": vars(ceilings), "results": results}, indent=2))
    if args.plot:
        from moekit.bench.plots import plot_lines

        series = {f"{r['shape']}/{r['backend']}": [] for r in results}
        for r in results:
            if r["ms"] is not None:
                series[f"{r['shape']}/{r['backend']}"].append((r["tokens"], r["tflops"]))
        plot_lines(series, args.plot, title=f"expert backends ({info['kind']})", xlabel="tokens", ylabel="TFLOP/s")
    return 0
