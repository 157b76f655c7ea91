"""SamplingParams: how one request turns logits into tokens, validated when it is built.

The fields and their meanings follow vLLM's ``SamplingParams`` (and the OpenAI API behind it), so a user who knows
either knows this one. Every rule is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the value, so the server can return it to the client as a 400 as it is.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as 0 (greedy): dividing logits by them would overflow to inf.
GREEDY_TEMPERATURE = 1e-5

# The range torch.Generator.manual_seed accepts.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

_LOGIT_BIAS_LIMIT = 100.0


@dataclass
class SamplingParams:
    """Sampling parameters of one request; validated and normalised on construction.

    Example:
        >>> SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, stop="\\n\\n").stop
        ('\\n\\n',)

    Raises:
        ValueError: a field has the wrong type or is out of range; the message names the field and the value.
    """

    n: int = 1
    """Number of completions to generate for the prompt (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (finite, >= 0); below 1e-5 the request is sampled greedily."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p (0, 1]."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times that of the most likely token ([0, 1])."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated ([-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated ([-2, 2])."""
    repetition_penalty: float = 1.0
    """HF-style penalty on tokens of the prompt and output: positive logits divided by it, negative multiplied (> 0)."""
    seed: int | None = None
    """Seed of the request's own random generator, for reproducible sampling; None uses the global RNG."""
    stop: list[str] | str | None = None
    """Strings that end generation when they appear in the output; normalised to a tuple of non-empty strings."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation when sampled (besides EOS); normalised to a tuple."""
    max_tokens: int | None = 16
    """Most tokens to generate (>= 1); None generates up to the context length."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or stop_token_ids may be sampled (>= 0, <= max_tokens)."""
    ignore_eos: bool = False
    """Keep generating after EOS is sampled (for benchmarks)."""
    logprobs: int | None = None
    """Number of most likely alternatives to return with each generated token's log-probability (>= 0)."""
    prompt_logprobs: int | None = None
    """Number of most likely alternatives to return with each prompt token's log-probability (>= 0)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before sampling (values finite, in [-100, 100])."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, minimum=1)
        self.temperature = _float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        self.min_p = _float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.presence_penalty = _float("presence_penalty", self.presence_penalty)
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty)
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, minimum=1)
        self.min_tokens = _int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, minimum=0)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, minimum=0)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)

    @property
    def is_greedy(self) -> bool:
        """True when the temperature is low enough that the request takes the argmax token."""
        return self.temperature < GREEDY_TEMPERATURE

    def replace(self, **changes: Any) -> SamplingParams:
        """Returns a copy with the given fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def check_token_ids(self, vocab_size: int) -> None:
        """Checks that every token id the params name is a row of the model's logits.

        Call it when a request is admitted: an id out of range would otherwise fail inside the sampler, for the
        whole batch.

        Raises:
            ValueError: a stop token id or logit_bias key is >= vocab_size.
        """
        for token_id in self.stop_token_ids or ():
            if token_id >= vocab_size:
                raise ValueError(f"stop_token_ids contains {token_id}, outside the vocabulary of {vocab_size}")
        for token_id in self.logit_bias or {}:
            if token_id >= vocab_size:
                raise ValueError(f"logit_bias names token {token_id}, outside the vocabulary of {vocab_size}")


def _is_int(value: object) -> bool:
    # NOTE: bool is an int subclass; True as a token count is almost always a client bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(name: str, value: object, minimum: int | None = None) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)  # type: ignore[arg-type]
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _stop_strings(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"stop must contain only strings, got {item!r}")
        if not item:
            raise ValueError(f"stop must not contain an empty string, got {stop!r}")
    return tuple(items)


def _token_ids(name: str, ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of ints, got {ids!r}")
    return tuple(_int(name, token_id, minimum=0) for token_id in ids)


def _logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id to bias, got {bias!r}")
    normalised: dict[int, float] = {}
    for token_id, value in bias.items():
        token_id = _int("logit_bias token id", token_id, minimum=0)
        value = _float(f"logit_bias[{token_id}]", value)
        if not -_LOGIT_BIAS_LIMIT <= value <= _LOGIT_BIAS_LIMIT:
            raise ValueError(f"logit_bias[{token_id}] must be in [-100, 100], got {value}")
        normalised[token_id] = value
    return normalised
