"""Server-sent events: one ``data: {json}`` event per chunk, then ``data: [DONE]``, as OpenAI streams."""

from __future__ import annotations

import json

from pydantic import BaseModel

from fabrik.server.errors import APIError


def sse_event(chunk: BaseModel, include_usage: bool = False) -> str:
    """One chunk as an event. With ``include_usage``, chunks without usage carry ``"usage": null``, as OpenAI's do."""
    if not include_usage:
        return f"data: {chunk.model_dump_json()}\n\n"
    data = chunk.model_dump(mode="json")
    data.setdefault("usage", None)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(error: APIError) -> str:
    """An error in the middle of a stream (the status line was already sent); the openai client raises it."""
    return f"data: {error.body.model_dump_json()}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"
