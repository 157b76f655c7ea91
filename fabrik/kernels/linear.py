"""Linear layers on packed weights: the bf16 and int8 layouts, int8 quantization, and the modules that call the
native kernels (see csrc/linear.c, csrc/linear_quant.c and docs/kernels.md).

Layouts (N output rows padded to a multiple of 16 with zero rows; the kernels never write the padded outputs)::

    bf16, (N/16, K/2, 16, 2):  block b = rows 16b..16b+15; for each K pair p, 16 rows x (w[2p], w[2p+1])
                               -> one 64-byte line per pair; K is padded to even.

    int8, (N/16, K/64, 1088):  block b, unit s = K values 64s..64s+63 = two groups of 32:
        bytes 128c..128c+63    group 0, K 4c..4c+3 of rows 0..15 as uint8 (q + 128), c = 0..7
        bytes 128c+64..128c+127  group 1, K 32+4c..32+4c+3 of rows 0..15
        bytes 1024..1055  fp16 scale of rows 0..15 for group 0
        bytes 1056..1087  fp16 scale of rows 0..15 for group 1
                               K is padded to a multiple of 64 with zeros (q = 0).

    int4, (N/16, K/64, 576):   the int8 unit with two weights per byte: byte j of line c (c = 0..7) holds group 0's
                               int8 byte 64c+j in its low nibble and group 1's in its high nibble, as q + 8;
                               then the same 64 bytes of fp16 scales.
    int4-g64, (N/16, K/64, 544):    the same 512 bytes of data, then one fp16 scale per row for the unit's 64 K.
    int4-g128, (N/16, K/128, 1056): two units' data, then one fp16 scale per row for their 128 K.

Quantization (``quantize_int8``): symmetric per row and group of 32 along K, scale = fp16(absmax / 127),
q = clamp(round(w / scale), -127, 127). ``quantize_int4`` (llama.cpp's Q4_0 rule): per group of 32, 64 or 128,
m = the weight of largest magnitude (signed), scale = fp16(m / -8), q = clamp(round(w / scale), -8, 7), so m itself
is exact. Larger groups store fewer scales (4.5, 4.25, 4.125 bits per weight) and round more coarsely.
The kernels quantize activations to int8 per group of 32 (fp32 scale) and compute each group's dot product
exactly in int32.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fabrik.kernels.native import (ISA_AVX2, ISA_AVX512, OUT_BF16, X_BF16, LinearDescriptor, NativeLibrary)

ROWS = 16
"""Weight rows per block: one 64-byte line holds 16 rows' bf16 pair or 4 int8 values."""
GROUP = 32
"""int8 quantization group along K (weights and activations)."""
UNIT_K = 64
"""K values per int8 unit: two groups, whose 16-row scales fill one 64-byte line."""
UNIT_BYTES = 2 * GROUP * ROWS + 2 * ROWS * 2
"""Bytes of one int8 unit: 1024 of weights + 64 of fp16 scales."""
UNIT_BYTES4 = GROUP * ROWS + 2 * ROWS * 2
"""Bytes of one int4 unit: 512 of weights + 64 of fp16 scales."""
_QUANT_ROWS = 8192
"""Rows quantized at a time, so that a 151,936-row LM head does not need several fp32 copies at once."""

