"""The engine thread and the HTTP side's handle on it.

The engine is not thread-safe, so one dedicated thread owns it. HTTP handlers (on the asyncio loop) never touch it;
they send commands and read per-request queues::

    handler --add/abort--> command queue (FIFO) --> engine thread: handle commands, engine.step()
    handler <--(request_id, updates) or error-- asyncio.Queue <--call_soon_threadsafe-- engine thread

Commands are handled between steps, so an abort takes effect before the next step (its KV blocks are freed at
once), and an ``add`` is validated by the engine itself: its ValueError travels back to the handler that sent it.
When a step raises, every request in the engine gets the error (the batch is lost) and a one-token probe decides
whether the engine can still generate; if it cannot, /health turns 503 and new requests are refused.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fabrik.engine.llm_engine import LLMEngine
from fabrik.outputs import SequenceUpdate
from fabrik.sampling.params import SamplingParams
from fabrik.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

_PROBE_ID = "fabrik-health-probe"


class EngineError(RuntimeError):
    """The engine failed while running a request (not the request's fault as far as we can tell)."""


class EngineDeadError(EngineError):
    """The engine can no longer generate; the server needs a restart."""


class RequestAborted(RuntimeError):
    """The request was aborted (its client went away) before it finished."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output: asyncio.Queue
    accepted: asyncio.Future
    arrival: float
    group: str | None


@dataclass
class _Abort:
    request_id: str


_STOP = object()


@dataclass
class _Tracked:
    """Engine-thread state of one admitted request (for routing its outputs and for the latency metrics)."""

    output: asyncio.Queue
    arrival: float
    unfinished: int
    first_token_at: float | None = None
    last_token_at: float = 0.0


class EngineClient:
    """Runs an ``LLMEngine`` in its own thread and lets asyncio handlers submit, stream and abort requests.

    Args:
        engine: The engine; from now on only the engine thread may touch it.
        metrics: Where the engine thread records latencies, token counts and gauges.
        max_waiting_requests: ``check_capacity`` raises QueueFullError when this many sequences (prompts x n)
            have not started yet.
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_requests: int) -> None:
        self._engine = engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._not_started: dict[str, int] = {}
        """Loop side: requests that have not produced a token yet, and their sequences (the 429 limit counts these)."""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._dead_reason: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; outputs are delivered on ``loop``."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fabrik-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def healthy(self) -> bool:
        """True when the engine thread runs and its last probe generated a token."""
        return (self._thread is not None and self._thread.is_alive() and self._ready.is_set()
                and self._dead_reason is None)

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def num_not_started(self) -> int:
        """Sequences (prompts x n) accepted that have not produced a token yet."""
        return sum(self._not_started.values())

    def _started(self, request_id: str) -> None:
        self._not_started.pop(request_id, None)

    # -- the HTTP side (call on the event loop) --------------------------------------------
    def check_capacity(self, num_sequences: int) -> None:
        """Raise QueueFullError if ``num_sequences`` more would exceed the waiting limit; count it in the metrics."""
        if self.num_not_started + num_sequences > self.max_waiting_requests:
            with self.metrics.lock:
                self.metrics.requests_rejected += 1
            raise QueueFullError(f"{self.num_not_started} sequences are already waiting (the limit is "
                                 f"{self.max_waiting_requests}); retry later")

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, output: asyncio.Queue,
               arrival: float, group: str | None = None) -> asyncio.Future:
        """Send a request to the engine thread now (its sequences count as waiting at once); see ``add``.

        Returns:
            A future that resolves when the engine accepted the request, or fails with its error. A caller that
            stops waiting for it must ``abort`` the request.
        """
        if self._dead_reason is not None:
            raise EngineDeadError(f"the engine is not healthy: {self._dead_reason}")
        accepted = asyncio.get_running_loop().create_future()
        self._not_started[request_id] = params.n
        self._commands.put(_Add(request_id, prompt_ids, params, output, accepted, arrival, group))
        return accepted

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, output: asyncio.Queue,
                  arrival: float) -> None:
        """Submit a request; returns once the engine accepted it. Its outputs then arrive in ``output``.

        Items put in ``output`` are ``(request_id, [SequenceUpdate, ...])``, or ``(request_id, error)`` with an
        EngineError or RequestAborted; ``stream`` reads them.

        Raises:
            ValueError: the engine refused the request (bad params, too long, ...): a client error.
            EngineDeadError: the engine cannot generate any more.
        """
        accepted = self.submit(request_id, prompt_ids, params, output, arrival)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its KV blocks are freed before the next step."""
        self._started(request_id)
        self._commands.put(_Abort(request_id))

    async def stream(self, output: asyncio.Queue, request_ids: Sequence[str],
                     num_seqs: int) -> AsyncIterator[tuple[str, list[SequenceUpdate]]]:
        """Yield ``(request_id, updates)`` from ``output`` until every sequence of ``request_ids`` finished.

        Args:
            output: The queue the requests were added with.
            request_ids: The requests that share it.
            num_seqs: Sequences per request (its ``n``).

        Raises:
            EngineError: the engine failed while running one of them.
            RequestAborted: one of them was aborted (its client went away).
        """
        unfinished = {rid: num_seqs for rid in request_ids}
        while unfinished:
            request_id, item = await output.get()
            if isinstance(item, BaseException):
                raise item
            for update in item:
                if update.finished:
                    unfinished[request_id] -= 1
            if unfinished[request_id] <= 0:
                del unfinished[request_id]
            yield request_id, item

    # -- loop-side callbacks (scheduled by the engine thread) ------------------------------
    def _deliver(self, batch: list[tuple[asyncio.Queue, str, object]]) -> None:
        for output, request_id, item in batch:
            self._started(request_id)
            output.put_nowait((request_id, item))

    def _settle(self, future: asyncio.Future, error: BaseException | None, request_id: str) -> None:
        if error is not None:
            self._started(request_id)
        if future.done():  # the handler was cancelled (client gone): it sends an abort itself
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _call_on_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed during shutdown: nobody is listening any more
            pass

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._probe()
        except Exception as exc:  # the engine cannot generate at all: stay up, report it on /health
            logger.exception("engine warm-up failed")
            self._dead_reason = f"warm-up failed: {type(exc).__name__}: {exc}"
        self._ready.set()
        try:
            self._serve()
        except Exception as exc:
            # NOTE: a bug outside engine.step (which _step guards) must not leave handlers waiting forever:
            # fail what is in flight, then keep answering commands, refusing every new request.
            logger.exception("the engine thread failed")
            self._dead_reason = f"engine thread failed: {type(exc).__name__}: {exc}"
            self._fail_all(EngineDeadError(f"the engine failed: {type(exc).__name__}"), abort=False)
            self._serve()

    def _serve(self) -> None:
        """Handle commands and step the engine until told to stop."""
        while True:
            block = self._dead_reason is not None or not self._engine.has_unfinished()
            for command in self._drain(block):
                if command is _STOP:
                    return
                self._handle(command)
            if self._dead_reason is None and self._engine.has_unfinished():
                self._step()
                self._update_gauges()

    def _drain(self, block: bool) -> list:
        commands = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            tracked = self._tracked.pop(command.request_id, None)
            if tracked is not None:
                self._engine.abort(command.request_id)
                with self.metrics.lock:
                    self.metrics.requests_aborted += 1
                aborted = RequestAborted(f"request {command.request_id} was aborted")
                self._call_on_loop(self._deliver, [(tracked.output, command.request_id, aborted)])
            self._update_gauges()
            return
        error: BaseException | None = None
        if self._dead_reason is not None:
            error = EngineDeadError(f"the engine is not healthy: {self._dead_reason}")
        else:
            try:
                self._engine.add_request(command.request_id, command.prompt_ids, command.params, command.group)
            except ValueError as exc:
                error = exc
            except Exception as exc:
                logger.exception("add_request failed")
                error = EngineError(f"the engine could not add the request: {type(exc).__name__}")
        if error is None:
            self._tracked[command.request_id] = _Tracked(command.output, command.arrival, command.params.n)
            with self.metrics.lock:
                self.metrics.prompt_tokens += len(command.prompt_ids)
        self._call_on_loop(self._settle, command.accepted, error, command.request_id)

    def _step(self) -> None:
        try:
            updates = self._engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the %d requests in the engine", len(self._tracked))
            failed = self._fail_all(EngineError(f"the engine failed while generating: {type(exc).__name__}: {exc}"),
                                    deliver=False)
            # NOTE: probe before telling the clients, so that /health is already right when they see the error.
            try:
                self._probe()
            except Exception as probe_exc:
                logger.exception("engine health probe failed after a step error")
                self._dead_reason = f"{type(probe_exc).__name__}: {probe_exc}"
            if failed:
                self._call_on_loop(self._deliver, failed)
            return
        now = time.monotonic()
        by_request: dict[str, list[SequenceUpdate]] = {}
        for update in updates:
            by_request.setdefault(update.request_id, []).append(update)
        batch: list[tuple[asyncio.Queue, str, object]] = []
        with self.metrics.lock:
            m = self.metrics
            for request_id, request_updates in by_request.items():
                tracked = self._tracked.get(request_id)
                if tracked is None:
                    continue
                m.generation_tokens += sum(len(u.new_token_ids) for u in request_updates)
                if tracked.first_token_at is None:
                    tracked.first_token_at = now
                    m.time_to_first_token.observe(now - tracked.arrival)
                else:
                    m.time_per_output_token.observe(now - tracked.last_token_at)
                tracked.last_token_at = now
                for update in request_updates:
                    if update.finished:
                        tracked.unfinished -= 1
                        if tracked.unfinished == 0:
                            del self._tracked[request_id]
                            m.e2e_request_latency.observe(now - tracked.arrival)
                            reason = update.finish_reason or "stop"
                            m.requests_finished[reason] = m.requests_finished.get(reason, 0) + 1
                batch.append((tracked.output, request_id, request_updates))
        if batch:
            self._call_on_loop(self._deliver, batch)

    def _fail_all(self, error: EngineError, abort: bool = True,
                  deliver: bool = True) -> list[tuple[asyncio.Queue, str, object]]:
        """Fail every request in the engine with ``error`` (aborting them, if ``abort``).

        Returns:
            The ``(queue, request id, error)`` items; delivered to the handlers now if ``deliver``, else the caller's.
        """
        batch: list[tuple[asyncio.Queue, str, object]] = []
        for request_id, tracked in self._tracked.items():
            if abort:
                try:
                    self._engine.abort(request_id)
                except Exception:
                    logger.exception("abort of %s failed after an engine error", request_id)
            batch.append((tracked.output, request_id, error))
        with self.metrics.lock:
            self.metrics.engine_errors += 1
            self.metrics.requests_aborted += len(self._tracked)
        self._tracked.clear()
        if batch and deliver:
            self._call_on_loop(self._deliver, batch)
        return batch

    def _probe(self) -> None:
        """Generate one token of a one-token prompt, alone: proof that the engine can generate."""
        if self._engine.has_unfinished():
            raise EngineError("the engine still holds requests after they were all aborted")
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self._engine.add_request(_PROBE_ID, [0], params)
        for _ in range(8):
            if not self._engine.has_unfinished():
                break
            self._engine.step()
        if self._engine.has_unfinished():
            self._engine.abort(_PROBE_ID)
            raise EngineError("the probe request did not finish")

    def _update_gauges(self) -> None:
        scheduler, blocks = self._engine.scheduler, self._engine.block_manager
        stats = blocks.stats
        with self.metrics.lock:
            self.metrics.num_running = scheduler.num_running
            self.metrics.num_waiting = scheduler.num_waiting
            self.metrics.kv_cache_usage = blocks.usage
            self.metrics.prefix_cache_queries = stats.queried_tokens
            self.metrics.prefix_cache_hits = stats.hit_tokens
            self.metrics.num_preemptions = scheduler.num_preemptions
