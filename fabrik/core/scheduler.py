"""The scheduler: which requests run this step, and how many of their tokens.

Pure Python (no torch). One engine step is::

    schedule() -> SchedulerOutput -> model runner -> sampled tokens -> update() -> finished

Each step has a token budget. Running requests go first (oldest first), each asking for
``num_tokens - num_computed_tokens`` tokens: 1 for a decode, the rest of a prompt for a
chunked prefill. Waiting requests are admitted next, after their prefix-cache hits, while
budget, free blocks and the cap on running sequences allow: the oldest of the client request
(``Request.group``: its prompts x n sequences) that has the fewest sequences running, so one
big request shares the engine with the small ones that come after it. A prompt larger than
what is left of the budget is cut into chunks over several steps; prompt positions whose
logprobs are computed have a budget of their own per step (each costs an LM head row).

Preemption frees a request's blocks and puts it back at the head of the queue, to be
recomputed later from its tokens: the newest running request when a running request cannot
get a block, and, when a waiting group has nothing running and no room, the newest sequence
of the group running the most.
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
        logprob_budget = self.config.max_prompt_logprob_tokens
        bm = self.block_manager
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = self._preempt_for_starved_group()
        short_of_memory = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._limit_prompt_logprobs(
                request, min(request.num_tokens - request.num_computed_tokens, budget), logprob_budget)
            if num_new == 0:  # out of this step's prompt-logprob budget: it goes on next step
                i += 1
                continue
            while not bm.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                short_of_memory = True
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                logprob_budget -= self._prompt_logprob_positions(request, num_new)
                i += 1

        # NOTE: no admissions in a step that had to preempt for memory: memory is short already.
        running_per_group = self._running_per_group()
        while (not short_of_memory and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            index = self._next_waiting(running_per_group)
            request = self.waiting[index]
            computed_blocks, num_cached = (bm.get_computed_blocks(request)
                                           if request.use_prefix_cache else ([], 0))
            num_new = self._limit_prompt_logprobs(request, min(request.num_tokens - num_cached, budget),
                                                  logprob_budget, start=num_cached)
            if num_new == 0 or not bm.allocate_slots(request, num_new, computed_blocks):
                break
            del self.waiting[index]
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                bm.record_prefix_query(request.num_prompt_tokens, num_cached)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            running_per_group[request.group] = running_per_group.get(request.group, 0) + 1
            chunks.append(self._chunk(request, num_new))
            budget -= num_new
            logprob_budget -= self._prompt_logprob_positions(request, num_new)

        return SchedulerOutput(tuple(chunks), tuple(preempted))

    # -- fairness between client requests ------------------------------------------------
    def _running_per_group(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for request in self.running:
            counts[request.group] = counts.get(request.group, 0) + 1
        return counts

    def _next_waiting(self, running_per_group: dict[str, int]) -> int:
        """Index of the waiting request to admit next: the oldest of the group with the fewest running sequences.

        So one client request of many sequences (prompts x n) cannot hold every slot while others wait.
        """
        best, best_running = 0, None
        for index, request in enumerate(self.waiting):
            running = running_per_group.get(request.group, 0)
            if best_running is None or running < best_running:
                best, best_running = index, running
                if running == 0:
                    break
        return best

    def _preempt_for_starved_group(self) -> list[str]:
        """When the next waiting request's group has nothing running and there is no room for it (no free slot, or
        too few free blocks for its first chunk), preempt the newest sequences of the group running the most, as long
        as that group runs at least two: a starved client waits for one step, not for a whole batch to finish."""
        if not self.waiting:
            return []
        counts = self._running_per_group()
        candidate = self.waiting[self._next_waiting(counts)]
        if counts.get(candidate.group, 0) > 0:
            return []
        bm = self.block_manager
        first_chunk = min(candidate.num_tokens, self.config.max_num_batched_tokens)
        preempted: list[str] = []
        while (len(self.running) >= self.config.max_num_seqs
               or bm.num_free_blocks < bm.blocks_needed(first_chunk)):
            biggest = max(counts, key=lambda group: counts[group], default=None)
            if biggest is None or counts[biggest] < 2:
                break
            victim = next(r for r in reversed(self.running) if r.group == biggest)
            self.running.remove(victim)
            self._preempt(victim)
            counts[biggest] -= 1
            preempted.append(victim.request_id)
        return preempted

    # -- prompt logprobs -----------------------------------------------------------------
    @staticmethod
    def _prompt_logprob_positions(request: Request, num_new: int, start: int | None = None) -> int:
        """Positions of a chunk whose logits predict a prompt token (those prompt logprobs are computed for)."""
        if not request.computes_prompt_logprobs:
            return 0
        start = request.num_computed_tokens if start is None else start
        return max(0, min(start + num_new, request.num_prompt_tokens - 1) - start)

    def _limit_prompt_logprobs(self, request: Request, num_new: int, logprob_budget: int,
                               start: int | None = None) -> int:
        """``num_new``, cut so the chunk's prompt-logprob positions fit what is left of the step's budget."""
        if self._prompt_logprob_positions(request, num_new, start) <= max(logprob_budget, 0):
            return num_new
        return max(logprob_budget, 0)

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
