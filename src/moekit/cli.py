"""The `moekit` command: `moekit bench router|journey|experts|train|a2a|ep`, `moekit layer`, `moekit run`,
`moekit gate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moekit.bench.a2a_command import add_a2a_parser
from moekit.bench.ep_command import add_ep_parser, add_layer_parser
from moekit.bench.expert_commands import add_experts_parser, add_journey_parser
from moekit.bench.machine import machine_info
from moekit.bench.profiling import profiled
from moekit.bench.router import bench_routers
from moekit.bench.tables import print_table
from moekit.bench.train_command import add_train_parser
from moekit.config import MoEConfig
from moekit.routing import ROUTERS
from moekit.run_command import add_run_parser

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,  # bench experts only: e4m3 weights (--quant) and activations
}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return device


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto, cpu or cuda")
    common.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, float32 on CPU")
    common.add_argument("--runs", type=int, default=20, help="timed runs per case (median reported)")
    common.add_argument("--json", type=Path, help="write the results here")
    common.add_argument("--quiet", action="store_true", help="no progress bar on stderr (shown on a terminal only)")
    common.add_argument("--plot", type=Path, help="draw the results into this PNG (needs matplotlib)")
    common.add_argument(
        "--profile", type=Path, metavar="DIR", help="write a torch.profiler trace here, print top kernels"
    )
    return common


def _router_parser(sub, common) -> None:
    p = sub.add_parser("router", parents=[common], help="time logits, selection and packing per router")
    p.add_argument("--tokens", type=int, help="T (default 4096 on CPU, 16384 on GPU)")
    p.add_argument("--hidden", type=int, help="H (default 1024 on CPU, 7168 on GPU)")
    p.add_argument("--experts", type=int, help="E (default 64 on CPU, 256 on GPU)")
    p.add_argument("--topk", type=int, default=8, help="K")
    p.add_argument("--n-group", type=int, default=8, help="grouped_topk: expert groups")
    p.add_argument("--topk-group", type=int, default=4, help="grouped_topk: groups kept per token")
    p.add_argument("--router", action="append", choices=ROUTERS.names(), help="repeatable; default all")
    p.add_argument("--skew-experts", type=int, default=0, help="bias the logits of the first N experts")
    p.add_argument("--skew-bias", type=float, default=0.0, help="by this amount")
    p.add_argument("--capacity-factor", type=float, help="count tokens over this capacity as dropped")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_router)


def _run_router(args, device: torch.device, dtype: torch.dtype) -> int:
    gpu = device.type == "cuda"
    config = MoEConfig(
        hidden_size=args.hidden or (7168 if gpu else 1024),
        ffn_size=1,  # the router bench needs no expert weights
        num_experts=args.experts or (256 if gpu else 64),
        top_k=args.topk,
        n_group=args.n_group,
        topk_group=args.topk_group,
        capacity_factor=args.capacity_factor,
        dtype=dtype,
    )
    num_tokens = args.tokens or (16384 if gpu else 4096)
    routers = args.router or [n for n in ROUTERS.names() if ROUTERS.get(n).supports(device, torch.float32)[0]]
    results = bench_routers(
        config,
        num_tokens,
        routers,
        device,
        skew_experts=args.skew_experts,
        skew_amount=args.skew_bias,
        seed=args.seed,
        runs=args.runs,
    )
    info = machine_info(device)
    title = (
        f"routers on {info['device']} ({info['kind']}): T={num_tokens} H={config.hidden_size} "
        f"E={config.num_experts} K={config.top_k} {config.dtype}, median µs"
    )
    columns = ["router", "T_logit", "T_select", "T_pack", "T_route", "max/mean", "CV", "dropped"]
    rows = [
        [
            r.router,
            r.t_logit_us,
            r.t_select_us,
            r.t_pack_us,
            r.t_route_us,
            r.stats.max_over_mean,
            r.stats.cv,
            r.stats.dropped if r.stats.capacity is not None else "-",
        ]
        for r in results
    ]
    print_table(title, columns, rows)
    if args.json:
        payload = {
            "machine": info,
            "config": repr(config),
            "tokens": num_tokens,
            "results": [r.as_dict() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    if args.plot:
        from moekit.bench.plots import plot_lines

        series = {
            r.router: [(1, r.t_logit_us), (2, r.t_select_us), (3, r.t_pack_us), (4, r.t_route_us)] for r in results
        }
        plot_lines(series, args.plot, title=title, xlabel="1 logit, 2 select, 3 pack, 4 route", ylabel="µs", logx=False)
    return 0


def _gate_parser(commands) -> None:
    p = commands.add_parser("gate", help="compare a perf run with the committed baseline of its machine kind")
    p.add_argument("current", type=Path, help="pytest --benchmark-json output of tests/perf")
    p.add_argument("--baseline", type=Path, help="default: baselines/<machine kind>.json")
    p.add_argument("--ratios-only", action="store_true", help="gate on speedup ratios only (CPU)")
    p.add_argument("--abs-margin", type=float, default=0.25, help="allowed growth of a median (default 25%%)")
    p.add_argument("--plot", type=Path, help="also draw the comparison as a PNG")
    p.set_defaults(run=_run_gate)


def _run_gate(args) -> int:
    from moekit.bench import gate

    current = gate.load_run(args.current)
    baseline_path = args.baseline or Path("baselines") / f"{gate.machine_kind_of(current)}.json"
    if not baseline_path.exists():
        raise ValueError(
            f"no baseline {baseline_path} for this machine kind; record one as baselines/README.md says and commit it"
        )
    verdicts = gate.compare_runs(
        gate.load_run(baseline_path), current, ratios_only=args.ratios_only, abs_margin=args.abs_margin
    )
    title = f"perf gate: {args.current} against {baseline_path}" + (" (ratios only)" if args.ratios_only else "")
    gate.print_report(verdicts, title)
    if args.plot:
        gate.plot_report(verdicts, args.plot, title)
    failed = [v.case for v in verdicts if not v.ok]
    print(f"{len(failed)} of {len(verdicts)} cases failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark").add_subparsers(dest="stage", required=True)
    common = _common_options()
    _router_parser(bench, common)
    add_journey_parser(bench, common)
    add_experts_parser(bench, common)
    add_a2a_parser(bench, common)
    add_ep_parser(bench, common)
    add_train_parser(bench, common)
    add_layer_parser(commands, common)
    add_run_parser(commands, common)
    _gate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "gate":
            return args.run(args)
        device = _device(args.device)
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "float32")]
        with profiled(args.profile, device):
            return args.run(args, device, dtype)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"moekit: {error}") from None
