"""The expert-backend registry.

A backend computes the routed experts: fn(x [T, H], topk_ids [T, K], topk_weights [T, K],
weights: MoEWeights) -> y [T, H] in x.dtype, y = sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x).
Shared experts are not its business: the layer adds them.
"""

from moekit.registry import Registry

EXPERT_BACKENDS = Registry("expert backend")
