"""Expert-compute backends, registered by name in EXPERT_BACKENDS."""

from moekit.experts import naive, masked_matmul  # noqa: F401  (registers; order = table order)
from moekit.experts.registry import EXPERT_BACKENDS

__all__ = ["EXPERT_BACKENDS"]
