"""The pre-norm decoder shared by Llama, Qwen2 and Qwen3; each model file picks its variant with ``DecoderOptions``.

Parameter names equal the Hugging Face ones (``model.layers.{i}.self_attn.q_proj.weight``, ...), so a checkpoint's
keys are the module's state_dict keys with no renaming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fabrik.config import KV_CACHE_DTYPES
from fabrik.model_config import ModelConfig
from fabrik.models.attention import AttentionMetadata, StepBatch, paged_attention
from fabrik.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary


@dataclass(frozen=True)
class DecoderOptions:
    """Where the supported architectures differ."""

    qkv_bias: bool
    """Whether q/k/v projections have a bias."""
    o_bias: bool
    """Whether the output projection has a bias."""
    qk_norm: bool
    """Whether each query and key head is RMS-normed before RoPE (Qwen3)."""
    mlp_bias: bool
    """Whether the MLP projections have a bias."""


class DecoderAttention(nn.Module):
    """Self-attention with grouped-query heads, rotary positions and a paged KV cache."""

    def __init__(self, config: ModelConfig, options: DecoderOptions) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=options.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=options.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=options.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=options.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)  # (T, Hq, D)
            k = self.k_norm(k)  # (T, Hkv, D)
        q = apply_rotary(q, cos, sin)  # (T, Hq, D)
        k = apply_rotary(k, cos, sin)  # (T, Hkv, D)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))  # (T, hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, options: DecoderOptions) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, options.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)  # (T, hidden)
        return x + self.mlp(self.post_attention_layernorm(x))  # (T, hidden)


class DecoderModel(nn.Module):
    """Embedding, decoder layers and the final norm (the ``model.`` prefix of the checkpoint keys)."""

    def __init__(self, config: ModelConfig, options: DecoderOptions) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, options) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)  # (T, D) each
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)  # (T, hidden)
        return self.norm(x)  # (T, hidden)


class DecoderForCausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    Subclasses only choose ``DecoderOptions``. With tied embeddings there is no ``lm_head`` module: the logits reuse
    ``model.embed_tokens.weight``, so the state_dict has exactly the keys a tied checkpoint stores.
    """

    kv_cache_dtypes = KV_CACHE_DTYPES
    """KV cache kinds its attention reads (``paged_attention`` and the native forward handle both)."""

    def __init__(self, config: ModelConfig, options: DecoderOptions) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, options)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.lm_head_kernel: nn.Module | None = None
        """Set by ``fabrik.kernels.apply_kernels``: a packed LM head that replaces the projection in compute_logits."""
        self.native_forward: Callable[..., torch.Tensor] | None = None
        """Set by ``fabrik.kernels.apply_kernels``: runs the whole stack natively in place of the modules' forward."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Runs this step's new tokens of all sequences through the model.

        Args:
            input_ids: (T,) int64 new tokens of all sequences, flattened.
            positions: (T,) int64 absolute position of each token in its sequence.
            kv_caches: One (2, num_blocks, Hkv, block_size, D) cache per layer, updated in place.
            attn_metadata: Where the tokens sit in the cache.

        Returns:
            (T, hidden) final-normed hidden states.
        """
        if self.native_forward is not None:
            return self.native_forward(input_ids, positions, kv_caches, attn_metadata)
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Projects (N, hidden) hidden states to (N, vocab) float32 logits."""
        if self.lm_head_kernel is not None:
            return self.lm_head_kernel(hidden)  # (N, vocab) float32
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # (vocab, hidden)
        return F.linear(hidden, weight).float()  # (N, vocab)

    def forward_and_logits(self, batch: StepBatch, kv_caches: list[torch.Tensor], rows: Sequence[int], argmax: bool,
                           need_hidden: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int] | None]:
        """``forward`` of ``batch``, then the logits of its hidden ``rows`` (ascending) and, with ``argmax``, each
        logits row's argmax when the LM head finds it in passing (``compute_logits_and_argmax``). When the native
        forward runs the LM head too, this is one native call with no torch call around it (the Python between two
        calls, and each torch call, starts with cold caches: ~0.2 ms a step).

        Returns:
            (T, hidden) hidden states (None is allowed when not ``need_hidden``); (len(rows), vocab) float32 logits
            (None without rows, and allowed when the argmax comes back); the argmax or None.
        """
        native = self.native_forward
        if rows and getattr(native, "has_head", False):
            return native.forward_logits(batch, kv_caches, rows, argmax, need_hidden)  # type: ignore
        input_ids, positions, meta = batch.tensors()
        with torch.inference_mode():
            hidden = self(input_ids, positions, kv_caches, meta)  # (T, hidden)
            if not rows:
                return hidden, None, None
            picked = hidden if len(rows) == hidden.shape[0] else hidden[list(rows)]  # (R, hidden)
            if argmax:
                return hidden, *self.compute_logits_and_argmax(picked)
            return hidden, self.compute_logits(picked), None

    def compute_logits_and_argmax(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """``compute_logits``, and each row's argmax (lowest id on ties, -1 for a NaN row) when the LM head kernel
        finds it while it writes the logits (greedy sampling then reads none of them back); else None."""
        with_argmax = getattr(self.lm_head_kernel, "forward_with_argmax", None)
        if with_argmax is not None and hidden.shape[0] > 0:
            return with_argmax(hidden)  # (N, vocab) float32, N ids
        return self.compute_logits(hidden), None
