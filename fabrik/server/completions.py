"""POST /v1/completions: prompts (text or token ids, one or many) -> engine -> text, with echo and logprobs.

Scoring harnesses (lm-evaluation-harness and the like) send ``echo=true, logprobs=k, max_tokens=0`` to read the
log-likelihood of a text. The engine always generates at least one token, so such a request runs with
``max_tokens=1`` and prompt logprobs, and the generated token is dropped: the answer holds the prompt, its
logprobs (the first token's is null: nothing predicts it), ``finish_reason "length"`` and 0 completion tokens.
Without echo, ``max_tokens=0`` answers empty texts and the usage (the prompt's token count), as the spec allows.

Choice ``i * n + j`` is the ``j``-th sample of the ``i``-th prompt, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fabrik.outputs import SequenceUpdate
from fabrik.sampling.logprobs import TokenLogprob
from fabrik.sampling.params import SamplingParams
from fabrik.server.common import (
    ServerContext, check_context, check_max_tokens, check_sequences, check_stream_options, clamp_logprob,
    default_max_tokens, encode, new_id, sampling_params, usage, with_max_tokens)
from fabrik.server.errors import bad_request
from fabrik.server.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage)
from fabrik.server.streaming import guarded, sse_event


@dataclass
class PreparedPrompt:
    request_id: str
    prompt_ids: list[int]
    text: str
    """The prompt as text (for echo)."""
    params: SamplingParams
    """The request's params with this prompt's max_tokens."""


@dataclass
class PreparedCompletion:
    """A validated completions request, tokenized, ready for the engine."""

    request_id: str
    prompts: list[PreparedPrompt]
    params: SamplingParams
    """Shared by all prompts but for max_tokens (see PreparedPrompt.params)."""
    echo: bool
    prompt_only: bool
    """max_tokens=0: generate nothing (the prompt and its logprobs with echo, else empty text and only the usage);
    the engine's one token is dropped."""
    include_usage: bool


# OpenAI's prompt when the request gives none: the document separator, "as if from the beginning of a new document".
DEFAULT_PROMPT = "<|endoftext|>"


