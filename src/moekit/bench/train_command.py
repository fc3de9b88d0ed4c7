"""`moekit bench train`: forward + backward of the routed experts, and of the whole layer, per training path x model
shape x token count, beside the torchtitan-style peer measured in the same run (moekit.bench.train)."""

from __future__ import annotations

import json

import torch

from moekit.bench.ceilings import measure_ceilings
from moekit.bench.forward import SHAPES, shape_sizes
from moekit.bench.machine import machine_info
from moekit.bench.progress import CaseProgress
from moekit.bench.tables import NotRun, print_table
from moekit.bench.train import PEER, STAGES, time_train_step
from moekit.config import MoEConfig
from moekit.experts import EXPERT_BACKENDS
from moekit.problem import make_problem

DEFAULT_PATHS = ["grouped_mm", "grouped_mm_fused", "triton_grouped", "cuda_graph", PEER]
COLUMNS = ["path", "T", "ms", "TFLOP/s", "% matmul", "queued ms", "queued % matmul", "peak act. GB", "x peer",
           "fwd ms", "fwd / inference"]  # fmt: skip


def add_train_parser(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="forward + backward of the experts per training path")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--tokens-list", help="comma-separated T (default 4096,8192,16384 on GPU, 64,256 on CPU)")
    p.add_argument("--paths", help=f"comma-separated training backends or {PEER} (default {','.join(DEFAULT_PATHS)})")
    p.add_argument("--shrink", type=int, default=1, help="divide H and F by this (CPU runs of the GPU shapes)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {list(STAGES)}")
    p.set_defaults(run=run_train_command)


def _stages(text: str) -> list[str]:
    stages = text.split(",")
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"--stages: {stage!r} is not one of {list(STAGES)}")
    return stages


def _paths(text: str | None) -> list[str]:
    paths = text.split(",") if text else DEFAULT_PATHS
    for path in paths:
        if path != PEER and not EXPERT_BACKENDS.get(path).trains:  # an unknown name fails in get
            raise ValueError(f"--paths: {path!r} has no backward; training paths: {EXPERT_BACKENDS.training_names()}")
    return paths + ([] if PEER in paths else [PEER])  # the peer is always measured: the ratios need it


def run_train_command(args, device: torch.device, dtype: torch.dtype) -> int:
    gpu = device.type == "cuda"
    token_counts = [int(t) for t in args.tokens_list.split(",")] if args.tokens_list else (
        [4096, 8192, 16384] if gpu else [64, 256])  # fmt: skip
    paths, stages = _paths(args.paths), _stages(args.stages)
    shapes = shape_sizes(args.shapes, args.shrink)
    ceilings = measure_ceilings(device)
    info = machine_info(device)
    results = []
    with CaseProgress(len(shapes) * len(token_counts) * len(stages) * len(paths), quiet=args.quiet) as progress:
        for shape, sizes in shapes:
            config = MoEConfig(**sizes, router="topk_softmax", dtype=dtype)
            rows = {stage: [] for stage in stages}
            for tokens in token_counts:
                problem = make_problem(config, tokens, seed=0, device=device)
                for stage in stages:
                    timed = []
                    for path in paths:
                        progress.case(f"{shape} T={tokens} {stage} {path}")
                        timed.append(time_train_step(problem, path, ceilings, runs=args.runs, stage=stage))
                        results.append({"shape": shape, **timed[-1].as_dict()})
                    rows[stage] += _table_rows(timed, tokens)
                del problem
                if args.json:  # after every problem: a run stopped by a time limit keeps what it measured
                    args.json.write_text(json.dumps({"machine": info, "ceilings": vars(ceilings), "results": results},
                                                    indent=2))  # fmt: skip
            for stage in stages:
                what = "routed experts" if stage == "experts" else "layer: router, routed and shared experts"
                title = (
                    f"{shape} {sizes} {dtype} training step ({what}, fwd + bwd, FLOPs 3x forward) on {info['kind']}; "
                    f"dense {ceilings.matmul_tflops:.3g} TFLOP/s"
                )
                print_table(title, COLUMNS, rows[stage])
    return 0


def _table_rows(timed: list, tokens: int) -> list[list]:
    """The table rows of one problem's paths, the peer last (the ratios are to it)."""
    peer_ms = timed[-1].ms if timed[-1].path == PEER else None
    rows = []
    for t in timed:
        ratio = f"{peer_ms / t.ms:.2f}" if peer_ms and t.ms else "-"
        ms = t.ms if t.ms is not None else NotRun(t.path, t.status)
        overhead = f"{t.forward_ms / t.inference_ms:.2f}" if t.forward_ms and t.inference_ms else "-"
        peak = t.peak_activation_gb if t.peak_activation_gb is not None else "-"
        rows.append([t.path, tokens, ms, t.tflops or "-", t.pct_of_matmul or "-", t.queued_ms or "-",
                     t.queued_pct_of_matmul or "-", peak, ratio, t.forward_ms or "-", overhead])  # fmt: skip
    return rows
