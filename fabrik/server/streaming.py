"""Server-sent events: one ``data: {json}`` event per chunk, then ``data: [DONE]``, as OpenAI streams."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from fabrik.server.engine_client import EngineError, RequestAborted
from fabrik.server.errors import APIError, log_unexpected

logger = logging.getLogger("fabrik.server")


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
    except Exception as exc:  # a bug: end the stream as OpenAI would, without the exception's text in the log
        log_unexpected(logger, exc, "(stream)")
        yield sse_error(APIError(500, f"internal error ({type(exc).__name__})", "internal_server_error",
                                 should_retry=False))
        yield sse_done()
    finally:
        if not finished:
            abort()
        await events.aclose()  # now, not whenever the event loop finalizes it
