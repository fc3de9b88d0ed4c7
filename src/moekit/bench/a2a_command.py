"""`moekit bench a2a`: the expert-parallel paths side by side, as named configs or one-parameter sweeps."""

from __future__ import annotations

import json

import torch

from moekit.bench.a2a import CONFIGS, SWEEPS, run_ranks, sweep_configs
from moekit.bench.tables import print_table
from moekit.ep import DISPATCHERS
from moekit.testing.spawn import spawn_ranks


def add_a2a_parser(sub, common) -> None:
    p = sub.add_parser("a2a", parents=[common], help="dispatch + combine of every expert-parallel path")
    p.add_argument("--gpus", type=int, help="ranks on GPUs (NCCL); without it, --ranks CPU ranks on gloo")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks on the CPU (default 2)")
    p.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGS),
        help="repeatable; default normal and low-latency on GPU, cpu on the CPU",
    )
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="vary one parameter of the first config")
    p.add_argument("--values", help="comma-separated values of the swept parameter (local experts: per rank)")
    p.add_argument("--paths", help=f"comma-separated, from {DISPATCHERS.names()} (default: all that fit)")
    p.set_defaults(run=run_a2a_command)


def run_a2a_command(args, device: torch.device, dtype: torch.dtype) -> int:
    gpu = args.gpus is not None
    world = args.gpus if gpu else args.ranks
    if world < 1:
        raise ValueError(f"--gpus/--ranks must be >= 1, got {world}")
    names = args.config or (["normal", "low-latency"] if gpu else ["cpu"])
    configs = [CONFIGS[n] for n in names]
    if args.sweep:
        if not args.values:
            raise ValueError("--sweep needs --values")
        values = [int(v) * (world if args.sweep == "local-experts" else 1) for v in args.values.split(",")]
        configs = sweep_configs(configs[0], args.sweep, values)
    for c in configs:
        if c.experts % world:
            raise ValueError(f"config {c.name}: num_experts ({c.experts}) must divide evenly over {world} ranks")
    paths = args.paths.split(",") if args.paths else DISPATCHERS.names()
    paths = [p for p in paths if DISPATCHERS.get(p).fn.supports(world, "cuda" if gpu else "cpu")[0]]
    results = spawn_ranks(
        run_ranks,
        world,
        configs,
        paths,
        args.runs,
        "nccl" if gpu else "gloo",
        args.quiet,
        backend="nccl" if gpu else "gloo",
        timeout_s=600,
    )[0]
    reference = {(r.config): r for r in results if r.path == "nccl"}
    rows = []
    for r in results:
        base = reference.get(r.config)
        speedup = (base.dispatch_us + base.combine_us) / (r.dispatch_us + r.combine_us) if base else "-"
        padding = "-" if r.padding_fraction is None else f"{r.padding_fraction:.1%}"
        rows.append([r.config, r.path, r.dispatch_us, r.combine_us, r.offrank_gbps, padding, speedup])
    where = f"{world} GPUs (NCCL)" if gpu else f"{world} CPU ranks (gloo)"
    print_table(
        f"dispatch + combine on {where}, median µs of the slowest rank",
        ["config", "path", "dispatch µs", "combine µs", "off-rank GB/s", "padding", "x nccl"],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps({"world_size": world, "results": [r.as_dict() for r in results]}, indent=2))
    if args.plot and args.sweep:
        from moekit.bench.plots import plot_lines

        series = {}
        for r, row in zip(results, rows):
            if isinstance(row[-1], float):
                series.setdefault(r.path, []).append((float(r.config.split("=")[1]), row[-1]))
        plot_lines(
            series,
            args.plot,
            title=f"speedup over nccl, sweeping {args.sweep} ({where})",
            xlabel=args.sweep,
            ylabel="x nccl",
            logy=False,
        )
    return 0
