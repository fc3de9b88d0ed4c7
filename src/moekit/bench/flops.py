"""Work counts of MoE stages, for achieved TFLOP/s and GB/s."""

from moekit.config import MoEConfig


def routed_expert_flops(num_tokens: int, config: MoEConfig) -> float:
    """Matmul FLOPs of the routed experts: T*K rows through gate+up (2*H*2F each) and down (2*F*H)."""
    return 6.0 * num_tokens * config.top_k * config.hidden_size * config.ffn_size


def layer_flops(num_tokens: int, config: MoEConfig) -> float:
    """Matmul FLOPs of a whole layer on num_tokens tokens: the routed experts plus the shared ones."""
    shared = 6.0 * num_tokens * config.num_shared_experts * config.hidden_size * config.shared_size
    return routed_expert_flops(num_tokens, config) + shared


def expert_weight_bytes(config: MoEConfig, experts_read: int) -> float:
    """Bytes of expert weights a layer reads at least: experts_read routed experts (w_gate_up and w_down,
    3 * H * F values each) and every shared expert, in config.dtype."""
    size = config.dtype.itemsize
    routed = experts_read * 3 * config.hidden_size * config.ffn_size
    return float(size * (routed + config.num_shared_experts * 3 * config.hidden_size * config.shared_size))
