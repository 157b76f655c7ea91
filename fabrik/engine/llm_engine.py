"""The engine: requests in, one step at a time, sequence updates out.

One step is ``schedule -> execute -> update -> detokenize``::

    add_request(prompt, params) -> n core Requests (one per sequence) -> Scheduler
    step():  Scheduler.schedule()          -> SchedulerOutput
             ModelRunner.execute(...)      -> sampled tokens (+ logprobs)
             Scheduler.update(...)         -> requests that got a token (eos / length finish here)
             IncrementalDetokenizer        -> text deltas (stop strings finish here)
             -> list[SequenceUpdate]

The engine is single-threaded: the server calls it from one dedicated thread.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fabrik.config import EngineConfig, SchedulerConfig, parse_bytes
from fabrik.core.block_manager import BlockManager
from fabrik.core.request import Request, RequestStatus, StoppingCriteria
from fabrik.core.scheduler import Scheduler
from fabrik.engine.model_runner import ModelRunner
from fabrik.kernels.openmp import release_openmp_threads
from fabrik.models.attention import kv_bytes_per_token
from fabrik.loader import resolve_dtype, resolve_model_path
from fabrik.model_config import load_eos_token_ids, load_model_config, load_sampling_defaults
from fabrik.outputs import SequenceUpdate
from fabrik.sampling.logprobs import TokenLogprob
from fabrik.sampling.params import SamplingParams
from fabrik.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

_DEFAULT_MAX_KV_BYTES = 2 * 2**30


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one core request (text, logprobs, RNG)."""

    request_id: str
    index: int
    core: Request
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    pending_prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model, config.revision)
        self.model_path = path
        self.model_config = load_model_config(path)
        self.dtype = resolve_dtype(self.model_config, config.dtype)
        tok_path = resolve_model_path(config.tokenizer) if config.tokenizer else path
        self.tokenizer: Tokenizer | None = None
        if (tok_path / "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_pretrained(tok_path)
        eos = set(load_eos_token_ids(path))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and not eos:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.sampling_defaults = load_sampling_defaults(path)
        """Recommended sampling values from generation_config.json, for requests that leave them out."""

        max_len = self.model_config.max_position_embeddings
        if config.max_model_len is not None:
            if config.max_model_len > max_len:
                raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                                 f"max_position_embeddings ({max_len})")
            max_len = config.max_model_len
        self.max_model_len = max_len

        per_token = kv_bytes_per_token(self.model_config, self.dtype, config.kv_cache_dtype)
        per_block = per_token * config.block_size
        if config.kv_cache_memory_bytes is not None:
            budget = parse_bytes(config.kv_cache_memory_bytes)
        else:
            budget = min(_DEFAULT_MAX_KV_BYTES, per_token * max_len * config.max_num_seqs)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes ({budget}) is smaller than one KV block ({per_block} bytes)")
        self.num_blocks = num_blocks

        torch.manual_seed(config.seed)
        self.runner = ModelRunner(path, self.model_config, self.dtype, num_blocks, config.block_size,
                                  tuple(sorted(self.eos_token_ids)), kernels=config.kernels,
                                  quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_model_len=max_len, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_num_seqs=config.max_num_seqs,
                            max_prompt_logprob_tokens=config.max_prompt_logprob_tokens),
            self.block_manager)
        self._seqs: dict[str, _Sequence] = {}          # core request id -> sequence
        self._children: dict[str, list[str]] = {}      # request id -> core request ids
        # The model's thousands of objects live as long as the engine: frozen, the cyclic collector stops re-walking
        # them on every full collection (~4% of a batch-8 decode step otherwise).
        gc.collect()
        gc.freeze()
        # Loading ran parallel regions on this thread; if another thread steps the engine (a server's engine thread,
        # an LLM handed to a worker), this thread's idle OpenMP pool would make that thread's workers sleep at every
        # region: batch-16 steps 60-66 -> 46-52 ms with it ended. Stepping on this thread starts a new pool.
        release_openmp_threads()
        logger.info("engine ready: %s, %s, weights %s, kernels %s, %d KV blocks of %d tokens (%s, %.1f MiB), "
                    "max_model_len %d", path, self.dtype, config.quantization or "as loaded",
                    self.runner.kernel_backend, num_blocks, config.block_size,
                    "int8" if config.kv_cache_dtype == "int8" else "as the model", num_blocks * per_block / 2**20,
                    max_len)

    # -- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass prompt_token_ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                    group: str | None = None) -> None:
        """Queue a request; raises ValueError (naming the problem) if it can never run.

        Args:
            request_id: Unique among the engine's unfinished requests.
            prompt: Text or token ids.
            params: How to sample.
            group: The client request it belongs to (a completions request's prompts share one), for fair
                admission; default: the request itself (its ``n`` sequences form the group).
        """
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode_prompt(prompt)
        self._validate(prompt_ids, params)
        if params.max_tokens is None:
            # Unbounded: as far as the context and the whole KV cache allow.
            max_tokens = min(self.max_model_len, self.num_blocks * self.config.block_size) - len(prompt_ids)
        else:
            max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        stopping = StoppingCriteria(
            max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens),
            eos_token_ids=self.eos_token_ids, stop_token_ids=frozenset(params.stop_token_ids or ()),
            ignore_eos=params.ignore_eos)
        children = []
        for index in range(params.n):
            core_id = request_id if params.n == 1 else f"{request_id}#{index}"
            core = Request(core_id, prompt_ids, stopping, sampling_params=params,
                           use_prefix_cache=params.prompt_logprobs is None, group=group or request_id,
                           computes_prompt_logprobs=params.prompt_logprobs is not None)
            generator = None
            if params.seed is not None:
                generator = torch.Generator().manual_seed((params.seed + index) % 2**64)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, skip_special_tokens=params.skip_special_tokens, stop=params.stop or (),
                    include_stop_str_in_output=params.include_stop_str_in_output, prompt_token_ids=prompt_ids)
            seq = _Sequence(request_id, index, core, generator, detok)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            self.scheduler.add_request(core)
            self._seqs[core_id] = seq
            children.append(core_id)
        self._children[request_id] = children

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is out of range [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but the context length is "
                             f"{self.max_model_len} and at least one token must be generated")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        params.check_token_ids(vocab)
        max_tokens = params.max_tokens or 1
        total = min(len(prompt_ids) + max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(total) > self.num_blocks:
            raise ValueError(f"a sequence of {total} tokens needs {self.block_manager.blocks_needed(total)} KV "
                             f"blocks, but the cache has only {self.num_blocks}: raise kv_cache_memory_bytes "
                             f"or lower max_tokens")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it was unknown or already done."""
        found = False
        for core_id in self._children.pop(request_id, []):
            found |= self.scheduler.abort(core_id) is not None
            self._seqs.pop(core_id, None)
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[SequenceUpdate]:
        """Run one engine step; returns what each sequence produced."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        requests = {c.request_id: self._seqs[c.request_id].core for c in out.chunks}
        generators = {rid: self._seqs[rid].generator for rid in requests}
        result = self.runner.execute(out, requests, generators)
        for rid, lps in result.prompt_logprobs.items():
            seq = self._seqs[rid]
            if not seq.prompt_logprobs_sent:  # a recompute after preemption must not add them twice
                seq.pending_prompt_logprobs.extend(lps)
        advanced = self.scheduler.update(out, result.sampled)
        return [self._emit(self._seqs[r.request_id], r, result.logprobs.get(r.request_id)) for r in advanced]

    def _emit(self, seq: _Sequence, core: Request, logprob: TokenLogprob | None) -> SequenceUpdate:
        token = core.output_token_ids[-1]
        text = ""
        status = core.status
        stop_reason: str | int | None = None
        # The eos / stop token that ended the sequence is not part of its text (as in vLLM).
        ended_by_token = status == RequestStatus.FINISHED_STOPPED
        if seq.detokenizer is not None:
            keep = not ended_by_token or core.sampling_params.include_stop_str_in_output
            text = seq.detokenizer.update([token] if keep else [])
            if seq.detokenizer.stop_reason is not None:
                stop_reason = seq.detokenizer.stop_reason
                if not status.is_finished:
                    self.scheduler.finish(core.request_id, RequestStatus.FINISHED_STOPPED)
                status = RequestStatus.FINISHED_STOPPED
            elif status.is_finished:
                text += seq.detokenizer.flush()
        if ended_by_token and stop_reason is None and token in core.stopping.stop_token_ids:
            stop_reason = token
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs = tuple(seq.prompt_logprobs + seq.pending_prompt_logprobs)
            seq.prompt_logprobs_sent = True
        if status.is_finished:
            self._forget(seq)
        return SequenceUpdate(
            request_id=seq.request_id, index=seq.index, new_token_ids=(token,), new_text=text,
            new_logprobs=(logprob,) if logprob is not None else (),
            finish_reason=status.finish_reason, stop_reason=stop_reason, prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=core.num_prompt_tokens, num_cached_tokens=max(core.num_cached_tokens, 0))

    def _forget(self, seq: _Sequence) -> None:
        self._seqs.pop(seq.core.request_id, None)
        siblings = self._children.get(seq.request_id)
        if siblings is not None:
            siblings.remove(seq.core.request_id)
            if not siblings:
                del self._children[seq.request_id]
