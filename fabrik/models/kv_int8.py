"""The 8-bit KV cache (``kv_cache_dtype="int8"``): its layout, quantized writes and dequantized reads.

This is the torch reference of the native kernels (csrc/forward.c writes, csrc/attention*.c read), which use the
same layout. One layer's cache is an int8 tensor (2, num_blocks, Hkv, block_size * (head_dim + 4)): for K and for V,
per (block, KV head), a region of ``block_size`` rows of head_dim int8 values, then one float32 scale per row::

    region (K or V, block b, head h):  [row 0: D x int8] [row 1] ... [row bs-1] [scale 0 .. scale bs-1: float32]

Row p holds round(x / s) with s = max|x| / 127 over that token's head_dim values (symmetric, per token and KV head;
llama.cpp's ``q8_0`` KV cache keeps one scale per 32 values): a zero row has s = 0 and reads back as zeros. A head's
row of 128 bf16 values (256 bytes) becomes 132 bytes: the decode attention reads 48% fewer bytes.
"""

from __future__ import annotations

import torch


SCALE_BYTES = 4  # one float32 per row


def int8_kv_shape(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's int8 cache: (2, num_blocks, Hkv, block_size * (head_dim + 4))."""
    return (2, num_blocks, num_kv_heads, block_size * (head_dim + SCALE_BYTES))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) rows -> (N, D) int8 values and (N,) float32 scales, x ~= values * scales[:, None]."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127  # (N,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row stays zero
    return (x / safe[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          block_size: int) -> None:
    """Quantizes (T, Hkv, D) keys and values into their cache slots in place."""
    _, _, num_kv_heads, region = kv_cache.shape
    head_dim = k.shape[-1]
    block, offset = slot_mapping // block_size, slot_mapping % block_size  # (T,)
    heads = torch.arange(num_kv_heads)  # (Hkv,)
    base = ((block[:, None] * num_kv_heads + heads[None, :]) * region).reshape(-1)  # (T*Hkv,) region starts
    rows = (base + offset.repeat_interleave(num_kv_heads) * head_dim)[:, None] + torch.arange(head_dim)  # (T*Hkv, D)
    scales = (base + block_size * head_dim + offset.repeat_interleave(num_kv_heads) * SCALE_BYTES)[:, None] + \
        torch.arange(SCALE_BYTES)  # (T*Hkv, 4) bytes of each row's scale
    for half, x in ((0, k), (1, v)):
        values, scale = quantize_rows(x.reshape(-1, head_dim))
        flat = kv_cache[half].view(-1)  # NOTE: view, not reshape: a copy would silently drop the write
        flat[rows.reshape(-1)] = values.reshape(-1)
        flat[scales.reshape(-1)] = scale.view(torch.int8)


def read(kv_cache: torch.Tensor, blocks: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized K and V of ``blocks`` (any shape B...): (2, B..., Hkv, block_size, head_dim) in ``dtype``."""
    region = kv_cache.shape[-1]
    block_size = region // (head_dim + SCALE_BYTES)
    regions = kv_cache[:, blocks]  # (2, B..., Hkv, region)
    values = regions[..., :block_size * head_dim].unflatten(-1, (block_size, head_dim)).float()
    scales = regions[..., block_size * head_dim:].contiguous().view(torch.float32)  # (2, B..., Hkv, bs)
    return (values * scales[..., None]).to(dtype)
