"""Server-sent events: one ``data: {json}`` event per chunk, then ``data: [DONE]``, as OpenAI streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from fabrik.server.engine_client import EngineError, RequestAborted
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


async def guarded(events: AsyncIterator[str], abort: Callable[[], None]) -> AsyncIterator[str]:
    """``events``, then [DONE]. An engine failure mid-stream becomes an OpenAI-shaped error event and [DONE]; a stream
    that does not run to its end (engine failure, client gone) aborts its request, so the KV blocks come back."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
        yield sse_done()
    except EngineError as exc:
        yield sse_error(APIError(500, str(exc), "internal_server_error"))
        yield sse_done()
    except RequestAborted:
        return  # the client is gone
    finally:
        if not finished:
            abort()
        await events.aclose()  # now, not whenever the event loop finalizes it
