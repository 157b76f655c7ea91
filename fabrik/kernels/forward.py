"""The whole decoder stack in one native call per step (csrc/forward.c) for bf16 models on native linears.

Eager torch spends ~15 small ops per layer around the matrix products (norms, rotary, KV writes, attention,
SiLU-and-multiply, residual adds), each ~2-10 us plus allocation: on a 28-layer model that is most of a decode step.
``NativeForward`` replaces ``DecoderForCausalLM.forward`` with one ctypes call per step that runs every layer in C
over the same packed weights and the same paged KV cache, rounding to bf16 where the torch modules do.

``attach_native_forward`` installs it when the model allows: a ``DecoderForCausalLM`` in bfloat16 whose projections
are all ``NativeLinear`` modules of one format. Otherwise the model keeps its module-by-module forward.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence

import torch
from torch import nn

from fabrik.kernels.linear import INT4_GROUPS, NativeLinear
from fabrik.kernels.native import NativeLibrary
from fabrik.models import kv_int8
from fabrik.models.attention import AttentionMetadata, StepBatch

FMT_CODES = {"bf16": 0, "int8": 1, **{fmt: 2 for fmt in INT4_GROUPS}}  # an int4 layer's group is in its descriptor
_MAX_GROUP = 16
_MAX_HEAD_DIM = 512


class _Layer(ctypes.Structure):
    """Mirror of ``fabrik_layer`` in csrc/forward.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "qkv", "o", "gate_up", "down", "input_norm", "post_norm", "q_norm", "k_norm", "kv_cache")]


class _Model(ctypes.Structure):
    """Mirror of ``fabrik_model`` in csrc/forward.c."""

    _fields_ = [("layers", ctypes.c_void_p), ("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p)] + [
        (name, ctypes.c_int32) for name in ("n_layers", "vocab", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                            "intermediate", "num_blocks", "block_size", "fmt", "nthreads", "kv_int8")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("timings", ctypes.c_void_p)]


class _Timings(ctypes.Structure):
    """Mirror of ``fabrik_timings`` in csrc/forward.c."""

    _fields_ = [("linears", ctypes.c_double), ("attention", ctypes.c_double), ("head", ctypes.c_double),
                ("total", ctypes.c_double), ("calls", ctypes.c_int64)]


class _Batch(ctypes.Structure):
    """Mirror of ``fabrik_batch`` in csrc/forward.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "tokens", "positions", "rope_cos", "rope_sin", "slots", "query_start", "seq_lens", "block_tables", "head",
        "logit_rows", "logits", "argmax")] + [
        (name, ctypes.c_int32) for name in ("T", "S", "max_blocks", "rope_rows", "n_logits", "head_fmt")]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def native_forward_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run on ``NativeForward`` (None when it can)."""
    from fabrik.models.decoder import DecoderForCausalLM

    if not isinstance(model, DecoderForCausalLM) or type(model).forward is not DecoderForCausalLM.forward:
        return f"{type(model).__name__} is not a plain DecoderForCausalLM"
    inner = model.model
    if inner.embed_tokens.weight.dtype != torch.bfloat16:
        return f"weights are {inner.embed_tokens.weight.dtype}, not bfloat16"
    config = model.config
    if config.num_attention_heads % config.num_key_value_heads or \
            config.num_attention_heads // config.num_key_value_heads > _MAX_GROUP:
        return f"{config.num_attention_heads} query heads per {config.num_key_value_heads} KV heads"
    if config.head_dim > _MAX_HEAD_DIM or config.head_dim % 2:
        return f"head_dim {config.head_dim}"
    formats = set()
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj):
            if not isinstance(module, NativeLinear):
                return f"{type(module).__name__} projection"
            if module.out_features % 16:
                return f"a projection of {module.out_features} outputs (not a multiple of 16)"
            formats.add(module.fmt)
        norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
        if any(n is not None and n.weight.dtype != torch.bfloat16 for n in norms):
            return "norm weights are not bfloat16"
    if len(formats) > 1:
        return f"mixed weight formats {sorted(formats)}"
    return None


