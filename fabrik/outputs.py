"""What the engine hands back: per-step sequence updates and whole request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from fabrik.sampling.logprobs import TokenLogprob


@dataclass(frozen=True)
class SequenceUpdate:
    """What one sequence (one of a request's ``n``) produced in one engine step."""

    request_id: str
    """The id the request was added with."""
    index: int
    """Which of the request's ``n`` sequences this is."""
    new_token_ids: tuple[int, ...]
    new_text: str
    """Text that became final this step (held back while it could start a stop string)."""
    new_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    """None while running; then "stop", "length" or "abort"."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence, if one did."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """Set once, on the update that carries the first output token, when asked for."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's shape)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its ``n`` generated sequences (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def apply(self, update: SequenceUpdate) -> None:
        """Fold one step's update into this output."""
        out = self.outputs[update.index]
        out.text += update.new_text
        out.token_ids.extend(update.new_token_ids)
        if out.logprobs is not None:
            out.logprobs.extend(update.new_logprobs)
        if update.finish_reason is not None:
            out.finish_reason = update.finish_reason
            out.stop_reason = update.stop_reason
        if update.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = list(update.prompt_logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, update.num_cached_tokens)
