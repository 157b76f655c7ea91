"""The model runner: owns the model and the KV cache tensors, runs one scheduled step.

``execute`` turns a ``SchedulerOutput`` into one flat batch::

    chunks:        a: 5 prompt tokens (start 0)   b: 1 decode token (start 9)   c: chunk of 3 (start 16)
    input_ids:     [a0 a1 a2 a3 a4 | b9 | c16 c17 c18]                                   (T,)
    positions:     [ 0  1  2  3  4 |  9 |  16  17  18]                                   (T,)
    slot_mapping:  block_ids[p // block_size] * block_size + p % block_size              (T,)
    seq_lens:      (5, 10, 19)    query_start_loc: (0, 5, 6, 9)

then runs the model over the paged cache, computes logits only where they are needed
(the last token of chunks that sample, and prompt positions when prompt logprobs are
asked for) and samples.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from fabrik.core.request import Request
from fabrik.core.scheduler import SchedulerOutput
from fabrik.kernels import apply_kernels, select_backend
from fabrik.loader import load_model
from fabrik.model_config import ModelConfig
from fabrik.models.attention import StepBatch, make_kv_caches
from fabrik.sampling.logprobs import TokenLogprob, compute_logprobs
from fabrik.sampling.sampler import Sampler, SamplingRow


PROMPT_LOGPROB_ROWS = 64
"""Prompt positions whose logits are held at once: 64 rows of a 152k vocabulary are 39 MB in float32 (about three
times that with the log-softmax and the rank comparisons), whatever the prompt's length."""


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What one step produced, keyed by request id."""

    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob]
    prompt_logprobs: dict[str, list[TokenLogprob]]
    """Logprobs of the prompt tokens this step's chunk predicted (positions 1.. of the prompt)."""


class ModelRunner:
    """Runs the model on the CPU with the selected kernel backend (native or torch reference)."""

    def __init__(self, model_path: Path, config: ModelConfig, dtype: torch.dtype,
                 num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...],
                 kernels: str | None = None, quantization: str | None = None,
                 kv_cache_dtype: str = "auto") -> None:
        self.config = config
        self.dtype = dtype
        self.block_size = block_size
        self.model = load_model(model_path, config, dtype)
        # NOTE: the native kernels compute with bf16 (or int8) weights: a float32 model stays on torch's
        # kernels unless quantization is asked for, so float32 keeps its exact parity with transformers.
        self.kernel_backend = "torch"
        if dtype == torch.bfloat16 or quantization is not None:
            backend = select_backend(kernels)
            self.model = apply_kernels(self.model, backend, quantization)
            self.kernel_backend = backend.name
        if kv_cache_dtype not in getattr(self.model, "kv_cache_dtypes", ("auto",)):
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported by {type(self.model).__name__}")
        self.kv_caches = make_kv_caches(config, num_blocks, block_size, dtype, kv_cache_dtype)
        self.sampler = Sampler(eos_token_ids)

    def execute(self, out: SchedulerOutput, requests: Mapping[str, Request],
                generators: Mapping[str, torch.Generator | None]) -> ModelRunnerOutput:
        bs = self.block_size
        # Plain arrays, no torch: see StepBatch.
        input_ids, positions, slots, tables = array("q"), array("q"), array("q"), array("q")
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_idx: list[int] = []
        sample_ids: list[str] = []
        plp_idx: list[int] = []           # flat indices whose logits predict a prompt token
        plp_target: list[int] = []
        plp_owner: list[str] = []
        max_blocks = max(len(c.block_ids) for c in out.chunks)
        for chunk in out.chunks:
            request = requests[chunk.request_id]
            start, n = chunk.start_position, len(chunk.token_ids)
            offset = len(input_ids)
            input_ids.extend(chunk.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(chunk.block_ids[p // bs] * bs + p % bs for p in pos)
            query_start_loc.append(offset + n)
            seq_lens.append(start + n)
            tables.extend(chunk.block_ids)
            tables.extend((0,) * (max_blocks - len(chunk.block_ids)))  # (S, max_blocks), zero-padded
            if chunk.sample:
                sample_idx.append(offset + n - 1)
                sample_ids.append(chunk.request_id)
            if request.sampling_params.prompt_logprobs is not None:
                last_prompt_pos = request.num_prompt_tokens - 1
                for j, p in enumerate(pos):
                    if p < last_prompt_pos:
                        plp_idx.append(offset + j)
                        plp_target.append(request.prompt_token_ids[p + 1])
                        plp_owner.append(chunk.request_id)

        batch = StepBatch(input_ids, positions, slots, tuple(query_start_loc), tuple(seq_lens), tables, max_blocks, bs)
        rows = [SamplingRow(params=requests[rid].sampling_params, generator=generators.get(rid),
                            prompt_token_ids=requests[rid].prompt_token_ids,
                            output_token_ids=requests[rid].output_token_ids) for rid in sample_ids]
        # The LM head runs on the sampled rows only, in the forward's own call where the model can.
        hidden, logits, argmax = self.model.forward_and_logits(
            batch, self.kv_caches, sample_idx, bool(rows) and self.sampler.takes_argmax(rows), bool(plp_idx))
        # hidden (T, H) or None; logits (S, V) float32 or None; argmax: S ids when the LM head found them, else None

        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        if rows:
            result = self.sampler(logits, rows, argmax)
            for rid, token, lp in zip(sample_ids, result.token_ids, result.logprobs):
                sampled[rid] = token
                if lp is not None:
                    logprobs[rid] = lp

        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        if plp_idx:
            ks = [requests[rid].sampling_params.prompt_logprobs for rid in plp_owner]
            targets = torch.tensor(plp_target, dtype=torch.int64)
            with torch.inference_mode():
                for lo in range(0, len(plp_idx), PROMPT_LOGPROB_ROWS):
                    rows_idx = plp_idx[lo:lo + PROMPT_LOGPROB_ROWS]
                    chunk_logits = self.model.compute_logits(hidden[rows_idx])  # (R, V) float32
                    lps = compute_logprobs(chunk_logits, targets[lo:lo + len(rows_idx)], ks[lo:lo + len(rows_idx)])
                    for rid, lp in zip(plp_owner[lo:lo + len(rows_idx)], lps):
                        prompt_logprobs.setdefault(rid, []).append(lp)
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs)