FORMATS = ("bf16", "int8", "int4", "int4-g64", "int4-g128")
INT4_GROUPS = {"int4": 32, "int4-g64": 64, "int4-g128": 128}
"""Weights per fp16 scale of each int4 format."""
_X_FLAGS = {torch.bfloat16: X_BF16, torch.float32: 0}
_OUT_FLAGS = {torch.bfloat16: OUT_BF16, torch.float32: 0}


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """Repacks an (N, K) weight into bf16 blocks of 16 rows with adjacent K pairs: (ceil(N/16), ceil(K/2), 16, 2)."""
    n, k = weight.shape
    n_pad, k_pad = _round_up(n, ROWS), _round_up(k, 2)
    w = weight.detach().to(torch.bfloat16)
    if (n_pad, k_pad) != (n, k):
        w = F.pad(w, (0, k_pad - k, 0, n_pad - n))
    return w.view(n_pad // ROWS, ROWS, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()  # (Nb, Kp/2, 16, 2)


def padded_k(k: int, group: int = GROUP) -> int:
    """K of the packed int8 / int4 layouts: whole units of 64, or of 128 with groups of 128."""
    return _round_up(k, max(UNIT_K, group))


def _quantize_groups(weight: torch.Tensor, group_scale, q_min: int, q_max: int,
                     group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group along K (K zero-padded by ``padded_k``): scale = fp16(group_scale(group)),
    q = clamp(round(w / scale), q_min, q_max); a zero scale gives q = 0."""
    n, k = weight.shape
    k_pad = padded_k(k, group)
    q = torch.empty((n, k_pad), dtype=torch.int8)
    scale = torch.empty((n, k_pad // group), dtype=torch.float16)
    for r0 in range(0, n, _QUANT_ROWS):
        w = weight[r0:r0 + _QUANT_ROWS].detach().float()
        if k_pad != k:
            w = F.pad(w, (0, k_pad - k))
        w = w.view(w.shape[0], -1, group)  # (rows, groups, group)
        s = group_scale(w).to(torch.float16)  # (rows, G)
        s32 = s.float()
        inv = torch.where(s32 != 0, 1.0 / s32, torch.zeros_like(s32))
        q[r0:r0 + _QUANT_ROWS] = torch.round(w * inv[..., None]).clamp_(q_min, q_max).to(torch.int8).view(
            w.shape[0], -1)
        scale[r0:r0 + _QUANT_ROWS] = s
    return q, scale


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes an (N, K) weight per row and group of 32 along K (K zero-padded to a multiple of 64).

    Returns:
        (q, scale): q (N, Kp) int8 in [-127, 127]; scale (N, Kp / 32) float16; w ~ q * scale per group.
    """
    return _quantize_groups(weight, lambda w: w.abs().amax(dim=-1) / 127.0, -127, 127)


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes an (N, K) weight to 4 bits per row and group of ``group`` (32, 64 or 128) along K (K zero-padded to
    a multiple of 64, or of 128 with groups of 128).

    Returns:
        (q, scale): q (N, Kp) int8 in [-8, 7]; scale (N, Kp / group) float16 (negative when the group's largest
        magnitude is positive); w ~ q * scale per group.
    """
    if group not in INT4_GROUPS.values():
        raise ValueError(f"int4 group size {group} is not one of {sorted(INT4_GROUPS.values())}")
    # The weight of largest magnitude, signed, lands exactly on q = -8.
    return _quantize_groups(weight, lambda w: w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0] / -8.0,
                            -8, 7, group)


def _pack_units(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Interleaves quantized (N, Kp) weights and their (N, Kp / group) scales into the units of ``bits`` (8 or 4;
    the group size follows from the shapes)."""
    n, k_pad = q.shape
    n_pad = _round_up(n, ROWS)
    nb, units, group = n_pad // ROWS, k_pad // UNIT_K, k_pad // scale.shape[1]
    zero = 128 if bits == 8 else 8  # stored as q + zero: the unsigned side of vpdpbusd
    u = (q.to(torch.int16) + zero).to(torch.uint8)
    s = scale
    if n_pad != n:
        u = F.pad(u, (0, 0, 0, n_pad - n), value=zero)  # q = 0
        s = F.pad(s, (0, 0, 0, n_pad - n))
    lines = u.view(nb, ROWS, units, 2, 8, 4).permute(0, 2, 4, 3, 1, 5)  # (Nb, units, c, group, 16 rows, 4)
    if bits == 8:
        data = lines.reshape(nb, units, 2 * GROUP * ROWS)  # line c of group 0, then of group 1
    else:
        data = (lines[:, :, :, 0] | (lines[:, :, :, 1] << 4)).reshape(nb, units, GROUP * ROWS)  # group 1 high
    if group == GROUP:
        scales = s.view(nb, ROWS, units, 2).permute(0, 2, 3, 1).contiguous().view(torch.uint8).view(nb, units, 4 * ROWS)
        return torch.cat((data, scales), dim=-1).contiguous()  # (Nb, Kp/64, UNIT_BYTES or UNIT_BYTES4)
    per = group // UNIT_K  # units sharing one line of 16 scales
    data = data.reshape(nb, units // per, per * data.shape[-1])
    scales = s.view(nb, ROWS, units // per).permute(0, 2, 1).contiguous().view(torch.uint8)  # (Nb, supers, 32)
    return torch.cat((data, scales), dim=-1).contiguous()  # (Nb, Kp/group, per * 512 + 32)


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of an (N, K) weight in ``fmt`` ("int8" or one of ``INT4_GROUPS``)."""
    if fmt == "int8":
        return quantize_int8(weight)
    if fmt in INT4_GROUPS:
        return quantize_int4(weight, INT4_GROUPS[fmt])
    raise ValueError(f"format {fmt!r} is not int8 or one of {tuple(INT4_GROUPS)}")


def quantize_and_pack(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The packed blocks of an (N, K) weight in ``fmt`` ("int8" or one of ``INT4_GROUPS``)."""
    return _pack_units(*quantize(weight, fmt), 8 if fmt == "int8" else 4)


def quantize_activations(x: torch.Tensor, k_pad: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization: per row and ``group`` values (the weights' group: 32, 64 or 128),
    scale = absmax / 127 (float32).

    Returns:
        (xq, scale): xq (M, Kp) float32 holding integers in [-127, 127]; scale (M, Kp / 32) float32, one per 32
        values (a group of 64 or 128 repeats its scale).
    """
    x = x.float()
    if k_pad != x.shape[-1]:
        x = F.pad(x, (0, k_pad - x.shape[-1]))
    x = x.view(x.shape[0], -1, group)  # (M, Kp / group, group)
    amax = x.abs().amax(dim=-1)  # (M, Kp / group)
    # NOTE: a tensor divisor, not ``127.0 / amax``: torch computes scalar / tensor as a product with the reciprocal,
    # which is off by an ulp often enough to flip ties (x * inv = k + 0.5) against the kernel's true division.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv[..., None])
    return xq.view(x.shape[0], -1), (amax / 127.0).repeat_interleave(group // GROUP, dim=1)


def int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the int8 and int4 kernels compute, in float64: activations quantized per group of the weights, times
    the quantized weights, summed per group of 32 (a scale of a larger group applies to each of its groups of 32).

    Args:
        x: (M, K) activations.
        q, scale: from ``quantize_int8`` or ``quantize_int4``.
        bias: (N,) or None.

    Returns:
        (M, N) float64.
    """
    group = q.shape[1] // scale.shape[1]
    scale = scale.repeat_interleave(group // GROUP, dim=1)  # (N, Kp / 32)
    xq, xs = quantize_activations(x, q.shape[1], group)
    m, g = xs.shape
    dots = torch.einsum("mgk,ngk->mng", xq.double().view(m, g, GROUP), q.double().view(q.shape[0], g, GROUP))
    factors = (scale.float()[None, :, :] * xs[:, None, :]).double()  # (M, N, G), fp32 products like the kernel
    out = (dots * factors).sum(-1)  # (M, N)
    return out if bias is None else out + bias.double()


class NativeLinear(nn.Module):
    """``nn.Linear`` on packed weights, computed by the native kernels.

    Accepts (..., K) bfloat16 or float32 input (other dtypes are cast to float32) and any number of rows; returns
    (..., N) in ``out_dtype`` (bfloat16 or float32) or, when None, the input's dtype.
    """

    def __init__(self, library: NativeLibrary, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, isa: int,
                 num_threads: int, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
        if isa not in (ISA_AVX512, ISA_AVX2):
            raise ValueError(f"isa {isa} is not ISA_AVX512 ({ISA_AVX512}) or ISA_AVX2 ({ISA_AVX2})")
        if out_dtype not in (None, *_OUT_FLAGS):
            raise ValueError(f"out_dtype {out_dtype} is not bfloat16 or float32")
        if num_threads < 1:
            raise ValueError(f"num_threads ({num_threads}) must be >= 1")
        self.out_features, self.in_features = weight.shape
        self.fmt = fmt
        self.out_dtype = out_dtype
        group = INT4_GROUPS.get(fmt, GROUP)
        if fmt == "bf16":
            packed, k_pad = pack_bf16(weight), _round_up(self.in_features, 2)
        else:
            packed, k_pad = quantize_and_pack(weight, fmt), padded_k(self.in_features, group)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self._descriptor = LinearDescriptor(
            weight=packed.data_ptr(), bias=None if bias is None else self.bias.data_ptr(), n=self.out_features,
            k=self.in_features, kp=k_pad, nblocks=packed.shape[0], nthreads=num_threads, isa=isa, group=group)
        # NOTE: the descriptor holds raw pointers; ``packed`` and ``bias`` must never be replaced or moved (no
        # ``.to()``), which is why the module has no parameters.
        self._address = ctypes.addressof(self._descriptor)  # a plain int: calls convert nothing
        self._kernel = {"bf16": library.linear_bf16, "int8": library.linear_int8}.get(fmt, library.linear_int4)

    @classmethod
    def concatenated(cls, parts: Sequence[NativeLinear]) -> NativeLinear:
        """One layer whose output is the ``parts``' outputs side by side, over one copy of their weights.

        The parts keep working: their packed weights (and biases) become views into the joint layer's, so memory is
        not doubled. Longer weight streams and one call instead of several are what make this worth it (a 2 MB
        projection reads at ~0.75 of the bandwidth on its own, ~0.95 inside an 8 MB one).

        Raises:
            ValueError: Parts that differ in K, format, ISA, threads or output dtype, or with N not a multiple of 16.
        """
        first = parts[0]
        for part in parts:
            if part.out_features % ROWS:
                raise ValueError(f"cannot concatenate a layer of {part.out_features} outputs (not a multiple of {ROWS})")
            key = (part.in_features, part.fmt, part._descriptor.isa, part._descriptor.nthreads, part.out_dtype)
            if key != (first.in_features, first.fmt, first._descriptor.isa, first._descriptor.nthreads,
                       first.out_dtype):
                raise ValueError(f"cannot concatenate layers of different (K, format, isa, threads, dtype): {key}")
        joint = cls.__new__(cls)
        nn.Module.__init__(joint)
        joint.out_features, joint.in_features = sum(p.out_features for p in parts), first.in_features
        joint.fmt, joint.out_dtype, joint._kernel = first.fmt, first.out_dtype, first._kernel
        packed = torch.cat([p.packed for p in parts], dim=0)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
        joint.register_buffer("packed", packed, persistent=False)
        joint.register_buffer("bias", bias, persistent=False)
        d = first._descriptor
        joint._descriptor = LinearDescriptor(
            weight=packed.data_ptr(), bias=None if bias is None else bias.data_ptr(), n=joint.out_features,
            k=d.k, kp=d.kp, nblocks=packed.shape[0], nthreads=d.nthreads, isa=d.isa, group=d.group)
        joint._address = ctypes.addressof(joint._descriptor)
        block, row = 0, 0
        for part in parts:
            nblocks = part.packed.shape[0]
            part.packed = packed[block:block + nblocks]
            part._descriptor.weight = part.packed.data_ptr()
            if part.bias is not None:
                part.bias = bias[row:row + part.out_features]
                part._descriptor.bias = part.bias.data_ptr()
            block, row = block + nblocks, row + part.out_features
        return joint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: this runs ~200 times per decode step; the common case (2-D, contiguous, bf16/fp32) takes the fewest
        # torch calls possible (each costs ~1 us), everything else is normalized by ``_forward_any``.
        if x.dim() != 2 or x.dtype not in _X_FLAGS or not x.is_contiguous():
            return self._forward_any(x)
        m, k = x.shape
        if k != self.in_features:
            raise ValueError(f"input has {k} features, the layer takes {self.in_features}")
        out_dtype = self.out_dtype or x.dtype
        out = torch.empty((m, self.out_features), dtype=out_dtype)
        if m and self._kernel(self._address, x.data_ptr(), m, out.data_ptr(),
                              _X_FLAGS[x.dtype] | _OUT_FLAGS[out_dtype], None) != 0:
            raise MemoryError(f"native linear ({m}x{k} by {self.out_features}): out of memory")
        return out

    def forward_with_argmax(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(M, K) -> (M, N) float32 outputs and each row's index of its largest output (the lowest on ties, -1 for a
        row holding NaN), found while the outputs are stored (greedy sampling without reading them back).

        Raises:
            ValueError: the layer's outputs are not float32, or x is not (M, K) with M >= 1.
        """
        if self.out_dtype != torch.float32:
            raise ValueError(f"argmax needs float32 outputs, this layer gives {self.out_dtype}")
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != self.in_features:
            raise ValueError(f"input must be (M >= 1, {self.in_features}), got {tuple(x.shape)}")
        if x.dtype not in _X_FLAGS or not x.is_contiguous():
            x = x.float().contiguous()
        m = x.shape[0]
        out = torch.empty((m, self.out_features), dtype=torch.float32)  # (M, N)
        index = array("q", bytes(8 * m))  # (M,): a Python array, no torch call (~10-40 us each with cold caches)
        if self._kernel(self._address, x.data_ptr(), m, out.data_ptr(), _X_FLAGS[x.dtype] | _OUT_FLAGS[torch.float32],
                        index.buffer_info()[0]) != 0:
            raise MemoryError(f"native linear ({m}x{x.shape[1]} by {self.out_features}): out of memory")
        return out, index.tolist()

    def _forward_any(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _X_FLAGS:
            x = x.float()
        lead = x.shape[:-1]
        return self.forward(x.reshape(-1, x.shape[-1]).contiguous()).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


class TorchQuantizedLinear(nn.Module):
    """The int8 (or an int4) format computed with torch ops (dequantize, then ``F.linear`` in float32): the reference
    path for CPUs without AVX2. Correct, but slower than bf16: it is not a fast path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None = None,
                 fmt: str = "int8") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize(weight, fmt)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        group = self.q.shape[1] // self.scale.shape[1]
        xq, xs = quantize_activations(x2, self.q.shape[1], group)
        x_deq = (xq.view(xq.shape[0], -1, GROUP) * xs[..., None]).view(xq.shape)  # (M, Kp)
        w_deq = (self.q.float().view(self.out_features, -1, group) * self.scale.float()[..., None]).view(self.q.shape)
        out = F.linear(x_deq, w_deq, self.bias)  # (M, N) float32
        return out.to(self.out_dtype or x.dtype).view(*lead, self.out_features)
