"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

NOTE: client mistakes must never be 5xx: the openai client retries 5xx (and 429), so a bad request answered with a
500 would be sent again and again. Every deterministic failure also carries ``x-should-retry: false``, which the
openai client honours over its status-based rule.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from fabrik.server.protocol import ErrorBody, ErrorResponse

# Fields a ValueError message may start with (SamplingParams and the engine name the field first), mapped to
# the request parameter the client sent.
_PARAM_OF_FIELD = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "max_tokens": "max_tokens", "min_tokens": "min_tokens", "ignore_eos": "ignore_eos", "logprobs": "logprobs",
    "prompt_logprobs": "logprobs", "logit_bias": "logit_bias", "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output", "prompt": "prompt", "stop strings": "stop",
    "a sequence": "max_tokens", "the prompt": "prompt",
}


class APIError(Exception):
    """An error answered to the client as is.

    Args:
        status: HTTP status.
        message: What went wrong, for a human; names the offending value.
        type: OpenAI error type, e.g. ``invalid_request_error``.
        param: The request parameter at fault, or None.
        code: Machine-readable code, e.g. ``context_length_exceeded``, or None.
        headers: Extra response headers (Retry-After, ...).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 should_retry: bool | None = None) -> None:
        # NOTE: a message may quote the request; a lone surrogate in it could not be sent as UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.should_retry = should_retry if should_retry is not None else (status == 429 or status >= 500)
        """False for a failure that the same request would meet again (every 4xx but 429, by default)."""

    @property
    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if not self.should_retry:
            headers["x-should-retry"] = "false"
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers)


def log_unexpected(logger: logging.Logger, exc: BaseException, request_id: str) -> None:
    """Log an unexpected error by its type and the frames it passed, never its message or values (which may hold
    the client's text)."""
    frames = traceback.extract_tb(exc.__traceback__)[-8:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    logger.error("unexpected %s in request %s at %s", type(exc).__name__, request_id, where or "?")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_value_error(exc: ValueError, default_param: str | None = None) -> APIError:
    """A 400 for a ValueError from SamplingParams, the tokenizer or the engine, naming the parameter if it can."""
    message = str(exc)
    return bad_request(message, param_of_message(message, default_param))


def param_of_message(message: str, default: str | None = None) -> str | None:
    """The request parameter a validation message is about: the field it starts with, if known."""
    lowered = message.lower()
    for field_name in sorted(_PARAM_OF_FIELD, key=len, reverse=True):
        if re.match(rf"{re.escape(field_name)}\b", lowered):
            return _PARAM_OF_FIELD[field_name]
    if lowered.startswith("prompt token id"):
        return "prompt"
    return default


# Tags pydantic puts in an error's location for the branch of a union that failed (not request fields).
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})


def _under_body(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return loc if loc[:1] == ("body",) else ("body", *loc)


def _path_of_loc(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    """``("body", "prompt", "list[int]", 0)`` -> ``("prompt", 0)``: pydantic's union-branch tags dropped."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    return tuple(p for p in parts if isinstance(p, int) or (isinstance(p, str) and p.isidentifier()
                                                              and p not in _TYPE_TAGS))


def _format_path(path: tuple[str | int, ...]) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``."""
    param = ""
    for part in path:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    return param or None


def _common_prefix(paths: list[tuple[str | int, ...]]) -> tuple[str | int, ...]:
    prefix = paths[0]
    for path in paths[1:]:
        size = 0
        while size < min(len(prefix), len(path)) and prefix[size] == path[size]:
            size += 1
        prefix = prefix[:size]
    return prefix


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 for a body that is not valid JSON or does not match the request model.

    The deepest errors say most (a union reports one error per branch), so they come first in the message; the
    parameter is the path all errors share, e.g. "messages[0].content" when neither a string nor a list of parts fits.
    """
    # Locations as FastAPI gives them (under "body"), whether the body was parsed by FastAPI or by pydantic directly.
    errors = sorted(({**e, "loc": _under_body(tuple(e.get("loc", ())))} for e in errors),
                    key=lambda e: len(e["loc"]), reverse=True)
    if not errors:
        return bad_request("invalid request body")
    if errors[-1].get("type") == "json_invalid":
        detail = (errors[-1].get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": "))
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    paths = [_path_of_loc(tuple(e.get("loc", ()))) for e in errors]
    messages = [f"{_format_path(path)}: {e.get('msg')}" if path else str(e.get("msg"))
                for path, e in zip(paths[:4], errors[:4])]
    return bad_request("; ".join(dict.fromkeys(messages)), _format_path(_common_prefix(paths)))


def context_length_exceeded(max_model_len: int, num_prompt_tokens: int, max_tokens: int | None,
                            param: str, at_least: bool = False) -> APIError:
    """The 400 OpenAI sends when prompt + completion do not fit the context, with the real numbers.

    ``at_least``: the prompt was refused before all of it was tokenized, so its count is a lower bound.
    """
    if max_tokens is None:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, your {param} "
                   f"resulted in {'at least ' if at_least else ''}{num_prompt_tokens} tokens, leaving no room for "
                   f"the completion. "
                   f"Please reduce the length of the {param}.")
    else:
        message = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                   f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in "
                   f"the completion). Please reduce the length of the {param} or completion.")
    return APIError(400, message, "invalid_request_error", param, "context_length_exceeded")
