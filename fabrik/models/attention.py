"""Paged attention: the KV cache layout, the per-step metadata, and the torch reference implementation.

The KV cache of one layer is a single tensor split into fixed-size blocks. A sequence owns a list of blocks (its
block table); token ``p`` of the sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``. Blocks of one sequence need not be contiguous or ordered::

    kv_cache[layer]: (2, num_blocks, num_kv_heads, block_size, head_dim)    index 0 = K, 1 = V

    block table of seq A: [5, 2, 7]     positions  0..3 -> block 5, 4..7 -> block 2, 8..9 -> block 7
                          block 5         block 2         block 7
                          [p0 p1 p2 p3]   [p4 p5 p6 p7]   [p8 p9 -- --]     (block_size 4, seq_len 10)

Each step feeds every sequence's *new* tokens, flattened into one batch of T tokens. ``paged_attention`` first
writes their K/V into ``slot_mapping`` slots, then lets each new token attend causally to all of its sequence's
positions through the block table. The same call serves whole prompts, chunks of a prompt (after earlier chunks or a
prefix-cache hit) and single decode tokens, mixed in one batch.

Inside a block each KV head's ``block_size`` rows are contiguous (head-major), so attention over one head reads
whole runs of ``block_size * head_dim`` values instead of one ``head_dim`` slice out of every token's row: at decode,
reading the cache is as much memory traffic as the weights once a batch holds a few long sequences.

With ``kv_cache_dtype="int8"`` the cache holds 8-bit rows with one scale per token and head instead (layout and
quantization in fabrik/models/kv_int8.py); ``paged_attention`` writes and reads either kind.

``paged_attention`` is the only entry point the models call, so a native kernel can replace it without touching them.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fabrik.config import KV_CACHE_DTYPES
from fabrik.model_config import ModelConfig
from fabrik.models import kv_int8


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache."""

    slot_mapping: torch.Tensor
    """(T,) int64: cache slot = block_id * block_size + offset for each new token's K/V."""
    query_start_loc: tuple[int, ...]
    """(S+1,) offsets of each sequence's new tokens in the flattened batch (0, ..., T)."""
    seq_lens: tuple[int, ...]
    """(S,) KV length of each sequence after this step (tokens already cached + new)."""
    block_tables: torch.Tensor
    """(S, max_blocks) int64 block ids of each sequence, padded with 0."""
    block_size: int
    """Tokens per KV cache block."""


@dataclass(frozen=True)
class StepBatch:
    """One step's flattened batch (the model runner's docstring draws it), built without torch: per-token fields and
    block tables in plain int64 arrays, lengths in tuples. Right after a native forward has streamed the weights the
    caches are cold and each torch call costs ~10-40 us, while the native forward reads these arrays in place.
    ``tensors()`` gives the module-by-module path its inputs."""

    input_ids: array
    """(T,) 'q': new tokens of all sequences, flattened."""
    positions: array
    """(T,) 'q': absolute position of each new token in its sequence."""
    slot_mapping: array
    """(T,) 'q': cache slot of each new token's K/V (``AttentionMetadata.slot_mapping``)."""
    query_start_loc: tuple[int, ...]
    """(S+1,) offsets of each sequence's new tokens in the batch (0, ..., T)."""
    seq_lens: tuple[int, ...]
    """(S,) KV length of each sequence after this step."""
    block_tables: array
    """(S * max_blocks,) 'q': each sequence's block ids, row after row, padded with 0."""
    max_blocks: int
    """Length of a row of ``block_tables``."""
    block_size: int
    """Tokens per KV cache block."""

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(T,) input ids, (T,) positions and the ``AttentionMetadata`` of the same batch, as int64 tensors."""
        ids, positions, slots, tables = (_int64_tensor(a) for a in
                                         (self.input_ids, self.positions, self.slot_mapping, self.block_tables))
        tables = tables.view(len(self.seq_lens), self.max_blocks)
        return ids, positions, AttentionMetadata(slots, self.query_start_loc, self.seq_lens, tables, self.block_size)


def _int64_tensor(values: array) -> torch.Tensor:
    """A copy of an int64 array as a tensor (``torch.tensor`` reads it one element at a time: 142 against 4 us for
    2,048 ids)."""
    if values.typecode != "q":
        raise ValueError(f"expected an int64 ('q') array, got typecode {values.typecode!r}")
    return torch.frombuffer(values, dtype=torch.int64).clone() if len(values) else torch.empty(0, dtype=torch.int64)


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, int, int, int, int]:
    """Shape of one layer's KV cache tensor: (2, num_blocks, num_kv_heads, block_size, head_dim)."""
    return (2, num_blocks, config.num_key_value_heads, block_size, config.head_dim)


