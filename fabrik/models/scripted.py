"""``fabrik_scripted``: a test model that emits a fixed token sequence, run through the real engine and paged cache.

Server tests need the model to write an exact output (a reasoning block, a tool call) through the whole HTTP ->
engine -> sampler -> detokenizer path. This model is loaded like any checkpoint (``config.json`` with
``"model_type": "fabrik_scripted"`` and ``"script": [token ids]``) and predicts, after every position::

    m = the largest m < len(script) such that the sequence's last m tokens == script[:m]
    next token = script[m]          (logits: logit_scale on it, 0 on every other id)

so from any prompt it writes the script, and once the script is complete (m falls back to its longest proper
prefix-suffix, usually 0) it starts over. ``tests/checkpoints.py::make_scripted_checkpoint`` ends the script with the
eos id, so generation stops right after the scripted text with finish reason "stop". The match runs over prompt
tokens too: a prompt that ends with a prefix of the script skips that prefix.

The sequence is not kept in Python: ``forward`` writes each new token id into its KV-cache slot and reads every
sequence back through its block table, so a wrong slot, block table or prefix-cache block changes the output. Token
ids and predictions travel as base-16 digits, exact in bfloat16 too::

    kv_cache[0]: (2, num_blocks, 1, block_size, 8)    K = V = the 8 hex digits of the token at that slot
    hidden:      (T, 8)                               the 8 hex digits of the predicted next token
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fabrik.model_config import ModelConfig
from fabrik.models.attention import AttentionMetadata, StepBatch, write_kv

NUM_DIGITS = 8
"""Base-16 digits per token id (ids < 2**32); the hidden size and head_dim of the model."""


def _prefix_function(script: tuple[int, ...]) -> list[int]:
    """fail[i]: length of the longest proper prefix of script[:i + 1] that is also its suffix (KMP)."""
    fail = [0] * len(script)
    k = 0
    for i in range(1, len(script)):
        while k and script[i] != script[k]:
            k = fail[k - 1]
        if script[i] == script[k]:
            k += 1
        fail[i] = k
    return fail


def _to_digits(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N,) int64 ids -> (N, NUM_DIGITS) base-16 digits, least significant first."""
    shifts = 4 * torch.arange(NUM_DIGITS, dtype=torch.int64)  # (D,)
    return ((ids[:, None] >> shifts) & 15).to(dtype)  # (N, D)


def _from_digits(digits: torch.Tensor) -> torch.Tensor:
    """(N, NUM_DIGITS) base-16 digits -> (N,) int64 ids."""
    shifts = 4 * torch.arange(NUM_DIGITS, dtype=torch.int64)  # (D,)
    return (digits.round().to(torch.int64) << shifts).sum(-1)  # (N,)


class ScriptedForCausalLM(nn.Module):
    """Writes ``config.script`` whatever the prompt (see the module docstring).

    Its only weight is ``logit_scale``, the logit of the scripted token (30 makes sampling at temperature 1 pick it
    with probability ~1 - 1e-8 over a 151936-token vocabulary).

    Raises:
        ValueError: The config has no script, a script id is outside the vocabulary, or the sizes do not match the
            layout above.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        script = config.script
        if not script:
            raise ValueError("a fabrik_scripted config.json needs a non-empty 'script' list of token ids")
        bad = [t for t in script
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"script entries {bad[:5]} are not token ids below vocab_size ({config.vocab_size})")
        for name, want in (("hidden_size", NUM_DIGITS), ("head_dim", NUM_DIGITS), ("num_key_value_heads", 1)):
            if getattr(config, name) != want:
                raise ValueError(f"fabrik_scripted {name} ({getattr(config, name)}) must be {want}")
        self.config = config
        self.script = tuple(script)
        self._fail = _prefix_function(self.script)
        self.logit_scale = nn.Parameter(torch.empty(1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Stores the new tokens in the cache and predicts the next token after each of them.

        Args:
            input_ids: (T,) int64 new tokens of all sequences, flattened.
            positions: (T,) int64 absolute position of each token (implied by the metadata; unused).
            kv_caches: One (2, num_blocks, 1, block_size, NUM_DIGITS) cache per layer; layer 0 holds the tokens.
            attn_metadata: Where the tokens sit in the cache.

        Returns:
            (T, NUM_DIGITS) digits of the predicted next token after each new token.
        """
        kv_cache = kv_caches[0]
        dtype = kv_cache.dtype
        digits = _to_digits(input_ids, dtype)[:, None, :]  # (T, 1, D)
        write_kv(digits, digits, kv_cache, attn_metadata.slot_mapping)
        block_size = attn_metadata.block_size
        predictions: list[int] = []
        for i, seq_len in enumerate(attn_metadata.seq_lens):
            num_new = attn_metadata.query_start_loc[i + 1] - attn_metadata.query_start_loc[i]
            blocks = attn_metadata.block_tables[i, :-(-seq_len // block_size)]  # (B,)
            cached = kv_cache[0, blocks].reshape(-1, NUM_DIGITS)[:seq_len]  # (L, D)
            predictions.extend(self._predict(_from_digits(cached).tolist())[seq_len - num_new:])
        return _to_digits(torch.tensor(predictions, dtype=torch.int64), dtype)  # (T, D)

    def _predict(self, tokens: list[int]) -> list[int]:
        """The scripted next token after each position of ``tokens`` (a KMP scan of the script over them)."""
        script, fail = self.script, self._fail
        out = []
        m = 0  # tokens[-m:] == script[:m], m < len(script)
        for token in tokens:
            while m and token != script[m]:
                m = fail[m - 1]
            if token == script[m]:
                m += 1
            if m == len(script):
                m = fail[m - 1]
            out.append(script[m])
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, NUM_DIGITS) predicted digits -> (N, vocab) float32 logits: logit_scale on the prediction, 0 elsewhere."""
        ids = _from_digits(hidden.float())  # (N,)
        logits = torch.zeros(hidden.shape[0], self.config.vocab_size, dtype=torch.float32)  # (N, V)
        logits[torch.arange(hidden.shape[0]), ids] = self.logit_scale.float()
        return logits

    def forward_and_logits(self, batch: StepBatch, kv_caches: list[torch.Tensor], rows: Sequence[int], argmax: bool,
                           need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """``forward`` and the logits of its ``rows`` (None without rows); no argmax on the side (the sampler's)."""
        input_ids, positions, meta = batch.tensors()
        with torch.inference_mode():
            hidden = self(input_ids, positions, kv_caches, meta)
            return hidden, self.compute_logits(hidden[list(rows)]) if rows else None, None
