"""What chat and completions share: the server context, request checks, SamplingParams, logprobs and disconnects."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from fabrik.sampling.logprobs import TokenLogprob
from fabrik.sampling.params import SamplingParams
from fabrik.server.config import ModelInfo, ServerConfig
from fabrik.server.engine_client import EngineClient
from fabrik.server.errors import APIError, bad_request, context_length_exceeded, from_value_error
from fabrik.server.protocol import PromptTokensDetails, SamplingRequest, TopLogprob, TokenLogprobOut, Usage
from fabrik.tokenizer import Tokenizer, TokenLimitExceeded

request_logger = logging.getLogger("fabrik.server.requests")

_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,20}")

# JSON has no -inf: a token the model rules out entirely is reported with this logprob (as vLLM does).
_MIN_LOGPROB = -9999.0

T = TypeVar("T")


@dataclass(frozen=True)
class ServerContext:
    """Everything a route handler needs; built once at startup."""

    config: ServerConfig
    model: ModelInfo
    tokenizer: Tokenizer | None
    client: EngineClient
    reasoning: bool
    """The chat template knows ``<think>`` (Qwen3 style): split reasoning from content."""
    sampling_defaults: dict = field(default_factory=dict)
    """The model's recommended sampling values (generation_config.json) for parameters a request leaves out."""
    fingerprint: str = "fp_fabrik"
    """The responses' ``system_fingerprint``: changes when anything but the request would change the tokens."""

    def check_model(self, requested: str | None) -> None:
        """404 unless ``requested`` is the served model (or omitted)."""
        if requested is not None and requested != self.model.name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                                f"'{self.model.name}'", "invalid_request_error", "model", "model_not_found")

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, and this model has no tokenizer.json; "
                              f"send token ids instead")
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.token_to_text(token_id)

    def log_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        # NOTE: prompts and outputs are the users' data: only logged when the operator asked for it.
        if self.config.enable_request_logging:
            prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False) if self.tokenizer else prompt_ids
            request_logger.info("request %s: prompt=%r params=%r", request_id, prompt, params)

    def log_output(self, request_id: str, outputs: object) -> None:
        if self.config.enable_request_logging:
            request_logger.info("request %s: output=%r", request_id, outputs)


