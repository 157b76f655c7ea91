"""The wire format: pydantic models of every request and response, after OpenAI's API (and vLLM's extras).

Requests are parsed strictly (``"5"`` is not an int, ``true`` is not a number), so a wrong type is a 400 naming the
field rather than a silent coercion. A number with no fraction is an integer (``2.0`` is 2): JSON has one number type,
and JSON Schema (OpenAI's spec) counts ``2.0`` as an integer. An explicit ``null`` means "the default", as OpenAI's
spec makes nearly every optional field nullable. Unknown fields are ignored, as OpenAI clients send many we have no
use for; OpenAI fields we know but cannot honour are declared here and refused by the handlers
(``server/unsupported.py``).
Responses leave out optional fields that are None where OpenAI leaves them out (a stream delta has only what
changed), and keep the nulls OpenAI sends (``content: null`` beside tool calls, ``finish_reason: null``).
"""

from __future__ import annotations

import time
import types
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer, model_validator


def _allows_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_allows_none(arg) for arg in get_args(annotation))
    return False


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
"""A request integer: an int, or a float with no fraction (``2.0``); never a string, a bool or ``2.5``."""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=True)

    _not_nullable: ClassVar[frozenset[str]] = frozenset()
    """Fields whose type has no None: an explicit null for them is dropped, so their default applies."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._not_nullable = frozenset(name for name, info in cls.model_fields.items()
                                      if not _allows_none(info.annotation))

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(name, 0) is None for name in cls._not_nullable):
            return {k: v for k, v in data.items() if not (v is None and k in cls._not_nullable)}
        return data


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sparse(_Response):
    """A response object whose None fields are left out of the JSON (except those named in ``_keep_null``)."""

    _keep_null: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self._keep_null}


# -- requests ---------------------------------------------------------------------------------------------------
class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request (its ``choices`` empty)."""


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    """One message of a conversation, as the client sends it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class SamplingRequest(_Request):
    """Fields shared by chat and completions: the model and how to sample (OpenAI's and vLLM's extras)."""

    model: str | None = None
    """The served model id; None means the one model served."""
    n: Int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: Int = 0
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    """Wins over ``max_tokens`` (which OpenAI deprecated for chat)."""
    logprobs: bool = False
    top_logprobs: Int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = None
    """Never used: present only so that a request trying to replace the template is refused, not ignored."""
    # Labels and hints: accepted, not acted on.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI fields that only some values of are honoured (server/unsupported.py refuses the others by name).
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    verbosity: str | None = None
    reasoning_effort: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[Int] | list[list[Int]] | None = None
    """None (or left out) is OpenAI's default prompt, ``<|endoftext|>``."""
    max_tokens: Int = 16
    echo: bool = False
    logprobs: Int | None = None
    best_of: Int | None = None
    suffix: str | None = None


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's shape): either ``prompt`` or ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    """Default: True for a prompt, False for messages (the chat template writes them)."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[Int]


# -- responses --------------------------------------------------------------------------------------------------
class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fabrik"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(_Sparse):
    _keep_null: ClassVar[frozenset[str]] = frozenset({"content", "refusal"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    """Always null: the model's refusals are ordinary content here."""
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Sparse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    """Only on the last chunk, and only when stream_options.include_usage asked for it."""


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Sparse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    """Always set on a whole response; on a stream only the last chunk has it (with include_usage)."""


class TokenizeResponse(_Sparse):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str
