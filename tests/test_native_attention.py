"""The native attention kernels called directly (csrc/attention*.c through ctypes) against float64 attention over the
same cached rows: the decode kernel (one token) and the prefill tile (several), for the bf16 and the int8 cache,
on the instantiated AVX-512 shapes and on the portable path (head_dim 48)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from fabrik.kernels import select_backend
from fabrik.kernels.native import load_library
from fabrik.models import kv_int8
from fabrik.models.attention import write_kv


class _Item(ctypes.Structure):
    """Mirror of ``attn_item`` in csrc/attention.h."""

    _fields_ = [("q", ctypes.c_void_p), ("out", ctypes.c_void_p), ("k0", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("block_stride", ctypes.c_long), ("v_offset", ctypes.c_long)] + \
        [(name, ctypes.c_int) for name in ("n_keys", "G", "D", "bs", "int8")] + [("scale", ctypes.c_float),
                                                                                 ("n_heads", ctypes.c_int)]


class _Tile(ctypes.Structure):
    """Mirror of ``attn_tile`` in csrc/attention.h."""

    _fields_ = [("item", _Item), ("q_stride", ctypes.c_long), ("out_stride", ctypes.c_long), ("n_q", ctypes.c_int)]


@pytest.fixture(scope="module")
def lib():
    if select_backend("auto").name == "torch":
        pytest.skip("no native kernels on this CPU")
    return load_library().cdll


NUM_BLOCKS, HKV, BS = 40, 3, 16


def _cache(kv: str, g: int, d: int, n: int, seed: int):
    """A cache with n keys of one sequence on shuffled blocks; returns (cache, table, keys, values) where keys and
    values are the rows as the cache holds them (after rounding), (n, HKV, d) float64."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, HKV, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, HKV, d, generator=gen).to(torch.bfloat16)
    table = torch.randperm(NUM_BLOCKS, generator=gen)
    slots = table[torch.arange(n) // BS] * BS + torch.arange(n) % BS
    if kv == "int8":
        cache = torch.zeros(kv_int8.int8_kv_shape(NUM_BLOCKS, HKV, BS, d), dtype=torch.int8)
        kv_int8.write(k, v, cache, slots, BS)
        rows = kv_int8.read(cache, table[: -(-n // BS)], d, torch.float64)  # (2, B, HKV, BS, d)
    else:
        cache = torch.zeros(2, NUM_BLOCKS, HKV, BS, d, dtype=torch.bfloat16)
        write_kv(k, v, cache, slots)
        rows = cache[:, table[: -(-n // BS)]].double()
    rows = rows.transpose(2, 3).reshape(2, -1, HKV, d)[:, :n]  # (2, n, HKV, d)
    return cache, table, rows[0], rows[1]


def _item(cache, table, kv, q, out, g, d, n_keys, head, scale, n_heads=1):
    region = BS * (d + 4) if kv == "int8" else 2 * BS * d
    return _Item(q=q.data_ptr(), out=out.data_ptr(), k0=cache.data_ptr() + head * region, table=table.data_ptr(),
                 block_stride=HKV * region, v_offset=NUM_BLOCKS * HKV * region, n_keys=n_keys, G=g, D=d, bs=BS,
                 int8=int(kv == "int8"), scale=scale, n_heads=n_heads)


def _reference(q, keys, values, head, scale):
    """(T, G, d) queries of KV head `head`, token t seeing keys[: len(keys) - T + 1 + t]: float64 attention."""
    t_new = q.shape[0]
    k, v = keys[:, head], values[:, head]  # (n, d)
    s = torch.einsum("tgd,nd->tgn", q.double(), k) * scale
    seen = torch.arange(k.shape[0])[None, :] <= (k.shape[0] - t_new + torch.arange(t_new))[:, None]  # (T, n)
    s = s.masked_fill(~seen[:, None, :], float("-inf"))
    return torch.einsum("tgn,nd->tgd", s.softmax(-1), v)


SHAPES = [(2, 128), (1, 64), (4, 64), (8, 256), (2, 48)]  # (G, head_dim); head_dim 48: the portable path


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("g,d", SHAPES)
@pytest.mark.parametrize("n_keys", [1, 17, 75, 300])
def test_decode_kernel_matches_float64(lib, kv, g, d, n_keys):
    """Within 1% of the output's largest value (bf16 output, bf16 / int16 softmax weights): a wrong scale, pair or
    mask costs more than that."""
    cache, table, keys, values = _cache(kv, g, d, n_keys, seed=n_keys + d)
    scale = d**-0.5
    for head in range(HKV):
        q = torch.randn(g, d, generator=torch.Generator().manual_seed(head)).to(torch.bfloat16) * 3
        out = torch.empty(g, d, dtype=torch.bfloat16)
        item = _item(cache, table, kv, q, out, g, d, n_keys, head, scale)
        lib.fabrik_attend(ctypes.byref(item))
        expected = _reference(q[None], keys, values, head, scale)[0]
        err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
        assert err <= 0.01, (head, err)


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("g,d", SHAPES)
@pytest.mark.parametrize("n_keys", [1, 17, 75, 300])
def test_decode_item_of_several_heads_equals_one_head_each(lib, kv, g, d, n_keys):
    """An item over consecutive KV heads (blocks outer, heads inner) gives each head the bits of its own item (which
    the test above holds to float64)."""
    cache, table, keys, values = _cache(kv, g, d, n_keys, seed=n_keys + d + 1)
    scale = d**-0.5
    q = torch.randn(HKV, g, d, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16) * 3
    alone = torch.empty(HKV, g, d, dtype=torch.bfloat16)
    for head in range(HKV):
        lib.fabrik_attend(ctypes.byref(_item(cache, table, kv, q[head], alone[head], g, d, n_keys, head, scale)))
    for first, count in [(0, HKV), (1, HKV - 1), (0, 2)]:
        together = torch.full((count, g, d), float("nan"), dtype=torch.bfloat16)
        item = _item(cache, table, kv, q[first:], together, g, d, n_keys, first, scale, n_heads=count)
        lib.fabrik_attend(ctypes.byref(item))
        assert torch.equal(together, alone[first:first + count]), (first, count)


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("g,d", SHAPES[:4])
@pytest.mark.parametrize("cached,n_q", [(0, 9), (40, 5), (100, 16)])
def test_prefill_tile_matches_float64(lib, kv, g, d, cached, n_q):
    """A tile of n_q new tokens after `cached` ones, causal, as one call."""
    lib.fabrik_tile_tokens.restype = ctypes.c_int
    per_tile = lib.fabrik_tile_tokens(g, d)
    if per_tile == 0:
        pytest.skip("no tile kernel on this CPU")
    n_q = min(n_q, per_tile)
    n = cached + n_q
    cache, table, keys, values = _cache(kv, g, d, n, seed=n + d)
    scale = d**-0.5
    q = torch.randn(n_q, g, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 3
    out = torch.empty(n_q, g, d, dtype=torch.bfloat16)
    tile = _Tile(item=_item(cache, table, kv, q, out, g, d, cached + 1, 1, scale), q_stride=g * d,
                 out_stride=g * d, n_q=n_q)
    lib.fabrik_attend_tile(ctypes.byref(tile))
    expected = _reference(q, keys, values, 1, scale)
    err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert err <= 0.01, err
