"""Hypothesis strategies that draw whole MoE problems, edges included.

T = 0 and 1, experts with no token (small T, many experts), all tokens on one expert (a strong skew),
K = E, and sizes that are not powers of two are all in the drawn space and favoured by explicit
examples in the tests that use these strategies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from moekit.config import MoEConfig
from moekit.problem import MoEProblem, make_problem
from moekit.routing import ROUTERS


@dataclass(frozen=True)
class MoECase:
    """A drawn problem: a config, T, a seed and a skew; .problem(device) materialises it."""

    config: MoEConfig
    num_tokens: int
    seed: int
    skew_experts: int = 0
    skew_amount: float = 0.0

    def problem(self, device: torch.device | str = "cpu") -> MoEProblem:
        return make_problem(
            self.config,
            self.num_tokens,
            seed=self.seed,
            skew_experts=self.skew_experts,
            skew_amount=self.skew_amount,
            device=device,
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def moe_configs(
    draw,
    *,
    dtypes=(torch.float32, torch.float64),
    routers: tuple[str, ...] | None = None,
    max_experts: int = 16,
    min_hidden: int = 1,
    max_hidden: int = 48,
    size_multiple: int = 1,
    shared: bool = True,
) -> MoEConfig:
    """A valid MoEConfig: E in [1, max_experts], K in [1, E] (K = E included), odd sizes allowed.

    H, F and the shared size lie in [min_hidden, max_hidden] (multiples of size_multiple, for backends
    that need aligned rows). fp16/bf16 tests ask for min_hidden >= 16: a one-element output (H = 1)
    that cancels to near zero has no rounding budget left to average.
    """
    sizes = st.integers(-(-min_hidden // size_multiple), max(1, max_hidden // size_multiple)).map(
        lambda n: n * size_multiple
    )
    router = draw(st.sampled_from(routers or tuple(ROUTERS.names())))
    num_experts = draw(st.integers(1, max_experts))
    n_group = topk_group = 1
    if router == "grouped_topk":
        n_group = draw(st.sampled_from(_divisors(num_experts)))
        topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * (num_experts // n_group)))
    num_shared = draw(st.integers(0, 2)) if shared else 0
    return MoEConfig(
        hidden_size=draw(sizes),
        ffn_size=draw(sizes),
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=num_shared,
        shared_ffn_size=draw(sizes) if num_shared else None,
        router=router,
        renormalize=draw(st.booleans()),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        sinkhorn_iterations=draw(st.integers(0, 12)),
        sinkhorn_temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
        dtype=draw(st.sampled_from(dtypes)),
    )


@st.composite
def moe_cases(draw, *, max_tokens: int = 64, **config_kwargs) -> MoECase:
    """A whole problem: config, T in [0, max_tokens] (0 and 1 favoured), seed, and an optional skew.

    A skew of 50 on one expert sends every token's first choice there (all tokens on one expert).
    """
    config = draw(moe_configs(**config_kwargs))
    num_tokens = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, max_tokens)))
    skew = draw(
        st.one_of(
            st.just((0, 0.0)),
            st.tuples(st.integers(1, config.num_experts), st.floats(0.5, 4.0)),
            st.just((1, 50.0)),
        )
    )
    return MoECase(config, num_tokens, draw(st.integers(0, 2**31 - 1)), *skew)


@st.composite
def expert_row_counts(draw, max_experts: int = 6, max_rows: int = 40) -> list[int]:
    """Rows per expert for the grouped kernels: independent counts, every expert empty, or every row on one."""
    E = draw(st.integers(1, max_experts))
    shape = draw(st.sampled_from(["any", "empty", "one"]))
    if shape == "empty":
        return [0] * E
    if shape == "one":
        counts = [0] * E
        counts[draw(st.integers(0, E - 1))] = draw(st.integers(1, max_rows))
        return counts
    return draw(st.lists(st.integers(0, max_rows), min_size=E, max_size=E))
