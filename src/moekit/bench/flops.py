"""Work counts of MoE stages, for achieved TFLOP/s and GB/s."""

from moekit.config import MoEConfig


def routed_expert_flops(num_tokens: int, config: MoEConfig) -> float:
    """Matmul FLOPs of the routed experts: T*K rows through gate+up (2*H*2F each) and down (2*F*H)."""
    return 6.0 * num_tokens * config.top_k * config.hidden_size * config.ffn_size