def encode(ctx: ServerContext, text: str, param: str, add_special_tokens: bool = True,
           limit: int | None = None) -> list[int]:
    """Token ids of request text (``server/validation.py`` checked it is valid Unicode); a text of more than ``limit``
    tokens (default: what could fit the context) is refused, 400 context_length_exceeded naming ``param``, as soon as
    that is certain."""
    tokenizer = ctx.need_tokenizer(f"a text {param}")
    limit = ctx.model.max_model_len - 1 if limit is None else limit
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens, limit=limit)
    except TokenLimitExceeded as exc:
        raise context_length_exceeded(ctx.model.max_model_len, exc.num_tokens, None, param,
                                      at_least=not exc.exact) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(ctx: ServerContext, req: SamplingRequest, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, logprobs_param: str = "logprobs") -> SamplingParams:
    """The request's SamplingParams, checked against the server's limits (400 naming the parameter)."""
    limits = ctx.config
    if req.n > limits.max_n:
        raise bad_request(f"n ({req.n}) must be <= {limits.max_n}", "n")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > limits.max_stop_sequences:
        raise bad_request(f"stop has {len(stop)} strings; at most {limits.max_stop_sequences} are allowed", "stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > limits.max_stop_length:
        raise bad_request(f"a stop string has {longest} characters; at most {limits.max_stop_length} are allowed",
                          "stop")
    for k in (logprobs, prompt_logprobs):
        if k is not None and not 0 <= k <= limits.max_top_logprobs:
            raise bad_request(f"{logprobs_param} ({k}) must be in [0, {limits.max_top_logprobs}]", logprobs_param)
    logit_bias = _logit_bias(ctx, req.logit_bias)
    for token_id in req.stop_token_ids or ():
        if not 0 <= token_id < ctx.model.vocab_size:
            raise bad_request(f"stop_token_ids contains {token_id}, outside the vocabulary [0, "
                              f"{ctx.model.vocab_size})", "stop_token_ids")
    defaults = ctx.sampling_defaults
    top_p = _or_default(req.top_p, defaults, "top_p", 1.0)
    top_k = _or_default(req.top_k, defaults, "top_k", 0)
    if top_p == 0:
        # NOTE: OpenAI allows top_p 0, where SamplingParams (like vLLM) wants it > 0: the smallest set of tokens
        # holding at least none of the probability is the most likely token alone, which is what top_k 1 keeps.
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            n=req.n, temperature=_or_default(req.temperature, defaults, "temperature", 1.0),
            top_p=top_p, top_k=top_k,
            min_p=_or_default(req.min_p, defaults, "min_p", 0.0), presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=_or_default(req.repetition_penalty, defaults, "repetition_penalty", 1.0),
            seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids, max_tokens=max_tokens,
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        raise from_value_error(exc) from None


def _or_default(value, defaults: dict, name: str, api_default):
    """The request's value; else the model's recommended one (generation_config.json); else the API default."""
    if value is not None:
        return value
    return defaults.get(name, api_default)


def _logit_bias(ctx: ServerContext, bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    if len(bias) > ctx.config.max_logit_bias:
        raise bad_request(f"logit_bias has {len(bias)} entries; at most {ctx.config.max_logit_bias} are allowed",
                          "logit_bias")
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        # NOTE: not int(key): it reads "1_0" as 10 and "٥" as 5; a token id is written in ASCII digits.
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids in decimal digits, got {key[:32]!r}", "logit_bias")
        token_id = int(key)
        if not 0 <= token_id < ctx.model.vocab_size:
            raise bad_request(f"logit_bias names token {token_id}, outside the vocabulary [0, "
                              f"{ctx.model.vocab_size})", "logit_bias")
        parsed[token_id] = value
    return parsed


def check_sequences(ctx: ServerContext, num_prompts: int, n: int) -> None:
    """400 if prompts x n sequences exceed the per-request cap (or could never all wait in the queue at once)."""
    limit = min(ctx.config.max_sequences_per_request, ctx.config.max_waiting_requests)
    if num_prompts * n > limit:
        param = "n" if n > 1 else "prompt"
        raise bad_request(f"the request asks for {num_prompts * n} sequences ({num_prompts} prompts x n = {n}); at "
                          f"most {limit} are allowed per request", param)


def with_max_tokens(params: SamplingParams, max_tokens: int | None) -> SamplingParams:
    """``params`` with ``max_tokens`` set (checked against min_tokens: 400 if it is smaller)."""
    try:
        return params.replace(max_tokens=max_tokens)
    except ValueError as exc:
        raise from_value_error(exc) from None


def check_max_tokens(value: int | None, param: str, allow_zero: bool = False) -> None:
    minimum = 0 if allow_zero else 1
    if value is not None and value < minimum:
        raise bad_request(f"{param} must be >= {minimum}, got {value}", param)


def check_context(ctx: ServerContext, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
    """400 context_length_exceeded unless the prompt and ``max_tokens`` (at least one token) fit the context."""
    limit = ctx.model.max_model_len
    if num_prompt_tokens >= limit:
        raise context_length_exceeded(limit, num_prompt_tokens, max_tokens, param)
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise context_length_exceeded(limit, num_prompt_tokens, max_tokens, param)


def default_max_tokens(ctx: ServerContext, num_prompt_tokens: int) -> int | None:
    """``max_tokens`` for a request that gave none: up to the context length, or what the KV cache can hold.

    NOTE: the engine's own default (the rest of the context) would be refused when the KV cache is smaller than
    the context, as it is with default settings for long-context models; OpenAI's meaning is "as much as fits".
    """
    limit = ctx.model.max_model_len
    if ctx.model.kv_capacity_tokens:
        limit = min(limit, ctx.model.kv_capacity_tokens)
    room = limit - num_prompt_tokens
    return room if room >= 1 else None


def check_stream_options(req: SamplingRequest) -> bool:
    """Whether to send a usage chunk; 400 if stream_options comes without stream (as OpenAI does)."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def usage(num_prompt_tokens: int, num_generated: int, num_cached: int) -> Usage:
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated,
                 total_tokens=num_prompt_tokens + num_generated,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached))


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def chat_logprobs(ctx: ServerContext, logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob],
                  ) -> list[TokenLogprobOut]:
    """Chat's ``logprobs.content`` entries for generated tokens."""
    out = []
    for lp in logprobs:
        text = ctx.token_text(lp.token_id)
        top = [TopLogprob(token=(t := ctx.token_text(tid)), logprob=clamp_logprob(v), bytes=list(t.encode()))
               for tid, v in lp.top]
        out.append(TokenLogprobOut(token=text, logprob=clamp_logprob(lp.logprob), bytes=list(text.encode()),
                                   top_logprobs=top))
    return out


async def until_disconnected(request: Request) -> None:
    """Return when the client has gone (the body was already read, so only ``http.disconnect`` can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def first_or_cancel(work: Awaitable[T], interrupt: Awaitable[object]) -> tuple[bool, T | None]:
    """Await ``work`` unless ``interrupt`` completes first; then cancel ``work`` (its cleanup aborts its requests).

    Returns:
        (True, work's result) if it finished, else (False, None).
    """
    task = asyncio.ensure_future(work)
    interrupted = asyncio.ensure_future(interrupt)
    try:
        await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return False, None
    return True, task.result()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first; then cancel it (its cleanup aborts the requests)."""
    _finished, result = await first_or_cancel(work, until_disconnected(request))
    return result
