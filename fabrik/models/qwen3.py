"""Qwen3: Llama-style decoder with an RMSNorm on every query and key head before RoPE, no projection biases."""

from __future__ import annotations

from fabrik.model_config import ModelConfig
from fabrik.models.decoder import DecoderForCausalLM, DecoderOptions


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3 dense model (``model_type: "qwen3"``)."""

    def __init__(self, config: ModelConfig) -> None:
        bias = config.attention_bias
        super().__init__(config, DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_bias=False))
