"""Request preparation off the event loop: chat templates, tokenizing and detokenizing run on a few threads.

Rendering and tokenizing a big request takes from milliseconds to seconds; on the event loop it would stall every
client, /health included. The tokenizer releases the GIL while it encodes, and templates are Python that yields the
GIL every few milliseconds, so the loop keeps answering while a worker prepares::

    handler --await run(prepare, ...)--> [pending <= max_pending] --> worker thread --> result or APIError
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fabrik.server.engine_client import QueueFullError

T = TypeVar("T")


class Preparer:
    """A bounded pool of preparation threads.

    Args:
        workers: Threads (2 suits a 2-core machine: the engine thread wants the cores too).
        max_pending: Most preparations running or waiting for a thread; one more raises QueueFullError (a 429).
    """

    def __init__(self, workers: int, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fabrik-prepare")
        self._max_pending = max_pending
        self._pending = 0

    @property
    def num_pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a worker thread; its exceptions (APIError included) are raised here."""
        if self._pending >= self._max_pending:
            raise QueueFullError(f"{self._pending} requests are already being prepared (the limit is "
                                 f"{self._max_pending}); retry later")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
