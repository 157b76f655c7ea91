"""What the server logs about its connections: one access line per request, and errors at a bounded rate.

Neither ever holds a client's text beyond the request's method and path: no query string (keys and tokens travel
there), no headers, no body.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("fabrik.server.access")

ACCESS_PATH_CHARS = 200
"""Longest path an access line shows; a longer one is cut and marked with ``...``."""
_METHOD_CHARS = 16
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RateLimitedLog:
    """Logs a message at most once per ``interval`` seconds; the next line logged says how many were left out.

    Args:
        logger: Where the lines go.
        level: Their level.
        interval: Least time between two lines, in seconds.
        clock: The time source (monotonic seconds).
    """

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.clock = clock
        self._last = -float("inf")
        self._left_out = 0

    def __call__(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._last < self.interval:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more like it since the last such line)"
        self.logger.log(self.level, message, *args)
        self._last = now
        self._left_out = 0


class AcceptErrorHandler:
    """An event loop exception handler that logs failed accepts (no descriptors or memory left) at a bounded rate.

    NOTE: asyncio logs every failed accept with its traceback and, on Linux, retries up to ``backlog`` times in the
    same tick: with the descriptors used up that made tens of megabytes of log a minute. The connection cap
    (transport.py) keeps the descriptors from running out; this keeps the log small if they do anyway. Every other
    error goes to the loop's default handler.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = RateLimitedLog(logger, logging.ERROR, interval)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES
                and "accept" in str(context.get("message", ""))):
            self._log("accepting a connection failed (%s); new connections wait in the listen queue meanwhile",
                      exc.strerror)
            return
        loop.default_exception_handler(context)


class AccessLogMiddleware:
    """Logs one line per HTTP request once it is answered: method, path without the query string, status, seconds.

    The path is the raw one (percent-escapes kept, so no control characters reach the log), cut to
    ``ACCESS_PATH_CHARS``. A request answered by nobody (the client left first) shows ``-`` as its status.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger = access_logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.logger.info("%s %s %s %.3fs", _shorten(scope["method"], _METHOD_CHARS), logged_path(scope),
                             status if status is not None else "-", time.monotonic() - started)


def logged_path(scope: Scope) -> str:
    """The request's path as the access log shows it: raw, without the query string, at most ACCESS_PATH_CHARS."""
    raw = scope.get("raw_path")
    path = raw.decode("ascii", "backslashreplace") if raw else scope["path"].encode("unicode_escape").decode()
    return _shorten(path.partition("?")[0], ACCESS_PATH_CHARS)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
