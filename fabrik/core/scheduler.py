"""The scheduler: which requests run this step, and how many of their tokens.

Pure Python (no torch). One engine step is::

    schedule() -> SchedulerOutput -> model runner -> sampled tokens -> update() -> finished

Each step has a token budget. Running requests go first (oldest first), each asking for
``num_tokens - num_computed_tokens`` tokens: 1 for a decode, the rest of a prompt for a
chunked prefill. Waiting requests are admitted next, oldest first, after their prefix-cache
hits, while budget, free blocks and the cap on running sequences allow; a prompt larger
than what is left of the budget is cut into chunks over several steps. When a running
request cannot get a block, the newest running request is preempted: its blocks are freed
and it goes back to the head of the queue, to be recomputed later from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fabrik.config import SchedulerConfig
from fabrik.core.block_manager import BlockManager
from fabrik.core.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens of one request whose K/V the model computes this step."""

    request_id: str
    token_ids: tuple[int, ...]
    """Tokens to feed the model; their positions start at ``start_position``."""
    start_position: int
    """Tokens already in the cache (the request's ``num_computed_tokens``)."""
    block_ids: tuple[int, ...]
    """The request's whole block table after this step's allocation."""
    sample: bool
    """True when the chunk reaches the request's last token, so a new token is sampled."""


@dataclass(frozen=True)
class SchedulerOutput:
    """What to run this step."""

    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...] = ()
    """Requests preempted this step (they will be recomputed)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and recompute-preemption."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request at once and free its blocks; None if it is unknown or done."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request with the given finished status (e.g. a stop string matched)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = status
        return request

    # -- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not bm.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                i += 1

        # NOTE: no admissions in a step that had to preempt: memory is short already.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            computed_blocks, num_cached = (bm.get_computed_blocks(request)
                                           if request.use_prefix_cache else ([], 0))
            num_new = min(request.num_tokens - num_cached, budget)
            if not bm.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                bm.record_prefix_query(request.num_prompt_tokens, num_cached)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._chunk(request, num_new))
            budget -= num_new

        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=tuple(request.all_token_ids[start:start + num_new]),
            start_position=start,
            block_ids=tuple(self.block_manager.block_ids(request.request_id)),
            sample=start + num_new == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests; append sampled tokens; finish those that stop.

        Returns the requests that got a new token this step, finished ones included
        (their ``status`` says why they finished; their blocks are already freed).
        """
        advanced: list[Request] = []
        for chunk in output.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(chunk.token_ids)
            self.block_manager.cache_full_blocks(request)
            if not chunk.sample:
                continue
            request.append_output_token(sampled[chunk.request_id])
            advanced.append(request)
            status = request.check_stop(self.config.max_model_len)
            if status is not None:
                self.finish(request.request_id, status)
        return advanced
