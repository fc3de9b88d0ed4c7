"""TransformerDecoder and DecoderMoE: token embedding, pre-norm blocks (causal attention, then a SwiGLU MLP
or an MoE layer), final norm, LM head. input_ids [B, S] -> logits [B, S, V]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.attention import CausalSelfAttention
from moekit.models.config import DecoderConfig
from moekit.models.init import normal_parameter
from moekit.models.mlp import SwiGLU
from moekit.models.moe_block import MoEBlock
from moekit.models.norm import RMSNorm
from moekit.models.registry import MODELS
from moekit.validation import check_ids_in_range, check_tensor


class DecoderBlock(nn.Module):
    """x [B, S, D] -> x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: DecoderConfig, generator: torch.Generator, ffn: nn.Module) -> None:
        super().__init__()
        device = generator.device
        self.attn_norm = RMSNorm(config.d_model, config.dtype, device)
        self.attn = CausalSelfAttention(config, generator)
        self.ffn_norm = RMSNorm(config.d_model, config.dtype, device)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.ffn(self.ffn_norm(h))


@MODELS.register("transformer_decoder")
class TransformerDecoder(nn.Module):
    """input_ids [B, S] int64 (or int32) in [0, V) -> logits [B, S, V] in config.dtype; dense SwiGLU MLPs.

    Weights: embed_tokens [V, D], per block w_qkv [3D, D], w_o [D, D] and the MLP's, lm_head [V, D]
    (untied). The same seed gives the same weights on the same kind of device.
    """

    input_name, output_name = "input_ids", "logits"

    def __init__(self, config: DecoderConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        # one seed per block for the MoE layers, which draw their own weights (moekit.weights.init_weights)
        block_seeds = torch.randint(0, 2**31 - 1, (config.n_layers,), generator=torch.Generator().manual_seed(seed))
        D, V = config.d_model, config.vocab_size
        self.embed_tokens = normal_parameter((V, D), 1.0, generator, config.dtype)
        self.blocks = nn.ModuleList(
            DecoderBlock(config, generator, self.make_ffn(config, generator, int(s))) for s in block_seeds
        )
        self.norm = RMSNorm(D, config.dtype, device)
        self.lm_head = normal_parameter((V, D), D**-0.5, generator, config.dtype)

    def make_ffn(self, config: DecoderConfig, generator: torch.Generator, block_seed: int) -> nn.Module:
        """The feed-forward half of a block: a dense SwiGLU MLP [B, S, D] -> [B, S, D]."""
        return SwiGLU(config, generator)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        check_ids_in_range("input_ids", input_ids, self.config.vocab_size)
        h = F.embedding(input_ids, self.embed_tokens)
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.lm_head)

    def example_inputs(self, batch: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor]:
        """(input_ids [batch, seq_len] int64,) uniform over the vocabulary, on the model's device."""
        device = self.embed_tokens.device
        g = torch.Generator(device=device).manual_seed(seed)
        return (torch.randint(0, self.config.vocab_size, (batch, seq_len), generator=g, device=device),)


@MODELS.register("decoder_moe")
class DecoderMoE(TransformerDecoder):
    """TransformerDecoder whose every block's MLP is an MoE layer (MoEBlock: top-K of E SwiGLU experts,
    each of size mlp_hidden_dim, through config.router and config.expert_backend)."""

    def make_ffn(self, config: DecoderConfig, generator: torch.Generator, block_seed: int) -> nn.Module:
        """The feed-forward half of a block: an MoEBlock with weights drawn from block_seed."""
        return MoEBlock(config, device=generator.device, seed=block_seed)
