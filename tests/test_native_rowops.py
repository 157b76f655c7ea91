"""The native forward's per-row kernels (csrc/rowops.c) called directly through ctypes, against the torch modules the
module path runs (fabrik/models/layers.py, kv_int8.py), on lengths that take the AVX-512 path (multiples of 16) and
the portable one (the rest, down to 1).

Stated tolerances: the residual add, the rotary, the KV row writes and the int8 quantization are bit for bit. The
RMSNorm sums its squares in another order than torch, so its factor may differ in the last float bit, and the SiLU's
e^x is the kernels' own: after rounding to bf16 at most one element in 64 may differ, by one bf16 step (2^-7 relative).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from fabrik.kernels import select_backend
from fabrik.kernels.native import load_library
from fabrik.models import kv_int8
from fabrik.models.layers import RMSNorm, apply_rotary

LENGTHS = [1, 7, 16, 40, 100, 1024, 1032]
HEAD_DIMS = [2, 6, 24, 32, 64, 128]
EPS = 1e-6


@pytest.fixture(scope="module")
def lib():
    if select_backend("auto").name == "torch":
        pytest.skip("no native kernels on this CPU")
    cdll = load_library().cdll
    p, f, i = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    cdll.fabrik_rmsnorm_row.argtypes = (p, p, p, i, f, p)
    cdll.fabrik_norm_rope_head.argtypes = (p, p, f, p, p, i)
    cdll.fabrik_silu_mul_row.argtypes = (p, p, i, p)
    cdll.fabrik_store_kv_row.argtypes = (p, p, ctypes.c_long, i, i, i)
    for fn in (cdll.fabrik_rmsnorm_row, cdll.fabrik_norm_rope_head, cdll.fabrik_silu_mul_row, cdll.fabrik_store_kv_row):
        fn.restype = None
    return cdll


def _bf16(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def _assert_close_in_bf16_steps(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal, except at most 1 element in 64 (and at least 1) one bf16 step apart."""
    got, want = got.float(), want.float()
    off = got != want
    step = want.abs().clamp_min(torch.finfo(torch.bfloat16).tiny) * 2.0**-7
    assert ((got - want).abs()[off] <= step[off] * 1.01).all(), f"off by more than a bf16 step: {got[off]} {want[off]}"
    assert int(off.sum()) <= max(1, got.numel() // 64), f"{int(off.sum())} of {got.numel()} differ"


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_matches_the_module(lib, n, residual):
    x, y, w = _bf16(n, 1, 3.0), _bf16(n, 2), _bf16(n, 3)
    norm = RMSNorm(n, EPS).to(torch.bfloat16)
    norm.weight.data.copy_(w)
    summed = x + y if residual else x  # bf16 + bf16, rounded as the decoder's residual add
    want = norm(summed)

    xs, out = x.clone(), torch.empty(n, dtype=torch.bfloat16)
    lib.fabrik_rmsnorm_row(xs.data_ptr(), y.data_ptr() if residual else None, w.data_ptr(), n, EPS, out.data_ptr())
    assert torch.equal(xs, summed)  # the residual sum lands in x, bit for bit
    _assert_close_in_bf16_steps(out, want)


@pytest.mark.parametrize("n", [16, 1032])
def test_rmsnorm_in_place_on_the_residual(lib, n):
    """out may be y: the decoder norms the residual stream into the buffer it read the layer's output from."""
    x, y, w = _bf16(n, 4, 3.0), _bf16(n, 5), _bf16(n, 6)
    want, x_copy = torch.empty(n, dtype=torch.bfloat16), x.clone()
    lib.fabrik_rmsnorm_row(x_copy.data_ptr(), y.data_ptr(), w.data_ptr(), n, EPS, want.data_ptr())
    lib.fabrik_rmsnorm_row(x.data_ptr(), y.data_ptr(), w.data_ptr(), n, EPS, y.data_ptr())
    assert torch.equal(y, want)


def _rope_tables(d: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))  # (D/2,)
    emb = torch.cat((position * inv_freq, position * inv_freq))  # (D,)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("position", [0, 1, 37, 40000])
