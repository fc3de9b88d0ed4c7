"""Expert-compute backends, registered by name in EXPERT_BACKENDS.

The first ten are the levels of the optimisation journey (`moekit bench journey`), in order.
"""

from moekit.experts import naive, batched, fused_act, memeff, grouped_loop, grouped_mm  # noqa: F401
from moekit.experts import grouped_mm_fused, triton_grouped, cuda_graph, compiled, masked_matmul  # noqa: F401
from moekit.experts import triton_grouped_fp8, scaled_grouped_mm, cuda_graph_fp8  # noqa: F401
from moekit.experts.registry import EXPERT_BACKENDS, FP8_EXPERT_BACKENDS

JOURNEY = (
    "naive",
    "batched",
    "fused_act",
    "memeff",
    "grouped_loop",
    "grouped_mm",
    "grouped_mm_fused",
    "triton_grouped",
    "cuda_graph",
    "compiled",
)

__all__ = ["EXPERT_BACKENDS", "FP8_EXPERT_BACKENDS", "JOURNEY"]
