"""The HTTP/1.1 connections under the app: a deadline on every phase of a request, and a cap on open connections.

uvicorn (its h11 protocol) closes a connection only when it sits idle after a response (``timeout_keep_alive``),
and checks ``limit_concurrency`` only once a request's head is in: a connection that sends nothing, half a head, or a
body that never ends is held forever, and enough of them use up the process's file descriptors. This protocol gives
each phase before the app has the whole request a deadline::

    new connection, or response sent --idle_timeout---> closed (keep-alive ends; clients reconnect)
    first byte of a request head -----header_timeout--> 408, closed
    head complete --------------------body_timeout----> 408, closed (just closed, if a response was sent)
    body complete: no deadline (the app has the request; a stream may run for minutes)

and answers a connection over the cap at once with a 503 and closes it. The cap is lowered to fit RLIMIT_NOFILE, so
held connections never take the descriptors the server needs to accept, refuse and work.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import http
import logging
import os
import resource
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from fabrik.server.config import ServerConfig
from fabrik.server.errors import APIError
from fabrik.server.logs import AccessLogMiddleware, RateLimitedLog
from fabrik.server.shutdown import shutting_down

logger = logging.getLogger("fabrik.server.transport")

# Descriptors the server opens besides connections: the listening socket, the event loop's own, log files, worker
# pools; counted on top of those open when the cap is computed.
_RESERVED_DESCRIPTORS = 16
_MAX_BACKLOG = 2048


@dataclass(frozen=True)
class ConnectionLimits:
    """The deadlines and the cap every connection is held to (see the module docstring for the phases)."""

    max_connections: int
    """Most open connections; the next ones get a 503 and are closed."""
    header_timeout: float
    """Seconds from a request's first byte to the end of its head."""
    body_timeout: float
    """Seconds from the end of a request's head to the end of its body."""
    retry_after_seconds: int = 1
    """Retry-After of the 503 sent to connections over the cap."""


@dataclass(frozen=True)
class DescriptorBudget:
    """How many connections and how long a listen backlog the file limit allows (``fit_to_file_limit``)."""

    max_connections: int
    """The connection cap: the asked one, or less if the file limit is lower."""
    backlog: int
    """Listen backlog, which is also how many connections asyncio accepts in one go."""
    file_limit: int | None
    """RLIMIT_NOFILE's soft limit (None: unlimited)."""


def fit_to_file_limit(max_connections: int) -> DescriptorBudget:
    """Size the connection cap and the listen backlog to the descriptors this process may still open.

    Half of what is free goes to connections; the other half is headroom for a burst of accepts (up to ``backlog``
    each event-loop tick, held a few ticks while they are refused) and for files the server opens.

    Raises:
        ValueError: the file limit leaves no room for even one connection.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DescriptorBudget(max_connections, _MAX_BACKLOG, None)
    free = soft - _open_descriptors() - _RESERVED_DESCRIPTORS
    if free < 2:
        raise ValueError(f"the file limit (RLIMIT_NOFILE {soft}) leaves no descriptors for connections; "
                         f"raise it (ulimit -n)")
    return DescriptorBudget(min(max_connections, free // 2), max(1, min(_MAX_BACKLOG, free // 8)), soft)


def uvicorn_config(app: ASGIApp, config: ServerConfig, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: this protocol, its limits, and the access log of logs.py."""
    budget = fit_to_file_limit(config.max_connections)
    if budget.max_connections < config.max_connections:
        logger.warning("at most %d open connections, not %d: the process may open %d files (raise ulimit -n for more)",
                       budget.max_connections, config.max_connections, budget.file_limit)
    limits = ConnectionLimits(max_connections=budget.max_connections, header_timeout=config.header_timeout_seconds,
                              body_timeout=config.body_timeout_seconds, retry_after_seconds=config.retry_after_seconds)
    protocol = functools.partial(GuardedH11Protocol, limits=limits, refusals=RateLimitedLog(logger, logging.WARNING))
    # NOTE: uvicorn's own access log prints the query string (where API keys travel) and URLs of any length.
    return uvicorn.Config(AccessLogMiddleware(app), host=config.host, port=config.port, log_level=log_level,
                          http=protocol, ws="none", access_log=False, backlog=budget.backlog, lifespan="on",
                          timeout_keep_alive=config.idle_timeout_seconds)


