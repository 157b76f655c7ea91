"""POST /v1/chat/completions: messages -> chat template -> engine -> message (reasoning, content, tool calls).

Each of the ``n`` choices runs its text through two parsers, in this order::

    engine text delta -> ReasoningParser (Qwen3 <think>)  -> reasoning_content delta
                                         '-> content delta -> ToolCallStreamParser -> content delta
                                                                                  '-> tool_calls deltas

so a whole response and a stream split the text identically.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fabrik.outputs import SequenceUpdate
from fabrik.sampling.params import SamplingParams
from fabrik.server.common import (
    ServerContext, chat_logprobs, check_context, check_max_tokens, check_sequences, check_stream_options,
    default_max_tokens, new_id, sampling_params, usage, with_max_tokens)
from fabrik.server.config import ALLOWED_CHAT_TEMPLATE_KWARGS
from fabrik.server.errors import bad_request, context_length_exceeded
from fabrik.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    ChatResponseMessage, ChoiceLogprobs, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCallOut,
    TokenLogprobOut, ToolCallOut, Tool)
from fabrik.server.reasoning import ReasoningParser
from fabrik.server.tool_calls import TOOL_CALL_END, ToolCallDelta, ToolCallStreamParser
from fabrik.server.unsupported import check_chat_fields
from fabrik.server.streaming import guarded, sse_event
from fabrik.tokenizer import ChatPrompt, TokenLimitExceeded


@dataclass
class PreparedChat:
    """A validated chat request, rendered and tokenized, ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    start_in_reasoning: bool
    tools_active: bool
    tool_names: frozenset[str] = frozenset()
    """The functions the request offers: a call to any other stays content."""
    max_tool_calls: int | None = None
    """1 with ``parallel_tool_calls: false``; None: any number."""


def message_dicts(messages: list[ChatMessage], split_reasoning: bool = False) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: text parts joined, ``developer`` as ``system``.

    NOTE: ``content: null`` (an assistant turn that only calls tools) becomes "": templates such as Qwen3's read
    ``message.content`` unconditionally and fail when it is missing.

    Args:
        messages: The request's messages.
        split_reasoning: Move an assistant turn's ``<think>...</think>`` out of its content into
            ``reasoning_content``, as Qwen3's template does itself: the content's tags are text to the tokenizer now
            (``tokenizer/content.py``), so the template must not see them there.
    """
    out = []
    for message in messages:
        item = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            item["content"] = "".join(part.text for part in message.content)
        elif message.content is None:
            item["content"] = ""
        if message.role == "developer":
            item["role"] = "system"
        if message.role == "assistant":
            if message.tool_calls:
                for call in item["tool_calls"]:
                    call["function"]["arguments"] = _arguments_object(call["function"]["arguments"])
            if split_reasoning and message.reasoning_content is None and "</think>" in item["content"]:
                reasoning, _, content = item["content"].partition("</think>")
                item["reasoning_content"] = reasoning.rstrip("\n").split("<think>")[-1].lstrip("\n")
                item["content"] = content.split("</think>")[-1].lstrip("\n")
        out.append(item)
    return out


def _arguments_object(arguments: str) -> Any:
    """A tool call's arguments as the template expects them: parsed JSON when they are JSON, else the string."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def encode_messages(ctx: ServerContext, messages: list[ChatMessage], tools: list[Tool] | None,
                    chat_template_kwargs: dict[str, Any] | None, add_generation_prompt: bool = True,
                    limit: int | None = None) -> ChatPrompt:
    """The prompt of a conversation, text and ids (400 naming ``messages`` if the template refuses it or it has more
    than ``limit`` tokens, by default what could fit the context). Special-token strings in the messages and tools
    stay text unless the operator allowed them."""
    tokenizer = ctx.need_tokenizer("chat")
    if not messages:
        raise bad_request("messages must contain at least one message", "messages")
    limit = ctx.model.max_model_len - 1 if limit is None else limit
    if len(messages) > limit:  # every message takes at least one token
        raise context_length_exceeded(ctx.model.max_model_len, len(messages), None, "messages", at_least=True)
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    try:
        return tokenizer.encode_chat(message_dicts(messages, split_reasoning=ctx.reasoning), tools=tool_dicts,
                                     add_generation_prompt=add_generation_prompt, chat_template_kwargs=kwargs,
                                     limit=limit, special_tokens_in_content=ctx.config.allow_special_tokens_in_content)
    except TokenLimitExceeded as exc:
        raise context_length_exceeded(ctx.model.max_model_len, exc.num_tokens, None, "messages",
                                      at_least=not exc.exact) from None
    except ValueError as exc:
        raise bad_request(f"the chat template refused the messages: {exc}", "messages") from None


