"""Kernel backends: one small interface that every compute backend implements, and the choice among them.

A backend turns a loaded weight into a module that computes ``x W^T + b``; ``apply_kernels`` swaps every
``nn.Linear`` of a model (and its LM head) for the backend's modules. Backends today:

    torch          the reference: ``nn.Linear`` as loaded (int8: dequantize-and-matmul in torch, slow)
    native-avx512  csrc/linear*.c, AVX-512 BF16 (``vdpbf16ps``) and VNNI (``vpdpbusd``) kernels
    native-avx2    csrc/linear*.c, AVX2 + FMA kernels (same layouts)

``FABRIK_KERNELS=auto|native|native-avx512|native-avx2|torch`` picks one (default auto: the best native kernels the
CPU runs, else torch). A GPU backend would subclass ``KernelBackend`` and be added to ``select_backend``.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from functools import lru_cache

import torch
from torch import nn

from fabrik import config
from fabrik.kernels.memory import release_mapped_pages
from fabrik.kernels.native import ISA_AVX2, ISA_AVX512, KernelBuildError, best_isa, cpu_flags, load_library

logger = logging.getLogger(__name__)

BACKEND_NAMES = config.KERNEL_BACKENDS
QUANTIZATIONS = (None, *config.QUANTIZATIONS)  # None: keep the checkpoint's weights
ENV_VAR = "FABRIK_KERNELS"


class KernelBackend(ABC):
    """Where a model's matrix products run."""

    name: str

    @abstractmethod
    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None,
               out_dtype: torch.dtype | None = None) -> nn.Module:
        """A module computing ``x @ weight.T + bias`` from an (N, K) weight.

        Args:
            weight: (N, K) float32 or bfloat16; native modules keep a packed copy, not this tensor.
            bias: (N,) or None.
            quantization: None (bf16 weights), "int8" (symmetric, groups of 32 along K), "int4" (groups of 32,
                llama.cpp's Q4_0 rule), "int4-g64" or "int4-g128" (the same rule over groups of 64 / 128).
            out_dtype: Output dtype; None means the input's.
        """


class TorchBackend(KernelBackend):
    """The reference path: torch's own kernels."""

    name = "torch"

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None,
               out_dtype: torch.dtype | None = None) -> nn.Module:
        from fabrik.kernels.linear import TorchQuantizedLinear

        _check_quantization(quantization)
        if quantization is not None:
            return TorchQuantizedLinear(weight, bias, out_dtype, fmt=quantization)
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module if out_dtype is None else _CastOutput(module, out_dtype)


class NativeBackend(KernelBackend):
    """The C kernels of csrc/ for one instruction set."""

    def __init__(self, isa: int, num_threads: int | None = None) -> None:
        self.isa = isa
        self.name = "native-avx512" if isa == ISA_AVX512 else "native-avx2"
        self.num_threads = num_threads or torch.get_num_threads()
        self.library = load_library()

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None,
               out_dtype: torch.dtype | None = None) -> nn.Module:
        from fabrik.kernels.linear import NativeLinear

        _check_quantization(quantization)
        fmt = quantization or "bf16"
        return NativeLinear(self.library, weight, bias, fmt, self.isa, self.num_threads, out_dtype)


class _CastOutput(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(self.dtype)


def _check_quantization(quantization: str | None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")


@lru_cache(maxsize=None)
def _native_backend(isa: int) -> NativeBackend:
    return NativeBackend(isa)


@lru_cache(maxsize=1)
def _warn_fallback(reason: str) -> None:
    logger.warning("native kernels unavailable, using torch: %s", reason)


def select_backend(name: str | None = None) -> KernelBackend:
    """The backend called ``name`` (default: ``$FABRIK_KERNELS``, else "auto").

    "auto" takes the best native kernels the CPU runs and falls back to torch, with one warning, when the CPU has
    neither AVX-512 BF16 nor AVX2 or the library does not build. "native" and "native-*" raise instead.

    Raises:
        ValueError: Unknown name.
        RuntimeError: A native backend was asked for and cannot run here.
    """
    name = name or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKEND_NAMES} (set by {ENV_VAR} or the caller)")
    if name == "torch":
        return TorchBackend()
    best = best_isa(cpu_flags())
    wanted = {"native-avx512": ISA_AVX512, "native-avx2": ISA_AVX2}.get(name, best)
    supported = best is not None and (best == ISA_AVX512 or wanted == ISA_AVX2)
    try:
        if wanted is None or not supported:
            raise KernelBuildError(f"this CPU lacks the instructions of {name!r} (flags checked in /proc/cpuinfo)")
        return _native_backend(wanted)
    except KernelBuildError as exc:
        if name != "auto":
            raise RuntimeError(f"kernel backend {name!r} cannot run: {exc}") from exc
        _warn_fallback(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return TorchBackend()


def apply_kernels(model: nn.Module, backend: KernelBackend | str | None = None,
                  quantization: str | None = None, native_forward: bool = True) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (and the LM head) with ``backend``'s modules, in place.

    The LM head of a ``DecoderForCausalLM`` (``lm_head``, or the embedding table when tied) becomes
    ``model.lm_head_kernel``, which ``compute_logits`` uses (float32 logits). A tied embedding table
    stays as it is for the input embedding, so the packed head is an extra copy (bf16: the same size, int8: half).

    Args:
        model: A loaded model (weights materialized, eval mode).
        backend: A backend, a name for ``select_backend``, or None for ``$FABRIK_KERNELS``.
        quantization: One of ``QUANTIZATIONS`` (weights quantized now, at load). With int4 the LM head is int8: it is a
            quarter of the weights and the most sensitive to rounding (llama.cpp keeps it at 6+ bits in Q4_0 too).
        native_forward: On a native backend, also run the whole decoder stack in one native call per step
            (``fabrik.kernels.forward``) when the model allows it (bf16 decoder); False keeps the modules' forward.

    Returns:
        The same model object.
    """
    _check_quantization(quantization)
    if not isinstance(backend, KernelBackend):
        backend = select_backend(backend)
    if backend.name == "torch" and quantization is None:
        return model
    if getattr(model, "lm_head_kernel", None) is not None:
        raise ValueError("apply_kernels was already applied to this model")
    head = _lm_head_weight(model)
    with torch.no_grad():
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not getattr(model, "lm_head", None):
                    setattr(parent, child_name, backend.linear(child.weight, child.bias, quantization))
                    # The packed copy replaces the weight: its memory-mapped pages need not stay resident.
                    release_mapped_pages([child.weight])
        if head is not None:
            weight, bias = head
            head_quantization = "int8" if quantization and quantization.startswith("int4") else quantization
            model.lm_head_kernel = backend.linear(weight, bias, head_quantization, out_dtype=torch.float32)
            # A tied table stays the input embedding, but only a few rows of it are read per step.
            release_mapped_pages([weight])
            if getattr(model, "lm_head", None) is not None:
                model.lm_head = None  # untied: the packed head replaces it
    if native_forward and isinstance(backend, NativeBackend):
        from fabrik.kernels.forward import NativeForward, native_forward_unsupported

        reason = native_forward_unsupported(model)
        if reason is None:
            model.native_forward = NativeForward(backend.library, model, backend.num_threads)
        else:
            logger.info("layers run module by module: %s", reason)
    return model


def _lm_head_weight(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear):
        return lm_head.weight, lm_head.bias
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None and isinstance(embed, nn.Embedding) and hasattr(model, "compute_logits"):
        return embed.weight, None
    return None



__all__ = ["BACKEND_NAMES", "KernelBackend", "NativeBackend", "TorchBackend", "apply_kernels", "select_backend"]