def _open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def _canned(error: APIError, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response, ``Connection: close``, for the answers the protocol gives without the app."""
    body = error.body.model_dump_json().encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close"),
               *extra_headers]
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    return (head + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("ascii") + body


class _Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with fabrik's deadlines and connection cap; hand uvicorn a ``functools.partial`` of it
    with the keyword arguments bound (its ``http`` option).

    Args:
        config, server_state, app_state, _loop: What uvicorn gives every protocol.
        limits: The deadlines and the cap. The idle deadline is uvicorn's ``timeout_keep_alive``.
        refusals: Where refused connections are logged (shared by all connections, so the log stays bounded).
    """

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: ConnectionLimits,
                 refusals: RateLimitedLog) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.refusals = refusals
        self.refused = False
        self._phase: _Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- the connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.refused = True
            self.transport = transport
            self.refusals("refused a connection: %d are open, the most allowed (--max-connections, lowered to fit "
                          "RLIMIT_NOFILE)", len(self.connections))
            transport.write(_canned(
                APIError(503, f"the server holds the most connections it allows ({self.limits.max_connections}); "
                              "retry later", "service_unavailable"),
                (("retry-after", str(self.limits.retry_after_seconds)),)))
            transport.close()
            return
        super().connection_made(transport)
        # uvicorn arms its keep-alive deadline only after a response: a connection that never sends would stay.
        self._start_idle_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: the error in OpenAI's shape (uvicorn's is plain text), then close."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(self.conn.trailing_data[0]) > limit:  # h11 gave up waiting for the end of the head
            error = APIError(431, f"the request line and headers are larger than {limit} bytes")
        else:
            error = APIError(400, "the request is not valid HTTP/1.1")
        self._answer_and_close(_canned(error))

    def shutdown(self) -> None:
        """The server stops: a request whose head is still arriving gets a 503 now; else uvicorn's (an idle connection
        closes now, a busy one after its response)."""
        if self._phase is _Phase.HEAD:
            self._end_unanswered_request(shutting_down())
        else:
            super().shutdown()

    def expire(self) -> None:
        """The shutdown's drain timeout passed: a request still being received gets a 503 and its connection closes.
        (Requests the app already has are the app's to end: see shutdown.Drain.)"""
        if self._phase is not None and not self.transport.is_closing():
            self._end_unanswered_request(shutting_down())

    # -- deadlines -----------------------------------------------------------------------
    def _follow(self) -> None:
        """Arm the deadline of the phase the connection is now in (each phase's clock starts once)."""
        if self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        working = self.cycle is not None and not self.cycle.response_complete
        if state is h11.SEND_BODY:
            self._set_phase(_Phase.BODY)
        elif state is h11.IDLE and not working and self.conn.trailing_data[0]:
            self._set_phase(_Phase.HEAD)
        else:
            self._set_phase(None)
            if state is h11.IDLE and not working and self.timeout_keep_alive_task is None:
                self._start_idle_deadline()  # nothing but blank lines came: still idle

    def _set_phase(self, phase: _Phase | None) -> None:
        if phase is self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            seconds = self.limits.header_timeout if phase is _Phase.HEAD else self.limits.body_timeout
            self._deadline = self.loop.call_later(seconds, self._timed_out, phase, seconds)

    def _start_idle_deadline(self) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _timed_out(self, phase: _Phase, seconds: float) -> None:
        self._deadline = None
        self._end_unanswered_request(APIError(408, f"the request {phase.value} did not arrive within {seconds:g} s"))

    def _end_unanswered_request(self, error: APIError) -> None:
        """Answer ``error`` and close, or only close if the request was answered already (a 413 while its body came)."""
        cycle = self.cycle if self._phase is _Phase.BODY else None  # while a head arrives, it is the last request's
        if cycle is not None and cycle.response_started:
            self._set_phase(None)
            self.transport.close()
            return
        if cycle is not None:  # the app waits for the body: it now hears a disconnect, and what it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(_canned(error))

    def _answer_and_close(self, response: bytes) -> None:
        self._set_phase(None)
        self.transport.write(response)
        self.transport.close()
