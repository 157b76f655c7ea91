"""Building blocks shared by the decoder models: RMSNorm, rotary embedding, gated MLP.

Numerics follow Hugging Face transformers so that logits match it: RMSNorm runs in float32, rotary cos/sin are
computed in float32 and applied in the model dtype with the rotate-half layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fabrik.model_config import RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # NOTE: cast back before the weight multiply, as transformers does; the other order changes bf16 logits.
        return self.weight * x32.to(dtype)


class RotaryEmbedding:
    """Rotary position embedding (rotate-half layout) for one head width.

    Not an ``nn.Module``: it has no weights, and keeping the inverse frequencies out of the module's buffers means
    they stay float32 and on the CPU when the model is built on the meta device or cast to bfloat16.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta**exponents)  # (D/2,)
        if scaling is not None and scaling.rope_type == "linear":
            inv_freq = inv_freq / scaling.factor
        elif scaling is not None and scaling.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.inv_freq = inv_freq
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> (cos, sin), (n, D) each

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each (T, D), for the given (T,) non-negative positions, in ``dtype``.

        Rows of ``tables``: computed per step, the eight small torch ops took ~165 us of a decode step (caches cold
        after the forward), the lookup two.
        """
        tables = self._tables.get(dtype)
        if tables is not None:
            try:
                return tables[0].index_select(0, positions), tables[1].index_select(0, positions)
            except IndexError:  # a position past the tables (or a negative one)
                pass
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"negative position {int(positions.min())}")
        cos, sin = self.tables(dtype, int(positions.max()) + 1 if positions.numel() else 0)
        return cos.index_select(0, positions), sin.index_select(0, positions)

    def tables(self, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables of positions 0..n-1 with n >= rows, each (n, D) in ``dtype``, grown (doubling) when a
        later position comes; the same tensors until they grow."""
        tables = self._tables.get(dtype)
        if tables is not None and tables[0].shape[0] >= rows:
            return tables
        size = max(2 * tables[0].shape[0] if tables is not None else 0, rows, 256)
        freqs = torch.arange(size, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # (n, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        tables = self._tables[dtype] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return tables


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth ramp in between."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (T, H, D) query or key heads by (T, D) cos/sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (T, H, D)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class GatedMLP(nn.Module):
    """SiLU-gated feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (T, hidden)
