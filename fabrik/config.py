"""Engine configuration: plain dataclasses, validated on construction. Pure Python."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(value: str | int) -> int:
    """Parse a memory size such as ``4GiB``, ``512MB`` or ``1073741824`` into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory size must be > 0, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid memory size {value!r} (use e.g. 4GiB, 512MB or a byte count)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be > 0, got {value!r}")
    return size


DTYPES = ("auto", "float32", "bfloat16")
"""Weight and activation dtypes: auto keeps the checkpoint's (float16 runs in bfloat16, fabrik/loader.py)."""

KV_CACHE_DTYPES = ("auto", "int8")
"""Kinds of KV cache rows: auto (the model's dtype) or int8 (fabrik/models/kv_int8.py)."""

QUANTIZATIONS = ("int8", "int4", "int4-g64", "int4-g128")
"""Weight formats made at load (fabrik/kernels/linear.py): int8, int4 in groups of 32, 64 or 128."""

KERNEL_BACKENDS = ("auto", "native", "native-avx512", "native-avx2", "torch")
"""Kernel backends (fabrik/kernels): auto picks the best native kernels the CPU runs, else torch."""


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is laid out and how much memory it may take."""

    block_size: int = 64
    """Tokens per KV block."""
    kv_cache_memory_bytes: int = 2 * 2**30
    """Memory budget of the KV cache, in bytes; the number of blocks follows from it."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompts that share a prefix with earlier requests."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size ({self.block_size!r}) must be an int >= 1")
        if not isinstance(self.kv_cache_memory_bytes, int) or self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes ({self.kv_cache_memory_bytes!r}) must be an int >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits on what one engine step may contain."""

    max_model_len: int
    """Longest sequence (prompt + output) a request may reach, in tokens."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks and decodes together)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_prompt_logprob_tokens: int = 256
    """Most prompt positions per step whose logprobs are computed (each costs an LM head row and a vocabulary-wide
    log-softmax: bounding them keeps steps short and memory bounded)."""

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs", "max_prompt_logprob_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an int >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start: the model and the limits it runs under."""

    model: str
    """Hugging Face model folder or hub id."""
    dtype: str = "auto"
    """Weight and activation dtype: auto (the checkpoint's), float32 or bfloat16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``model`` is a hub id."""
    tokenizer: str | None = None
    """Folder of the tokenizer when it is not the model's own."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; default: the model's max_position_embeddings."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step."""
    max_prompt_logprob_tokens: int = 256
    """Most prompt positions per step whose logprobs are computed (each costs an LM head row)."""
    block_size: int = 64
    """Tokens per KV block (64: one KV head's rows of a block are a 16 KiB run; blocks of 16 made decode attention
    12-18% slower here, docs/kernels.md)."""
    kv_cache_memory_bytes: int | None = None
    """KV cache budget in bytes; default: enough for max_num_seqs full-length sequences, at most 2 GiB."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes."""
    seed: int = 0
    """Seed of the global RNG used by unseeded sampling requests."""
    quantization: str | None = None
    """Quantize the weights when they are loaded: None (keep them), int8, int4 (groups of 32), int4-g64, int4-g128."""
    kv_cache_dtype: str = "auto"
    """KV cache rows: auto (the model's dtype) or int8 (one scale per token and KV head; about half the bytes)."""
    kernels: str | None = None
    """Kernel backend: auto, native, native-avx512, native-avx2 or torch; None reads $FABRIK_KERNELS (default auto)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kernels is not None and self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels must be None or one of {KERNEL_BACKENDS}, got {self.kernels!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len ({self.max_model_len!r}) must be an int >= 2")
        if self.kv_cache_memory_bytes is not None:
            parse_bytes(self.kv_cache_memory_bytes)
        SchedulerConfig(max_model_len=self.max_model_len or 2, max_num_batched_tokens=self.max_num_batched_tokens,
                        max_num_seqs=self.max_num_seqs, max_prompt_logprob_tokens=self.max_prompt_logprob_tokens)
        CacheConfig(block_size=self.block_size)
