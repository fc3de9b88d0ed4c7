"""moekit: Mixture-of-Experts building blocks for NVIDIA GPUs, each held to a pure-PyTorch oracle."""

from moekit.config import MoEConfig
from moekit.experts import EXPERT_BACKENDS
from moekit.layer import MoELayer
from moekit.problem import MoEProblem, make_problem
from moekit.quantize import QuantizedMoEWeights, quantize_weights
from moekit.reference import reference_moe
from moekit.routing import ROUTERS, Routing, load_stats, route
from moekit.weights import MoEWeights, init_weights

__version__ = "0.1.0"

__all__ = [
    "EXPERT_BACKENDS",
    "ROUTERS",
    "MoEConfig",
    "MoELayer",
    "MoEProblem",
    "MoEWeights",
    "QuantizedMoEWeights",
    "Routing",
    "init_weights",
    "load_stats",
    "make_problem",
    "quantize_weights",
    "reference_moe",
    "route",
]
