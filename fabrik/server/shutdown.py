"""Graceful shutdown: on SIGTERM or SIGINT stop accepting, let running requests finish up to the drain timeout, then
end the rest cleanly and exit 0.

::

    signal -> listening sockets closed, idle connections closed, busy ones close after their response
           -> wait up to drain_timeout for every response to end
           -> Drain.expire(): each stream still running gets an error event and ``data: [DONE]``, each whole
              response a 503; requests still being received get a 503 (transport.py)
           -> wait up to _ANSWER_SECONDS for those to be sent; close what is left
           -> the app's lifespan ends (the engine thread stops); exit status 0

A second signal ends the drain at once. NOTE: uvicorn alone cancels whatever still runs when its graceful timeout
passes: streams were cut mid-chunk, with no error and no [DONE], and every cancelled task logged a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from types import FrameType
from typing import TypeVar

import uvicorn

from fabrik.server.common import first_or_cancel
from fabrik.server.errors import APIError
from fabrik.server.logs import AcceptErrorHandler
from fabrik.server.streaming import sse_done, sse_error

logger = logging.getLogger("fabrik.server.shutdown")

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Time for the error events and 503s of the expired requests to be written, before their connections are closed.
_ANSWER_SECONDS = 3.0
# Time for the tasks of connections closed by force to notice, before they are cancelled.
_CLOSE_SECONDS = 1.0


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry the request", "service_unavailable")


class Drain:
    """The requests the app is answering, so that a shutdown can end those still running when its drain timeout
    passes: streams with an OpenAI-shaped error event and ``data: [DONE]``, whole responses with a 503.

    Call its methods on the event loop.
    """

    def __init__(self) -> None:
        self._expired = asyncio.Event()
        self._aborts: set[Callable[[], None]] = set()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def expire(self) -> None:
        """End every running request now (and any that comes later, as soon as it starts)."""
        self._expired.set()
        for abort in list(self._aborts):
            abort()

    async def stream(self, events: AsyncIterator[str], abort: Callable[[], None]) -> AsyncIterator[str]:
        """``events``; when the drain expires, the request is aborted and the stream, cut between two events, ends
        with the shutdown error and [DONE] (unless it had already sent its own [DONE])."""
        done = sse_done()
        ended = False
        self._aborts.add(abort)
        try:
            if self.expired:
                abort()
            async for event in events:
                ended = event == done
                yield event
        finally:
            self._aborts.discard(abort)
        if self.expired and not ended:
            yield sse_error(shutting_down())
            yield done

    async def response(self, work: Awaitable[T]) -> T:
        """``await work``, unless the drain expires first: then ``work`` is cancelled (its cleanup aborts its requests)
        and the shutdown error is raised (a 503)."""
        finished, result = await first_or_cancel(work, self._expired.wait())
        if finished:
            return result  # type: ignore[return-value]
        raise shutting_down()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with fabrik's shutdown (module docstring) and accept errors logged at a bounded rate.

    Args:
        config: uvicorn's configuration.
        drain: The app's Drain.
        drain_timeout: Seconds running requests may take to finish after the signal.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = drain_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorHandler(logger))
        await super().startup(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # NOTE: uvicorn raises the signal again once it has shut down, so the process dies of it (status 143 for
        # SIGTERM); a server that shut down as asked exits 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop draining
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        logger.info("shutting down: no new connections; %d requests running may take %g s to finish",
                    len(self.server_state.tasks), self.drain_timeout)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        await self._end_requests()
        await self.lifespan.shutdown()

    async def _end_requests(self) -> None:
        """Wait for the running requests up to the drain timeout, then end the rest: cleanly, else by force."""
        state = self.server_state
        if await self._settled(self.drain_timeout, stop_on_force=True):
            return
        logger.warning("drain timeout: ending the %d requests still running", len(state.tasks))
        self.drain.expire()
        for connection in list(state.connections):
            connection.expire()
        if await self._settled(_ANSWER_SECONDS):
            return
        for connection in list(state.connections):
            connection.transport.close()
        if await self._settled(_CLOSE_SECONDS):
            return
        logger.error("cancelling %d requests that did not end", len(state.tasks))
        for task in list(state.tasks):
            task.cancel()

    async def _settled(self, timeout: float, stop_on_force: bool = False) -> bool:
        """Wait until no connection is open and no request runs; False if ``timeout`` passed first."""
        state = self.server_state
        deadline = time.monotonic() + timeout
        while state.connections or state.tasks:
            if time.monotonic() >= deadline or (stop_on_force and self.force_exit):
                return False
            await asyncio.sleep(0.05)
        return True