def make_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> list[torch.Tensor]:
    """One zeroed cache per layer: ``dtype`` rows of ``kv_cache_shape``, or the int8 layout of kv_int8.py."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
    if kv_cache_dtype == "int8":
        shape, dtype = kv_int8.int8_kv_shape(num_blocks, config.num_key_value_heads, block_size, config.head_dim), \
            torch.int8
    else:
        shape = kv_cache_shape(config, num_blocks, block_size)
    # Zeroed, not empty: padded attention reads must never meet NaN garbage.
    return [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes of K and V one token takes across all layers (what the memory planner divides the budget by)."""
    if kv_cache_dtype == "int8":
        row = config.head_dim + kv_int8.SCALE_BYTES
    else:
        row = config.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * row


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores (T, Hkv, D) keys and values into their cache slots in place."""
    _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
    # Row of (slot, head) in the (num_blocks * Hkv * block_size, D) view: (block * Hkv + head) * block_size + offset.
    block, offset = slot_mapping // block_size, slot_mapping % block_size  # (T,)
    heads = torch.arange(num_kv_heads)  # (Hkv,)
    rows = ((block[:, None] * num_kv_heads + heads[None, :]) * block_size + offset[:, None]).reshape(-1)  # (T*Hkv,)
    # NOTE: view, not reshape: a reshape that copied would silently drop the write.
    kv_cache[0].view(-1, head_dim).index_copy_(0, rows, k.reshape(-1, head_dim))
    kv_cache[1].view(-1, head_dim).index_copy_(0, rows, v.reshape(-1, head_dim))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Writes the new keys/values into the cache, then attends every new query to its sequence's cached history.

    Args:
        q: (T, Hq, D) queries of the new tokens, rotary already applied.
        k: (T, Hkv, D) keys of the new tokens, rotary (and any key norm) already applied.
        v: (T, Hkv, D) values of the new tokens.
        kv_cache: (2, num_blocks, Hkv, block_size, D) this layer's cache, updated in place.
        meta: Where the new tokens go and which blocks each sequence owns.
        scale: Multiplier of q·k, usually head_dim ** -0.5.

    Returns:
        (T, Hq, D) attention output, in q's dtype.
    """
    if kv_cache.dtype == torch.int8:
        kv_int8.write(k, v, kv_cache, meta.slot_mapping, meta.block_size)
    else:
        write_kv(k, v, kv_cache, meta.slot_mapping)
    num_seqs = len(meta.seq_lens)
    if meta.query_start_loc == tuple(range(num_seqs + 1)):
        # Every sequence has exactly one new token: one batched call over the padded block tables.
        return _decode_attention(q, kv_cache, meta, scale)
    out = torch.empty_like(q)  # (T, Hq, D)
    for i in range(num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        out[start:end] = _sequence_attention(q[start:end], kv_cache, meta.block_tables[i], meta.seq_lens[i],
                                             meta.block_size, scale)
    return out


def _read_blocks(kv_cache: torch.Tensor, blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """K and V of ``blocks`` (B...): (2, B..., Hkv, block_size, D), dequantized to q's dtype from an int8 cache."""
    if kv_cache.dtype == torch.int8:
        return kv_int8.read(kv_cache, blocks, q.shape[-1], q.dtype)
    return kv_cache[:, blocks]


def _sequence_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                        block_size: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's (L, Hq, D) new queries over its first ``seq_len`` cached positions."""
    q_len = q.shape[0]
    num_blocks = -(-seq_len // block_size)
    kv = _read_blocks(kv_cache, block_table[:num_blocks], q)  # (2, B, Hkv, bs, D)
    _, _, num_kv_heads, _, head_dim = kv.shape
    keys = kv[0].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]  # (Hkv, S, D)
    values = kv[1].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]  # (Hkv, S, D)
    if q_len == seq_len:
        mask = None  # a whole prompt: plain causal attention
    else:
        # New tokens sit at the end: query j is at position seq_len - q_len + j and sees positions 0..that.
        query_pos = torch.arange(seq_len - q_len, seq_len)  # (L,)
        mask = torch.arange(seq_len)[None, :] <= query_pos[:, None]  # (L, S) True = attend
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # (Hq, L, D)
        keys,  # (Hkv, S, D)
        values,  # (Hkv, S, D)
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )  # (Hq, L, D)
    return out.transpose(0, 1)  # (L, Hq, D)


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """Attention of one (S, Hq, D) query per sequence over the whole cached history, batched."""
    num_seqs = q.shape[0]
    seq_lens = torch.tensor(meta.seq_lens, dtype=torch.int64)  # (S,)
    max_blocks = -(-max(meta.seq_lens) // meta.block_size)
    kv = _read_blocks(kv_cache, meta.block_tables[:, :max_blocks], q)  # (2, S, B, Hkv, bs, D)
    _, _, _, num_kv_heads, _, head_dim = kv.shape
    # (S, B, Hkv, bs, D) -> (S, Hkv, P, D), P = B * block_size
    keys = kv[0].transpose(1, 2).reshape(num_seqs, num_kv_heads, -1, head_dim)
    values = kv[1].transpose(1, 2).reshape(num_seqs, num_kv_heads, -1, head_dim)
    valid = torch.arange(keys.shape[2])[None, :] < seq_lens[:, None]  # (S, P)
    # NOTE: padding slots may hold anything, even NaN from an uninitialised cache, and a masked NaN still poisons
    # softmax(QK)V (0 * NaN = NaN), so they are zeroed as well as masked.
    keys.masked_fill_(~valid[:, None, :, None], 0)
    values.masked_fill_(~valid[:, None, :, None], 0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # (S, Hq, 1, D)
        keys,  # (S, Hkv, P, D)
        values,  # (S, Hkv, P, D)
        attn_mask=valid[:, None, None, :],  # (S, 1, 1, P)
        scale=scale,
        enable_gqa=True,
    )  # (S, Hq, 1, D)
    return out[:, :, 0, :]  # (S, Hq, D)
