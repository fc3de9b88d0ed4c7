"""The expert-backend registry.

A backend computes the routed experts: fn(x [T, H], topk_ids [T, K], topk_weights [T, K],
weights: MoEWeights) -> y [T, H] in x.dtype, y = sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x).
Shared experts are not its business: the layer adds them.

A backend built around rows grouped by expert also registers that middle part as its sorted-rows form,
fn(rows [M, H] grouped by expert, expert_offsets [E + 1] int64 on the rows' device, weights) -> [M, H]:
each row through its expert's MLP once, unweighted (expert e owns rows offsets[e]:offsets[e + 1]). An
expert-parallel rank receives its rows already grouped that way, so it skips the routing, the permute and
the unpermute (moekit.ep.local_experts).

A backend registered with trains=True backpropagates to x, topk_weights and the expert weights, its gradients
held to the float64 oracle's (tests/unit/test_expert_gradients.py); any other refuses grad-requiring inputs in
grad mode with an error that names the ones that train.

FP8 backends sit in a registry of their own, FP8_EXPERT_BACKENDS: fn(x [T, H], topk_ids, topk_weights,
weights: QuantizedMoEWeights) -> y [T, H] in x.dtype, computing on the e4m3 weights and e4m3 activations, with
supports(device, dtype, scheme) -> (ok, reason) for x's dtype and the weights' scheme ("block" or "row").
"""

from collections.abc import Callable

from moekit.registry import Registry

EXPERT_BACKENDS = Registry("expert backend", guard_training=True)
FP8_EXPERT_BACKENDS = Registry("FP8 expert backend", guard_training=True)
SORTED_ROWS: dict[str, Callable] = {}
# an FP8 backend's sorted-rows form: fn(rows: QuantizedRows [M, H] grouped by expert, expert_offsets [E + 1],
# weights: QuantizedMoEWeights of those E experts, out_dtype) -> [M, H] unweighted, as an FP8 dispatch delivers them
FP8_SORTED_ROWS: dict[str, Callable] = {}


def sorted_rows_form(backend_name: str, fp8: bool = False):
    """Decorator: register fn as the sorted-rows form of the backend of that name (an FP8 backend's: fp8=True)."""
    forms = FP8_SORTED_ROWS if fp8 else SORTED_ROWS

    def decorate(fn: Callable) -> Callable:
        if backend_name in forms:
            raise ValueError(f"expert backend {backend_name!r} has a sorted-rows form already")
        forms[backend_name] = fn
        return fn

    return decorate