def check_chat_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Only allowlisted template variables, with the right types (never one that swaps the template)."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - ALLOWED_CHAT_TEMPLATE_KWARGS)
    if unknown:
        raise bad_request(f"chat_template_kwargs may only set {sorted(ALLOWED_CHAT_TEMPLATE_KWARGS)}, got "
                          f"{[k[:64] for k in unknown]}", "chat_template_kwargs")
    if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
        raise bad_request("chat_template_kwargs.enable_thinking must be a bool", "chat_template_kwargs")
    return kwargs


def prepare(ctx: ServerContext, req: ChatCompletionRequest) -> PreparedChat:
    """Validate, render and tokenize a chat request; every problem is a 400 naming its parameter."""
    ctx.check_model(req.model)
    check_chat_fields(req)
    check_sequences(ctx, 1, req.n)
    if req.chat_template is not None:
        raise bad_request("chat_template cannot be set by a request; the model's own template is used",
                          "chat_template")
    include_usage = check_stream_options(req)
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request(f"tool_choice {req.tool_choice!r} is not supported; use 'auto' or 'none'"
                          if isinstance(req.tool_choice, str) else
                          "tool_choice naming a function is not supported; use 'auto' or 'none'", "tool_choice")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise bad_request("response_format other than {'type': 'text'} is not supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_max_tokens(max_tokens, max_param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(ctx, req, max_tokens=None, logprobs=logprobs, logprobs_param="top_logprobs")
    tools_active = bool(req.tools) and req.tool_choice != "none"
    prompt = encode_messages(ctx, req.messages, req.tools if tools_active else None, req.chat_template_kwargs)
    text, prompt_ids = prompt.text, prompt.token_ids
    check_context(ctx, len(prompt_ids), max_tokens, "messages")
    if max_tokens is None:
        max_tokens = default_max_tokens(ctx, len(prompt_ids))
    params = with_max_tokens(params, max_tokens)
    max_tool_calls = 1 if tools_active and req.parallel_tool_calls is False else None
    if max_tool_calls == 1:
        # The first call's closing tag ends the turn: nothing after it would be sent, so it is not generated.
        params = params.replace(stop=(*params.stop, TOOL_CALL_END))
    start_in_reasoning = ctx.reasoning and text.rstrip().endswith("<think>")
    names = frozenset(tool.function.name for tool in req.tools or ()) if tools_active else frozenset()
    return PreparedChat(new_id("chatcmpl"), prompt_ids, params, include_usage, start_in_reasoning, tools_active,
                        names, max_tool_calls)


@dataclass
class _Choice:
    """The parsers and accumulated output of one of the ``n`` choices."""

    reasoning: ReasoningParser | None
    tools: ToolCallStreamParser | None
    content: list[str] = field(default_factory=list)
    reasoning_text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprobOut] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(reasoning, content, tool-call deltas) of the next text; ``final`` flushes the parsers."""
        reasoning, content = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        if final and self.reasoning is not None:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                more_content, more_calls = self.tools.finish()
                content, calls = content + more_content, calls + more_calls
        self.reasoning_text.append(reasoning)
        self.content.append(content)
        self.tool_calls.extend(calls)
        return reasoning, content, calls

    def final_reason(self, reason: str | None) -> str:
        if reason == "stop" and self.tools is not None and self.tools.saw_tool_call:
            return "tool_calls"
        return reason or "stop"


class ChatRun:
    """One chat request in the engine: runs it to a whole response or to a stream of SSE events."""

    def __init__(self, ctx: ServerContext, prepared: PreparedChat, model_name: str) -> None:
        self.ctx = ctx
        self.prepared = prepared
        self.model_name = model_name
        self.created = int(time.time())
        self.output: asyncio.Queue = asyncio.Queue()
        self.choices = [
            _Choice(ReasoningParser(prepared.start_in_reasoning) if ctx.reasoning else None,
                    ToolCallStreamParser(prepared.tool_names, prepared.max_tool_calls) if prepared.tools_active
                    else None)
            for _ in range(prepared.params.n)]
        self.num_cached = 0

    async def start(self, arrival: float) -> None:
        """Admit the request (429 if the queue is full, 400 if the engine refuses it)."""
        self.ctx.client.check_capacity(self.prepared.params.n)
        p = self.prepared
        self.ctx.log_request(p.request_id, p.prompt_ids, p.params)
        await self.ctx.client.add(p.request_id, p.prompt_ids, p.params, self.output, arrival)

    def abort(self) -> None:
        self.ctx.client.abort(self.prepared.request_id)

    async def _updates(self) -> AsyncIterator[SequenceUpdate]:
        async for _, updates in self.ctx.client.stream(self.output, [self.prepared.request_id],
                                                       self.prepared.params.n):
            for update in updates:
                yield update

    def _apply(self, update: SequenceUpdate) -> tuple[_Choice, str, str, list[ToolCallDelta], list[TokenLogprobOut]]:
        choice = self.choices[update.index]
        choice.num_tokens += len(update.new_token_ids)
        self.num_cached = max(self.num_cached, update.num_cached_tokens)
        logprobs: list[TokenLogprobOut] = []
        if self.prepared.params.logprobs is not None:
            logprobs = chat_logprobs(self.ctx, update.new_logprobs)
            choice.logprobs.extend(logprobs)
        reasoning, content, calls = choice.feed(update.new_text, final=update.finished)
        if update.finished:
            choice.finish_reason = choice.final_reason(update.finish_reason)
        return choice, reasoning, content, calls, logprobs

    def _usage(self):
        return usage(len(self.prepared.prompt_ids), sum(c.num_tokens for c in self.choices), self.num_cached)

    async def response(self) -> ChatCompletionResponse:
        """Run to the end and build the whole response."""
        finished = False
        try:
            async for update in self._updates():
                self._apply(update)
            finished = True
        finally:
            if not finished:
                self.abort()
        choices = []
        for index, choice in enumerate(self.choices):
            content = "".join(choice.content)
            calls = [ToolCallOut(id=c.id or "", function=FunctionCallOut(name=c.name or "", arguments=c.arguments))
                     for c in choice.tool_calls]
            if calls and not content.strip():
                content = None  # type: ignore[assignment]
            reasoning = "".join(choice.reasoning_text) if choice.reasoning is not None else None
            message = ChatResponseMessage(content=content, reasoning_content=reasoning or None,
                                          tool_calls=calls or None)
            logprobs = ChoiceLogprobs(content=choice.logprobs) if self.prepared.params.logprobs is not None else None
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                      finish_reason=choice.finish_reason))
        self.ctx.log_output(self.prepared.request_id, [c.message.model_dump() for c in choices])
        return ChatCompletionResponse(id=self.prepared.request_id, created=self.created, model=self.model_name,
                                      system_fingerprint=self.ctx.fingerprint,
                                      choices=choices, usage=self._usage())

    def _chunk(self, choices: list[ChatChunkChoice], usage_=None) -> str:
        return sse_event(ChatCompletionChunk(id=self.prepared.request_id, created=self.created,
                                             system_fingerprint=self.ctx.fingerprint,
                                             model=self.model_name, choices=choices, usage=usage_),
                         self.prepared.include_usage)

    def events(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: role, deltas, finish reasons, usage (if asked), [DONE]."""
        return guarded(self._events(), self.abort)

    async def _events(self) -> AsyncIterator[str]:
        for index in range(len(self.choices)):
            yield self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        async for update in self._updates():
            choice, reasoning, content, calls, logprobs = self._apply(update)
            delta = DeltaMessage(reasoning_content=reasoning or None, content=content or None,
                                 tool_calls=[_delta_tool_call(c) for c in calls] or None)
            want_logprobs = self.prepared.params.logprobs is not None
            if reasoning or content or calls or want_logprobs:
                if not (reasoning or content or calls):
                    delta = DeltaMessage(content="")
                yield self._chunk([ChatChunkChoice(
                    index=update.index, delta=delta,
                    logprobs=ChoiceLogprobs(content=logprobs) if want_logprobs else None)])
            if update.finished:
                yield self._chunk([ChatChunkChoice(index=update.index, delta=DeltaMessage(),
                                                   finish_reason=choice.finish_reason)])
        if self.prepared.include_usage:
            yield self._chunk([], self._usage())
        self.ctx.log_output(self.prepared.request_id, ["".join(c.content) for c in self.choices])


def _delta_tool_call(call: ToolCallDelta) -> DeltaToolCall:
    return DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                         function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
