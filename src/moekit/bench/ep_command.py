"""`moekit layer` (run the expert-parallel layer like the FlashMoE driver: per-phase times, --check) and
`moekit bench ep` (the same study per router strategy, with load skew and eta_overlap).

Ranks: `--gpus N` (NCCL, one GPU each), `--ranks N` gloo ranks on the CPU (default 2), or, under torchrun
(RANK and WORLD_SIZE set), the launched processes themselves; rank 0 prints.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.bench.ceilings import measure_ceilings
from moekit.bench.ep import PHASES, EPCase, EPResult, as_dict, eta_overlap, slowest, study_rank
from moekit.bench.flops import expert_weight_bytes, layer_flops
from moekit.bench.machine import machine_info
from moekit.bench.progress import each_case
from moekit.bench.tables import print_table
from moekit.config import MoEConfig
from moekit.ep import DISPATCHERS
from moekit.experts import EXPERT_BACKENDS
from moekit.problem import make_problem
from moekit.reference import reference_moe
from moekit.routing import ROUTERS
from moekit.testing.numerics import TOLERANCE, relative_error
from moekit.testing.spawn import spawn_ranks

STRATEGIES = ("softmax_topk", "fused_select", "sinkhorn")


def _layer_options(p) -> None:
    p.add_argument("--gpus", type=int, help="ranks on GPUs (NCCL); without it, --ranks CPU ranks on gloo")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks on the CPU (default 2)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=512, help="H")
    p.add_argument("--experts", type=int, default=8, help="E (divisible by the ranks)")
    p.add_argument("--topk", type=int, default=2, help="K")
    p.add_argument("--ffn", type=int, default=2048, help="F of each expert")
    p.add_argument("--shared", type=int, default=0, help="shared experts (of size F)")
    p.add_argument("--dispatcher", default="nccl", choices=DISPATCHERS.names())
    p.add_argument("--experts-backend", default="grouped_loop", choices=EXPERT_BACKENDS.names())
    p.add_argument("--chunks", type=int, default=2, help="token chunks of the overlapped layer")
    p.add_argument(
        "--own-first",
        action="store_true",
        help="the overlapped layer computes its own rank's tokens while the dispatch is in flight",
    )
    p.add_argument(
        "--fused-combine",
        action="store_true",
        help="symmetric_triton + triton_grouped: the down projection's epilogue stores into the combine slots",
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        help="symmetric dispatchers: capacity per (source rank, expert) = ceil(F * T * K / E) pairs, those above "
        "it dropped and counted (default: T, nothing dropped)",
    )
    p.add_argument("--n-group", type=int, default=1, help="grouped_topk: expert groups")
    p.add_argument("--topk-group", type=int, default=1, help="grouped_topk: groups kept per token")
    p.add_argument("--seed", type=int, default=0)


def add_layer_parser(commands, common) -> None:
    p = commands.add_parser("layer", parents=[common], help="run the expert-parallel MoE layer, per-phase times")
    _layer_options(p)
    p.add_argument("--router", default="softmax_topk", choices=ROUTERS.names())
    p.add_argument("--check", action="store_true", help="compare the output with the float64 oracle")
    p.set_defaults(run=run_layer_command)


def add_ep_parser(sub, common) -> None:
    p = sub.add_parser("ep", parents=[common], help="the expert-parallel layer per router strategy")
    _layer_options(p)
    p.add_argument("--router", action="append", choices=ROUTERS.names(), help="repeatable (default softmax_topk)")
    p.add_argument("--all-strategies", action="store_true", help=f"every one of {', '.join(STRATEGIES)} that runs")
    p.add_argument("--skew-experts", type=int, default=0, help="bias the logits of the first N experts")
    p.add_argument("--skew-bias", type=float, default=0.0, help="by this amount")
    p.set_defaults(run=run_ep_command)


def _case(args, router: str, dtype: torch.dtype) -> EPCase:
    config = MoEConfig(
        hidden_size=args.hidden,
        ffn_size=args.ffn,
        num_experts=args.experts,
        top_k=args.topk,
        num_shared_experts=args.shared,
        router=router,
        n_group=args.n_group,
        topk_group=args.topk_group,
        dtype=dtype,
    )
    return EPCase(
        config,
        args.batch * args.seq,
        args.experts_backend,
        args.dispatcher,
        chunks=args.chunks,
        own_first=args.own_first,
        capacity_factor=args.capacity_factor,
        fused_combine=args.fused_combine,
        skew_experts=getattr(args, "skew_experts", 0),
        skew_bias=getattr(args, "skew_bias", 0.0),
        seed=args.seed,
    )


def _world(args) -> tuple[int, str]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "nccl" if args.gpus or torch.cuda.is_available() else "gloo"
    world = args.gpus if args.gpus is not None else args.ranks
    if world < 1:
        raise ValueError(f"--gpus/--ranks must be >= 1, got {world}")
    return world, "nccl" if args.gpus is not None else "gloo"


def _case_name(case: EPCase) -> str:
    return f"{case.config.router}, {case.dispatcher} + {case.backend}"


def _run_ranks(args, cases: list[EPCase], check: bool) -> list[list[EPResult]] | None:
    """Per case, the results of every rank; None on ranks other than 0 under torchrun."""
    world, backend = _world(args)
    for case in cases:
        if case.config.num_experts % world:
            raise ValueError(f"--experts ({case.config.num_experts}) must be divisible by the {world} ranks")
        if case.tokens_per_rank < 1:
            raise ValueError(f"--batch * --seq must be >= 1 token per rank, got {case.tokens_per_rank}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank = int(os.environ["RANK"])
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend, timeout=timedelta(seconds=600))
        try:
            mine = each_case(
                cases,
                lambda case: study_rank(rank, world, case, args.runs, check, backend),
                _case_name,
                quiet=args.quiet or rank != 0,
            )
            every = [None] * world
            dist.all_gather_object(every, mine)
        finally:
            dist.destroy_process_group()
        return [[every[q][i] for q in range(world)] for i in range(len(cases))] if rank == 0 else None
    return each_case(
        cases,
        lambda case: spawn_ranks(study_rank, world, case, args.runs, check, backend, backend=backend, timeout_s=600),
        _case_name,
        quiet=args.quiet,
    )


def _load_skew(results: list[EPResult], world: int) -> dict[str, float]:
    """max/mean and CV of tokens per expert and per rank (the rank owning the expert) over all ranks."""
    per_expert = torch.tensor([r.tokens_per_expert for r in results], dtype=torch.float64).sum(0)
    per_rank = per_expert.view(world, -1).sum(1)

    def skew(counts: torch.Tensor) -> tuple[float, float]:
        mean = float(counts.mean())
        if mean == 0:
            return float("nan"), float("nan")
        return float(counts.max()) / mean, float(counts.std(unbiased=False)) / mean

    (expert_max, expert_cv), (rank_max, rank_cv) = skew(per_expert), skew(per_rank)
    return {"expert_max_mean": expert_max, "expert_cv": expert_cv, "rank_max_mean": rank_max, "rank_cv": rank_cv}


def _summary(results: list[EPResult]) -> dict[str, float]:
    ms = slowest(results)
    comm = max(r.comm_ms for r in results)
    compute = max(r.compute_ms for r in results)
    return {
        **ms,
        "comm": comm,
        "compute": compute,
        "eta_overlap": eta_overlap(comm, compute, ms["layer_overlapped"]),
    }


def _check(case: EPCase, results: list[EPResult], backend: str) -> tuple[float, float]:
    """(relative error of the layer against the oracle on each rank's tokens, the dtype's tolerance). The
    problem is drawn again from the seed on the kind of device the ranks drew it on (CPU and CUDA generators
    give different numbers for one seed)."""
    world, T = len(results), case.tokens_per_rank
    device = "cuda" if backend == "nccl" else "cpu"
    problem = make_problem(
        case.config, T * world, seed=case.seed, skew_experts=case.skew_experts, skew_amount=case.skew_bias,
        device=device,
    )  # fmt: skip
    reference = torch.cat(
        [reference_moe(problem.x[q * T : (q + 1) * T], problem.weights, case.config).y for q in range(world)]
    )
    y = torch.cat([r.y.to(device) for r in results])
    return relative_error(y, reference), TOLERANCE[case.config.dtype]


def _layer_rates(case: EPCase, results: list[EPResult], s: dict[str, float], backend: str) -> dict[str, float]:
    """The layer's matmul rate (routed + shared FLOPs of a rank / the faster layer time) and the rate it
    reads expert weights at (the experts its busiest rank owns that got tokens, + the shared ones); on GPUs
    also as shares of the dense matmul rate and copy bandwidth measured here, after the ranks finished."""
    world, config = len(results), case.config
    layer_ms = min(s["layer_sync"], s["layer_overlapped"])
    per_expert = torch.tensor([r.tokens_per_expert for r in results]).sum(0).view(world, -1)
    experts_read = int((per_expert > 0).sum(1).max())
    tflops = layer_flops(case.tokens_per_rank, config) / layer_ms / 1e9
    weight_gbps = expert_weight_bytes(config, experts_read) / layer_ms / 1e6
    rates = {"layer TFLOP/s": tflops, "expert weights read, GB/s": weight_gbps}
    if backend == "nccl":
        ceilings = measure_ceilings(torch.device("cuda", 0))
        rates["layer % of dense matmul"] = 100 * tflops / ceilings.matmul_tflops
        rates["weights read % of copy bandwidth"] = 100 * weight_gbps / ceilings.copy_gbps
    return rates


def run_layer_command(args, device: torch.device, dtype: torch.dtype) -> int:
    case = _case(args, args.router, dtype)
    per_case = _run_ranks(args, [case], args.check)
    if per_case is None:
        return 0
    results = per_case[0]
    world, backend = _world(args)
    s = _summary(results)
    info = machine_info(device)
    title = (
        f"MoE layer on {world} ranks ({backend}, {info['kind']}): T={case.tokens_per_rank}/rank "
        f"H={args.hidden} F={args.ffn} E={args.experts} K={args.topk} shared={args.shared} {dtype}, "
        f"{args.dispatcher} + {args.experts_backend}, median ms of the slowest rank"
    )
    rows = [[name, s[name]] for name in PHASES]
    rows += [["T_comm (dispatch + combine)", s["comm"]], ["T_compute (route + experts + shared)", s["compute"]]]
    own = ", own rank first" if args.own_first else ""
    own += ", fused combine" if args.fused_combine else ""
    rows += [[f"eta_overlap (chunks={args.chunks}, shared overlapped{own})", s["eta_overlap"]]]
    if case.capacity_factor is not None:
        rows += [
            [f"pairs dropped over capacity {case.capacity} (all ranks, last call)", sum(r.dropped for r in results)]
        ]
    rates = _layer_rates(case, results, s, backend)
    s.update(rates)
    rows += [[name, value] for name, value in rates.items()]
    status = 0
    if args.check:
        error, tolerance = _check(case, results, backend)
        status = 0 if error <= tolerance else 1
        rows.append(["relative error vs oracle", f"{error:.2e} ({'PASS' if status == 0 else 'FAIL'} <= {tolerance:g})"])
    print_table(title, ["phase", "ms"], rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "case": repr(case), "summary": s,
                                         "ranks": [as_dict(r) for r in results]}, indent=2))  # fmt: skip
    return status


def run_ep_command(args, device: torch.device, dtype: torch.dtype) -> int:
    routers = list(args.router or ["softmax_topk"])
    if args.all_strategies:
        probe = torch.device("cuda") if args.gpus else torch.device("cpu")
        routers = [r for r in STRATEGIES if ROUTERS.get(r).supports(probe, dtype)[0]]
    cases = [_case(args, r, dtype) for r in routers]
    per_case = _run_ranks(args, cases, check=False)
    if per_case is None:
        return 0
    world, backend = _world(args)
    summaries = [_summary(results) for results in per_case]
    skews = [_load_skew(results, world) for results in per_case]
    base_route = summaries[0]["route"]
    info = machine_info(device)
    title = (
        f"expert-parallel layer per router on {world} ranks ({backend}, {info['kind']}): "
        f"T={cases[0].tokens_per_rank}/rank H={args.hidden} F={args.ffn} E={args.experts} K={args.topk} "
        f"skew {args.skew_experts}x{args.skew_bias:g}, {args.dispatcher} + {args.experts_backend}, ms (slowest rank)"
    )
    columns = ["router", "ΔT_select", "T_comm", "T_compute", "T_layer sync", "T_layer overlap", "eta_overlap"]
    columns += ["expert max/mean", "expert CV", "rank max/mean", "rank CV"]
    rows = [
        [r, s["route"] - base_route, s["comm"], s["compute"], s["layer_sync"], s["layer_overlapped"], s["eta_overlap"]]
        + [k["expert_max_mean"], k["expert_cv"], k["rank_max_mean"], k["rank_cv"]]
        for r, s, k in zip(routers, summaries, skews)
    ]
    print_table(title, columns, rows)
    if args.json:
        payload = {
            "machine": info,
            "results": [
                {"router": r, "summary": s, "load": k, "runs": args.runs} for r, s, k in zip(routers, summaries, skews)
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0
