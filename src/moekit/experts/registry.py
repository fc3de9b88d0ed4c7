"""The expert-backend registry.

A backend computes the routed experts: fn(x [T, H], topk_ids [T, K], topk_weights [T, K],
weights: MoEWeights) -> y [T, H] in x.dtype, y = sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x).
Shared experts are not its business: the layer adds them.

A backend built around rows grouped by expert also registers that middle part as its sorted-rows form,
fn(rows [M, H] grouped by expert, expert_offsets [E + 1] int64 on the rows' device, weights) -> [M, H]:
each row through its expert's MLP once, unweighted (expert e owns rows offsets[e]:offsets[e + 1]). An
expert-parallel rank receives its rows already grouped that way, so it skips the routing, the permute and
the unpermute (moekit.ep.local_experts).
"""

from collections.abc import Callable

from moekit.registry import Registry

EXPERT_BACKENDS = Registry("expert backend")
SORTED_ROWS: dict[str, Callable] = {}


def sorted_rows_form(backend_name: str):
    """Decorator: register fn as the sorted-rows form of the backend of that name."""

    def decorate(fn: Callable) -> Callable:
        if backend_name in SORTED_ROWS:
            raise ValueError(f"expert backend {backend_name!r} has a sorted-rows form already")
        SORTED_ROWS[backend_name] = fn
        return fn

    return decorate
