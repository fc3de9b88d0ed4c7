"""Models built from moekit's layers, for `moekit run`, end-to-end checks and ONNX export (moekit.export).

moe_layer (MoEBlock): one MoELayer on x [B, S, D]; transformer_decoder (TransformerDecoder) and
decoder_moe (DecoderMoE): input_ids [B, S] -> logits [B, S, V], dense or MoE MLPs.
"""

# decoder imports moe_block: registration (and table) order is moe_layer, transformer_decoder, decoder_moe
from moekit.models.config import DecoderConfig
from moekit.models.decoder import DecoderBlock, DecoderMoE, TransformerDecoder
from moekit.models.moe_block import MoEBlock
from moekit.models.registry import MODELS, build_model, model_name

__all__ = [
    "MODELS",
    "DecoderBlock",
    "DecoderConfig",
    "DecoderMoE",
    "MoEBlock",
    "TransformerDecoder",
    "build_model",
    "model_name",
]
