"""Qwen2 / Qwen2.5: Llama-style decoder with a bias on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from fabrik.model_config import ModelConfig
from fabrik.models.decoder import DecoderForCausalLM, DecoderOptions


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 dense model (``model_type: "qwen2"``)."""

    def __init__(self, config: ModelConfig) -> None:
        # NOTE: Qwen2 configs carry no attention_bias field; the q/k/v bias is part of the architecture.
        super().__init__(config, DecoderOptions(qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False))
