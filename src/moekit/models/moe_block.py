"""MoEBlock: one moekit.layer.MoELayer on [B, S, D] activations, the `moe_layer` model and the MoE half
of a DecoderMoE block."""

from __future__ import annotations

import torch
from torch import nn

from moekit.layer import MoELayer
from moekit.models.config import DecoderConfig
from moekit.models.registry import MODELS
from moekit.validation import check_tensor


@MODELS.register("moe_layer")
class MoEBlock(nn.Module):
    """x [B, S, D] in config.dtype -> y [B, S, D]: the B*S tokens routed to top-K of E experts.

    The MoELayer (self.moe) holds the weights, in moekit's layout, and computes with config.expert_backend.
    """

    input_name, output_name = "x", "y"

    def __init__(self, config: DecoderConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.moe = MoELayer(config.moe_config(), backend=config.expert_backend, seed=seed, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(None, None, self.config.d_model), dtypes=(self.config.dtype,))
        B, S, D = x.shape
        return self.moe(x.reshape(B * S, D)).reshape(B, S, D)

    def example_inputs(self, batch: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor]:
        """(x [batch, seq_len, D],) standard normal in config.dtype, on the model's device."""
        device = self.moe.w_gate_up.device
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(batch, seq_len, self.config.d_model, generator=g, device=device)
        return (x.to(self.config.dtype),)
