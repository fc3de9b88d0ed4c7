"""Expert-compute backends, registered by name in EXPERT_BACKENDS."""

from moekit.experts import masked_matmul  # noqa: F401  (registers)
from moekit.experts.registry import EXPERT_BACKENDS

__all__ = ["EXPERT_BACKENDS"]
