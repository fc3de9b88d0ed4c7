"""The model registry: `moekit run --model NAME` and the ONNX exporter know the models registered here.

A model class takes (config: DecoderConfig, *, device, seed), names its one input and one output
(input_name, output_name: the ONNX graph's names) and draws example inputs [B, S, ...] for a batch size
and sequence length (example_inputs); both dims are dynamic in an exported graph.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.models.config import DecoderConfig
from moekit.registry import Registry

MODELS = Registry("model")


def build_model(name: str, config: DecoderConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """The model registered as name, built from config with seeded weights on device, in eval mode."""
    cls = MODELS.get(name).fn
    if not isinstance(config, DecoderConfig):
        raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
    return cls(config, device=device, seed=seed).eval()


def model_name(model: nn.Module) -> str | None:
    """The registered name of model's class, or None for a module that is not a registered model."""
    return next((impl.name for impl in MODELS if type(model) is impl.fn), None)