def _prompt_inputs(prompt: str | list[str] | list[int] | list[list[int]] | None) -> list[str | list[int]]:
    if prompt is None:
        return [DEFAULT_PROMPT]
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def prepare(ctx: ServerContext, req: CompletionRequest) -> PreparedCompletion:
    """Validate and tokenize a completions request; every problem is a 400 naming its parameter."""
    ctx.check_model(req.model)
    include_usage = check_stream_options(req)
    if req.suffix:  # "" asks for no suffix, like null
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of ({req.best_of}) is not supported unless it equals n ({req.n})", "best_of")
    inputs = _prompt_inputs(req.prompt)
    if len(inputs) > ctx.config.max_prompts:
        raise bad_request(f"prompt holds {len(inputs)} prompts; at most {ctx.config.max_prompts} are allowed",
                          "prompt")
    check_sequences(ctx, len(inputs), req.n)
    check_max_tokens(req.max_tokens, "max_tokens", allow_zero=True)
    prompt_only = req.max_tokens == 0
    k = req.logprobs
    params = sampling_params(ctx, req, max_tokens=None, logprobs=k,
                             prompt_logprobs=k if req.echo and k is not None else None)
    request_id = new_id("cmpl")
    prompts = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = encode(ctx, item, "prompt")
            text = item
        else:
            bad = next((t for t in item if not 0 <= t < ctx.model.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt token id {bad} is out of range [0, {ctx.model.vocab_size})", "prompt")
            ids = list(item)
            text = ctx.tokenizer.decode(ids, skip_special_tokens=False) if ctx.tokenizer and req.echo else ""
        if not ids:
            raise bad_request(f"prompt {i} is empty: it must have at least one token", "prompt")
        check_context(ctx, len(ids), None if prompt_only else req.max_tokens, "prompt")
        max_tokens = 1 if prompt_only else req.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(ctx, len(ids))
        prompt_id = request_id if len(inputs) == 1 else f"{request_id}-{i}"
        prompts.append(PreparedPrompt(prompt_id, ids, text, with_max_tokens(params, max_tokens)))
    return PreparedCompletion(request_id, prompts, params, req.echo, prompt_only, include_usage)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    offset: int = 0
    """Characters of the choice's text so far (for text_offset)."""
    num_tokens: int = 0
    started: bool = False
    finish_reason: str | None = None


class CompletionRun:
    """One completions request (all its prompts) in the engine: to a whole response or a stream of SSE events."""

    def __init__(self, ctx: ServerContext, prepared: PreparedCompletion, model_name: str) -> None:
        self.ctx = ctx
        self.prepared = prepared
        self.model_name = model_name
        self.created = int(time.time())
        self.output: asyncio.Queue = asyncio.Queue()
        self.n = prepared.params.n
        self.by_id = {p.request_id: i for i, p in enumerate(prepared.prompts)}
        self.choices = [_Choice() for _ in range(len(prepared.prompts) * self.n)]
        self.num_cached = [0] * len(prepared.prompts)
        self.prompt_logprobs: list[tuple[TokenLogprob | None, ...] | None] = [None] * len(prepared.prompts)

    async def start(self, arrival: float) -> None:
        """Admit every prompt (429 if the queue is full, 400 if the engine refuses one)."""
        client = self.ctx.client
        client.check_capacity(len(self.prepared.prompts) * self.n)
        for prompt in self.prepared.prompts:
            self.ctx.log_request(prompt.request_id, prompt.prompt_ids, prompt.params)
        # NOTE: submit (not the async add) so that all prompts count as waiting before any other request is
        # checked against the limit.
        try:
            accepted = [client.submit(p.request_id, p.prompt_ids, p.params, self.output, arrival,
                                      group=self.prepared.request_id) for p in self.prepared.prompts]
            results = await asyncio.gather(*accepted, return_exceptions=True)
        except BaseException:  # cancelled, or the engine died between two submits
            self.abort()
            raise
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            self.abort()
            raise error

    def abort(self) -> None:
        for prompt in self.prepared.prompts:
            self.ctx.client.abort(prompt.request_id)

    async def _updates(self) -> AsyncIterator[tuple[int, SequenceUpdate]]:
        ids = [p.request_id for p in self.prepared.prompts]
        async for request_id, updates in self.ctx.client.stream(self.output, ids, self.n):
            for update in updates:
                yield self.by_id[request_id], update

    def _token_entry(self, logprobs: CompletionLogprobs, choice: _Choice, token_id: int,
                     lp: TokenLogprob | None) -> None:
        text = self.ctx.token_text(token_id)
        logprobs.tokens.append(text)
        logprobs.text_offset.append(choice.offset)
        choice.offset += len(text)
        if lp is None:
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            return
        logprobs.token_logprobs.append(clamp_logprob(lp.logprob))
        top = {self.ctx.token_text(tid): clamp_logprob(v) for tid, v in lp.top}
        top.setdefault(text, clamp_logprob(lp.logprob))  # the chosen token is always listed (as vLLM does)
        logprobs.top_logprobs.append(top)

    def _apply(self, prompt_index: int, update: SequenceUpdate) -> tuple[int, str, CompletionLogprobs | None]:
        """Fold an update into its choice; returns (choice index, text delta, logprobs delta)."""
        index = prompt_index * self.n + update.index
        choice = self.choices[index]
        prompt = self.prepared.prompts[prompt_index]
        want_logprobs = self.prepared.params.logprobs is not None
        delta_lp = CompletionLogprobs() if want_logprobs else None
        text = ""
        self.num_cached[prompt_index] = max(self.num_cached[prompt_index], update.num_cached_tokens)
        if update.prompt_logprobs is not None and self.prompt_logprobs[prompt_index] is None:
            self.prompt_logprobs[prompt_index] = update.prompt_logprobs
        if not choice.started:
            choice.started = True
            if self.prepared.echo:
                text = prompt.text
                if delta_lp is not None:
                    prompt_lps = self.prompt_logprobs[prompt_index] or (None,) * len(prompt.prompt_ids)
                    for token_id, lp in zip(prompt.prompt_ids, prompt_lps):
                        self._token_entry(delta_lp, choice, token_id, lp)
        if not self.prepared.prompt_only:
            text += update.new_text
            choice.num_tokens += len(update.new_token_ids)
            if delta_lp is not None:
                for lp in update.new_logprobs:
                    self._token_entry(delta_lp, choice, lp.token_id, lp)
        if update.finished:
            choice.finish_reason = "length" if self.prepared.prompt_only else (update.finish_reason or "stop")
        choice.text.append(text)
        if delta_lp is not None:
            if choice.logprobs is None:
                choice.logprobs = CompletionLogprobs()
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(choice.logprobs, name).extend(getattr(delta_lp, name))
        return index, text, delta_lp

    def _usage(self) -> Usage:
        return usage(sum(len(p.prompt_ids) for p in self.prepared.prompts),
                     sum(c.num_tokens for c in self.choices), sum(self.num_cached))

    async def response(self) -> CompletionResponse:
        """Run to the end and build the whole response."""
        finished = False
        try:
            async for prompt_index, update in self._updates():
                self._apply(prompt_index, update)
            finished = True
        finally:
            if not finished:
                self.abort()
        choices = [CompletionChoice(index=i, text="".join(c.text), logprobs=c.logprobs, finish_reason=c.finish_reason)
                   for i, c in enumerate(self.choices)]
        self.ctx.log_output(self.prepared.request_id, [c.text for c in choices])
        return self._response(choices, self._usage())

    def _response(self, choices: list[CompletionChoice], usage_: Usage | None = None) -> CompletionResponse:
        """A whole response or one stream chunk (the same shape in completions)."""
        return CompletionResponse(id=self.prepared.request_id, created=self.created, model=self.model_name,
                                  system_fingerprint=self.ctx.fingerprint, choices=choices, usage=usage_)

    def events(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice update, the usage chunk if asked, then [DONE]."""
        return guarded(self._events(), self.abort)

    async def _events(self) -> AsyncIterator[str]:
        async for prompt_index, update in self._updates():
            index, text, logprobs = self._apply(prompt_index, update)
            choice = self.choices[index]
            if text or logprobs is not None or update.finished:
                yield sse_event(self._response([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                                 finish_reason=choice.finish_reason)]),
                                self.prepared.include_usage)
        if self.prepared.include_usage:
            yield sse_event(self._response([], self._usage()))
        self.ctx.log_output(self.prepared.request_id, ["".join(c.text) for c in self.choices])