def test_rotary_matches_apply_rotary_bit_for_bit(lib, d, position):
    h = _bf16(d, 7, 2.0)
    cos, sin = _rope_tables(d, position)
    want = apply_rotary(h[None, None, :], cos[None, :], sin[None, :])[0, 0]  # (D,)
    got = h.clone()
    lib.fabrik_norm_rope_head(got.data_ptr(), None, EPS, cos.data_ptr(), sin.data_ptr(), d)
    assert torch.equal(got, want)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_norm_then_rotary_matches_the_modules(lib, d):
    h, w = _bf16(d, 8, 2.0), _bf16(d, 9)
    cos, sin = _rope_tables(d, 123)
    norm = RMSNorm(d, EPS).to(torch.bfloat16)
    norm.weight.data.copy_(w)
    normed = h.clone()
    lib.fabrik_rmsnorm_row(normed.data_ptr(), None, w.data_ptr(), d, EPS, normed.data_ptr())
    _assert_close_in_bf16_steps(normed, norm(h))
    # The rotary then applies to the kernel's own norm, bit for bit.
    want = apply_rotary(normed[None, None, :], cos[None, :], sin[None, :])[0, 0]
    got = h.clone()
    lib.fabrik_norm_rope_head(got.data_ptr(), w.data_ptr(), EPS, cos.data_ptr(), sin.data_ptr(), d)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", LENGTHS)
def test_silu_mul_matches_the_module(lib, n):
    g, u = _bf16(n, 10, 4.0), _bf16(n, 11, 2.0)
    want = F.silu(g) * u  # bf16: silu in fp32 rounded, then the product rounded
    out = torch.empty(n, dtype=torch.bfloat16)
    lib.fabrik_silu_mul_row(g.data_ptr(), u.data_ptr(), n, out.data_ptr())
    _assert_close_in_bf16_steps(out, want)


def test_silu_mul_at_the_extremes(lib):
    """Large |g|: e^-g overflows to inf (silu -> -0) or vanishes (silu -> g); NaN stays NaN."""
    g = torch.tensor([-200.0, -88.5, -20.0, 0.0, 20.0, 88.5, 200.0, 3e38, -3e38] + [1.0] * 7, dtype=torch.bfloat16)
    u = torch.ones(16, dtype=torch.bfloat16)
    out = torch.empty(16, dtype=torch.bfloat16)
    for n in (16, 9):  # the AVX-512 path, then the portable one
        lib.fabrik_silu_mul_row(g.data_ptr(), u.data_ptr(), n, out.data_ptr())
        _assert_close_in_bf16_steps(out[:n], (F.silu(g) * u)[:n])
    g[3] = float("nan")
    lib.fabrik_silu_mul_row(g.data_ptr(), u.data_ptr(), 16, out.data_ptr())
    assert out[3].isnan()


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("int8", [False, True])
def test_kv_row_store_matches_the_cache_writers(lib, d, int8):
    """Row `offset` of a (block, head) region, bf16 copied and int8 quantized as kv_int8.write does, bit for bit;
    the neighbouring rows and scales untouched."""
    bs, offset = 16, 5
    x = _bf16(d, 12, 3.0)
    if int8:
        region = torch.full((bs * (d + kv_int8.SCALE_BYTES),), 7, dtype=torch.int8)
        want = region.clone()
        values, scale = kv_int8.quantize_rows(x[None])
        want[offset * d:(offset + 1) * d] = values[0]
        start = bs * d + offset * kv_int8.SCALE_BYTES
        want[start:start + kv_int8.SCALE_BYTES] = scale.view(torch.int8)
    else:
        region = torch.full((bs * d,), 7.0, dtype=torch.bfloat16)
        want = region.clone()
        want[offset * d:(offset + 1) * d] = x
    lib.fabrik_store_kv_row(region.data_ptr(), x.data_ptr(), offset, bs, d, int(int8))
    assert torch.equal(region, want)


def test_int8_kv_row_of_zeros_and_ties(lib):
    """A zero row keeps scale 0 and zero values; x / scale landing on .5 rounds to even, as torch.round does."""
    d, bs = 32, 4
    region = torch.zeros(bs * (d + kv_int8.SCALE_BYTES), dtype=torch.int8)
    for x in (torch.zeros(d, dtype=torch.bfloat16),
              torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * (d - 6), dtype=torch.bfloat16)):
        values, scale = kv_int8.quantize_rows(x[None])
        lib.fabrik_store_kv_row(region.data_ptr(), x.data_ptr(), 0, bs, d, 1)
        assert torch.equal(region[:d], values[0])
        assert torch.equal(region[bs * d:bs * d + 4].view(torch.float32), scale)
