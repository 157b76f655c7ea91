"""Llama (2, 3, 3.1, 3.2): the plain pre-norm decoder; biases only when the config asks for them."""

from __future__ import annotations

from fabrik.model_config import ModelConfig
from fabrik.models.decoder import DecoderForCausalLM, DecoderOptions


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama dense model (``model_type: "llama"``)."""

    def __init__(self, config: ModelConfig) -> None:
        bias = config.attention_bias
        super().__init__(config, DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=False,
                                                mlp_bias=config.mlp_bias))