class NativeForward:
    """Runs a ``DecoderForCausalLM``'s layers and final norm natively; called like its ``forward``, or with the LM head
    in the same call (``forward_logits``) when the model's ``lm_head_kernel`` is a native float32 layer.

    Keeps the model's modules (they own the packed weights and norm weights the descriptors point at) and rebinds
    the KV cache pointers whenever it is handed a different list of cache tensors.
    """

    def __init__(self, library: NativeLibrary, model: nn.Module, num_threads: int) -> None:
        reason = native_forward_unsupported(model)
        if reason is not None:
            raise ValueError(f"the native forward cannot run this model: {reason}")
        self._fn = library.forward
        self._model = model  # keeps every pointed-at tensor alive
        inner, config = model.model, model.config
        self._rotary = inner.rotary
        layers = inner.layers
        self._layers = (_Layer * len(layers))()
        fmt = layers[0].self_attn.q_proj.fmt
        # q/k/v and gate/up run as one projection each: one call, one long weight stream (the modules share it).
        self._joint: list[NativeLinear] = []
        for desc, layer in zip(self._layers, layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = NativeLinear.concatenated([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = NativeLinear.concatenated([mlp.gate_proj, mlp.up_proj])
            self._joint += [qkv, gate_up]
            desc.qkv, desc.o, desc.gate_up, desc.down = qkv._address, attn.o_proj._address, gate_up._address, \
                mlp.down_proj._address
            desc.input_norm = _ptr(layer.input_layernorm.weight)
            desc.post_norm = _ptr(layer.post_attention_layernorm.weight)
            desc.q_norm = _ptr(attn.q_norm.weight) if attn.q_norm is not None else None
            desc.k_norm = _ptr(attn.k_norm.weight) if attn.k_norm is not None else None
        self._desc = _Model(
            layers=ctypes.addressof(self._layers), embed=_ptr(inner.embed_tokens.weight),
            final_norm=_ptr(inner.norm.weight), n_layers=len(layers),
            vocab=inner.embed_tokens.weight.shape[0], hidden=config.hidden_size,
            n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            intermediate=config.intermediate_size, num_blocks=0, block_size=0, fmt=FMT_CODES[fmt],
            nthreads=num_threads, eps=config.rms_norm_eps, scale=config.head_dim**-0.5)
        self._address = ctypes.addressof(self._desc)
        self._hidden = config.hidden_size
        head = getattr(model, "lm_head_kernel", None)
        self._head: NativeLinear | None = None
        if isinstance(head, NativeLinear) and head.out_dtype == torch.float32 and head.in_features == self._hidden:
            self._head = head
        self._caches: list[torch.Tensor] | None = None
        self._timings: _Timings | None = None
        self._scratch: torch.Tensor | None = None
        self._scratch_bytes = 0
        self._scratch_address = 0
        self._rope: tuple[int, int, int] = (0, 0, 0)  # cos address, sin address, rows (_rope_tables)
        self._rope_tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def enable_timings(self) -> None:
        """From now on, every call adds where its time went to ``timings()`` (starting from zero)."""
        self._timings = _Timings()
        self._desc.timings = ctypes.addressof(self._timings)

    def timings(self) -> dict[str, float | int]:
        """Seconds of the calls since ``enable_timings``: "linears" (the projections), "attention" (with the per-head
        norms, rotary and K/V stores), "head" (the LM head of ``forward_logits``), "total" (whole calls), and the
        number of "calls"."""
        if self._timings is None:
            raise RuntimeError("enable_timings was not called")
        t = self._timings
        return {"linears": t.linears, "attention": t.attention, "head": t.head, "total": t.total, "calls": t.calls}

    @property
    def has_head(self) -> bool:
        """Whether ``forward_logits`` can run the LM head in the native call."""
        return self._head is not None

    def _bind(self, kv_caches: list[torch.Tensor]) -> None:
        if len(kv_caches) != len(self._layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self._layers)} layers")
        shape, dtype = kv_caches[0].shape, kv_caches[0].dtype
        for cache in kv_caches:
            if dtype not in (torch.bfloat16, torch.int8) or cache.dtype != dtype or not cache.is_contiguous() or \
                    cache.shape != shape:
                raise ValueError("KV caches must be contiguous bfloat16 (or int8-layout) tensors of one shape")
        head_dim = self._desc.head_dim
        if dtype == torch.int8:  # (2, num_blocks, Hkv, block_size * (head_dim + 4)): fabrik/models/kv_int8.py
            _, num_blocks, num_kv_heads, region = shape
            block_size = region // (head_dim + kv_int8.SCALE_BYTES)
            fits = region == kv_int8.int8_kv_shape(num_blocks, num_kv_heads, block_size, head_dim)[-1]
        else:
            _, num_blocks, num_kv_heads, block_size, cache_head_dim = shape
            fits = cache_head_dim == head_dim
        if not fits or num_kv_heads != self._desc.n_kv_heads:
            raise ValueError(f"KV cache shape {tuple(shape)} does not fit the model")
        self._desc.kv_int8 = int(dtype == torch.int8)
        for desc, cache in zip(self._layers, kv_caches):
            desc.kv_cache = cache.data_ptr()
        self._desc.num_blocks, self._desc.block_size = num_blocks, block_size
        self._caches = kv_caches

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        """Same contract as ``DecoderForCausalLM.forward``: (T,) ids and positions in, (T, hidden) bf16 out."""
        # The C side reads these as int64 arrays: the model runner's tensors already are, anything else is copied.
        input_ids, positions, slots, tables = (
            t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
            for t in (input_ids, positions, meta.slot_mapping, meta.block_tables))
        num_tokens = input_ids.shape[0]
        out = torch.empty((num_tokens, self._hidden), dtype=torch.bfloat16)
        self._run(kv_caches, _Batch(tokens=input_ids.data_ptr(), positions=positions.data_ptr(),
                                    slots=slots.data_ptr(), block_tables=tables.data_ptr(), T=num_tokens,
                                    max_blocks=tables.shape[1]),
                  meta.query_start_loc, meta.seq_lens, meta.block_size, out.data_ptr(), None)
        return out

    def forward_logits(self, batch: StepBatch, kv_caches: list[torch.Tensor], rows: Sequence[int], argmax: bool,
                       need_hidden: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int] | None]:
        """The forward of ``batch`` and the LM head on ``rows`` of its output, in one native call.

        Returns the (T, hidden) bf16 hidden states (None unless ``need_hidden``), then with ``argmax`` None and each
        row's argmax as ``NativeLinear.forward_with_argmax`` finds it (the logits stay in scratch memory), else the
        (len(rows), vocab) float32 logits and None. Torch is called only for the tensors returned (see ``StepBatch``).

        Raises:
            ValueError: the model's LM head is not a native float32 layer (``has_head``), or a row is not a row of
                the batch; and what ``__call__`` raises for a bad batch (``_run``'s checks, shared by both).
        """
        head = self._head
        if head is None:
            raise ValueError("this model's LM head does not run in the native forward")
        num_tokens, num_rows = len(batch.input_ids), len(rows)
        hidden_bytes = -(-2 * num_tokens * self._hidden // 64) * 64  # the logits after it stay 64-byte aligned
        scratch = self._scratch_at(hidden_bytes + (4 * num_rows * head.out_features if argmax else 0))
        hidden = logits = index = None
        if need_hidden:
            hidden = torch.empty((num_tokens, self._hidden), dtype=torch.bfloat16)
        if argmax:
            index = array("q", bytes(8 * num_rows))
        else:
            logits = torch.empty((num_rows, head.out_features), dtype=torch.float32)  # (R, vocab)
        row_ids = array("i", rows)  # kept alive through the call
        desc = _Batch(tokens=batch.input_ids.buffer_info()[0], positions=batch.positions.buffer_info()[0],
                      slots=batch.slot_mapping.buffer_info()[0], block_tables=batch.block_tables.buffer_info()[0],
                      T=num_tokens, max_blocks=batch.max_blocks, head=head._address, head_fmt=FMT_CODES[head.fmt],
                      n_logits=num_rows, logit_rows=row_ids.buffer_info()[0],
                      logits=scratch + hidden_bytes if logits is None else logits.data_ptr(),
                      argmax=index.buffer_info()[0] if index is not None else None)
        self._run(kv_caches, desc, batch.query_start_loc, batch.seq_lens, batch.block_size,
                  scratch if hidden is None else hidden.data_ptr(), rows)
        return hidden, logits, index.tolist() if index is not None else None

    def _scratch_at(self, nbytes: int) -> int:
        """Address of at least ``nbytes`` of scratch memory (outputs nobody reads), kept and grown across calls."""
        if nbytes > self._scratch_bytes:
            self._scratch_bytes = max(nbytes, 2 * self._scratch_bytes)
            self._scratch = torch.empty(self._scratch_bytes, dtype=torch.uint8)
            self._scratch_address = self._scratch.data_ptr()
        return self._scratch_address

    def _rope_tables(self, rows: int) -> tuple[int, int, int]:
        """(cos address, sin address, rows held) of rotary tables that hold positions below ``rows``: they change
        only when they grow, so their addresses are kept rather than asked of torch at every step."""
        if rows > self._rope[2]:
            cos, sin = self._rotary.tables(torch.bfloat16, rows)  # (n, D) each
            self._rope = (cos.data_ptr(), sin.data_ptr(), cos.shape[0])
            self._rope_tensors = (cos, sin)  # keeps the addresses valid
        return self._rope

    def _run(self, kv_caches: list[torch.Tensor], batch: _Batch, query_start_loc: Sequence[int],
             seq_lens: Sequence[int], block_size: int, out: int, rows: Sequence[int] | None) -> None:
        """Completes ``batch`` (which has its token, position, slot and table addresses, T, max_blocks and any LM
        head fields) and runs it, writing the (T, hidden) bf16 hidden states at address ``out``."""
        if kv_caches is not self._caches:
            self._bind(kv_caches)
        if block_size != self._desc.block_size:
            raise ValueError(f"metadata block_size {block_size} != cache block size {self._desc.block_size}")
        # The C side reads the rows of positions < max(seq_lens) (it checks each position against the tables).
        batch.rope_cos, batch.rope_sin, batch.rope_rows = self._rope_tables(max(seq_lens, default=0))
        # A Python array, not a tensor (see StepBatch).
        lengths = array("i", (*query_start_loc, *seq_lens))  # (S + 1 + S,) int32
        num_seqs, lengths_at = len(seq_lens), lengths.buffer_info()[0]
        batch.S, batch.query_start, batch.seq_lens = num_seqs, lengths_at, lengths_at + 4 * (num_seqs + 1)
        if batch.T:
            rc = self._fn(self._address, ctypes.addressof(batch), out)
            if rc == -1:
                raise MemoryError(f"native forward of {batch.T} tokens: out of memory")
            if rc == -3:
                raise IndexError(f"a token id is outside the vocabulary ({self._desc.vocab})")
            if rc == -4:
                raise ValueError(f"a position is negative or not below the sequence lengths {tuple(seq_lens)}")
            if rc == -5:
                raise ValueError(f"logit rows {list(rows or ())} are not all rows of the {batch.T}-token batch")
            if rc != 0:
                raise RuntimeError(f"native forward failed with code {rc}")
        elif rows:
            raise ValueError(f"logit rows {list(rows)} are not all rows of the 0-token batch")
