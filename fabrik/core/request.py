"""A request as the scheduling core sees it: token ids, progress, and when to stop.

Pure Python (no torch): the scheduler and the block manager are tested on exact numbers.

Progress is counted in tokens, not phases (as in vLLM v1): a request holds
``all_token_ids`` (prompt + generated) and ``num_computed_tokens`` (how many of them
already have K/V in the cache). Each step the scheduler lets ``num_computed_tokens``
catch up with ``num_tokens`` under a token budget, so a whole prefill, a chunk of a
prefill, a prefill after a prefix-cache hit, a recompute after preemption and a decode
step are one and the same thing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish reason ("stop", "length", "abort"), None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(frozen=True)
class StoppingCriteria:
    """The token-level rules that end a request (stop strings are the detokenizer's job)."""

    max_tokens: int
    """Generate at most this many tokens (already capped by the context length)."""
    min_tokens: int = 0
    """Ignore eos and stop token ids until this many tokens were generated."""
    eos_token_ids: frozenset[int] = frozenset()
    """End-of-sequence ids of the model; ignored when ``ignore_eos``."""
    stop_token_ids: frozenset[int] = frozenset()
    """Extra ids that end the request (finish reason "stop")."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= 1")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be >= 0")


@dataclass(eq=False)
class Request:
    """One sequence being generated. Mutable: the scheduler advances it step by step."""

    request_id: str
    prompt_token_ids: list[int]
    stopping: StoppingCriteria
    sampling_params: Any = None
    """Opaque to the core; the model runner reads it."""
    use_prefix_cache: bool = True
    """False when every prompt position must be computed (e.g. prompt logprobs)."""
    group: str = ""
    """The client request this sequence belongs to (its prompts x n share it), for fair admission; "": its own id."""
    computes_prompt_logprobs: bool = False
    """Its prompt chunks compute logits at every position: they count against the step's prompt-logprob budget."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache when first scheduled (-1: not yet scheduled)."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of this request's full blocks, computed once and reused."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt must have at least one token")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.group = self.group or self.request_id
        self.all_token_ids: list[int] = self.prompt_token_ids + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last generated token implies, or None to go on."""
        crit = self.stopping
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= crit.min_tokens:
            if not crit.ignore_eos and last in crit.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in crit.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= crit.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
