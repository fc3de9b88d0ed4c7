"""`moekit bench router`: per router, the time to compute logits, select experts, pack the expert
layout, and all three together, with the load statistics of the routing it produced. On GPU each step
is captured in a CUDA graph and its replays are timed (kernel time, no Python launch overhead)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moekit.bench.timing import as_cuda_graph, measure
from moekit.config import MoEConfig
from moekit.permute import expert_layout
from moekit.routing import LoadStats, load_stats, route, skew_bias


@dataclass(frozen=True)
class RouterTimes:
    """Median microseconds of each routing step, and the load statistics of the routing."""

    router: str
    t_logit_us: float
    t_select_us: float
    t_pack_us: float
    t_route_us: float
    stats: LoadStats

    def as_dict(self) -> dict:
        times = {k: getattr(self, k) for k in ("router", "t_logit_us", "t_select_us", "t_pack_us", "t_route_us")}
        return {**times, **self.stats.as_dict()}


def bench_routers(
    config: MoEConfig,
    num_tokens: int,
    routers: list[str],
    device: torch.device,
    *,
    skew_experts: int = 0,
    skew_amount: float = 0.0,
    seed: int = 0,
    runs: int = 20,
) -> list[RouterTimes]:
    """Time every router in `routers` on the same tokens x [T, H] (config.dtype) and router weight [E, H]."""
    g = torch.Generator().manual_seed(seed)
    H, E = config.hidden_size, config.num_experts
    x = torch.randn(num_tokens, H, generator=g).to(device, config.dtype)
    router_weight = (torch.randn(E, H, generator=g) * H**-0.5).to(device, config.dtype)
    logit_bias = skew_bias(E, skew_experts, skew_amount).to(device)
    # learned correction biases are small (DeepSeek-V3 updates them by 1e-3 a step); 0.1 would skew the load
    correction_bias = (torch.randn(E, generator=g) * 0.01).to(device)

    def logits_of():
        return (x @ router_weight.T).float() + logit_bias

    results = []
    for name in routers:
        cfg = replace(config, router=name)
        bias = correction_bias if name == "grouped_topk" else None
        logits = logits_of()
        routing = route(logits, cfg, bias)  # checks the inputs once, NaN included

        def select(cfg=cfg, logits=logits, bias=bias):
            return route(logits, cfg, bias, check_values=False)

        def whole(cfg=cfg, bias=bias):
            ids = route(logits_of(), cfg, bias, check_values=False).topk_ids
            return expert_layout(ids, E)

        steps = (logits_of, select, lambda ids=routing.topk_ids: expert_layout(ids, E), whole)
        if device.type == "cuda":  # kernel time: each step replayed from a CUDA graph
            steps = tuple(as_cuda_graph(step) for step in steps)
        times = [measure(step, device, runs=runs).median_ms * 1e3 for step in steps]
        stats = load_stats(routing.topk_ids, E, cfg.expert_capacity(num_tokens))
        results.append(RouterTimes(name, *times, stats))
    return results
