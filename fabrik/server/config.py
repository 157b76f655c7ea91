"""Server configuration: where to listen, who may call, and the limits every request is checked against."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# chat_template_kwargs a client may set. NOTE: never add anything that changes which template (code) runs,
# e.g. "chat_template"; variables that only steer the model's own template are safe.
ALLOWED_CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking"})


@dataclass(frozen=True)
class ServerConfig:
    """How ``fabrik serve`` listens and what it accepts; validated on construction.

    Raises:
        ValueError: a field is out of range; the message names the field and the value.
    """

    host: str = "127.0.0.1"
    """Address to bind; the loopback default keeps the server private to this machine."""
    port: int = 8000
    """TCP port to listen on (0 picks a free one)."""
    max_connections: int = 1024
    """Most open connections; the next get 503 and are closed (lowered at startup to fit the file limit)."""
    idle_timeout_seconds: float = 5.0
    """A connection with no request under way (new, or after a response) is closed after this long."""
    header_timeout_seconds: float = 10.0
    """Time from a request's first byte to the end of its headers; 408 after it."""
    body_timeout_seconds: float = 30.0
    """Time from the end of a request's headers to the end of its body; 408 after it."""
    drain_timeout_seconds: float = 20.0
    """On SIGTERM, time running requests get to finish before streams end with an error and [DONE], others 503."""
    served_model_name: str = "model"
    """The model id clients send as ``model`` and that /v1/models lists."""
    api_keys: tuple[str, ...] = ()
    """Bearer tokens accepted on every route but /health; empty accepts any caller."""
    enable_request_logging: bool = False
    """Log prompts and completions (off by default: they are the users' private data)."""
    max_request_bytes: int = 8 * 2**20
    """Largest request body in bytes; larger ones get 413 before they are parsed."""
    max_n: int = 16
    """Most choices (``n``) one request may ask for."""
    max_prompts: int = 64
    """Most prompts in one /v1/completions request (a list of strings or of token id lists)."""
    max_sequences_per_request: int = 64
    """Most sequences one request may ask for: prompts x ``n`` (each is generated, and waits, on its own)."""
    max_stop_sequences: int = 32
    """Most stop strings one request may give."""
    max_stop_length: int = 512
    """Longest stop string, in characters."""
    max_top_logprobs: int = 20
    """Most alternatives per token for ``top_logprobs`` (chat) and ``logprobs`` (completions)."""
    max_logit_bias: int = 1024
    """Most entries in ``logit_bias``."""
    max_waiting_requests: int = 256
    """Most sequences (prompts x ``n``) accepted but not yet generating; more get 429 with Retry-After."""
    retry_after_seconds: int = 1
    """Value of the Retry-After header on 429 answers."""
    allow_special_tokens_in_content: bool = False
    """Let special-token strings in messages and tools become control tokens (trusted callers only: a user could
    write a system turn); by default they are tokenized as text, as OpenAI does."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (CORS), e.g. ``http://localhost:3000``; ``*`` allows any; empty: none."""
    prepare_workers: int = 2
    """Threads that render chat templates and tokenize, off the event loop."""
    max_preparing_requests: int = 64
    """Most requests being rendered and tokenized at once (running or queued for a worker); more get 429."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port ({self.port!r}) must be an int in [0, 65535]")
        connections = self.max_connections
        if not isinstance(connections, int) or isinstance(connections, bool) or connections < 1:
            raise ValueError(f"max_connections ({self.max_connections!r}) must be an int >= 1")
        for name in ("idle_timeout_seconds", "header_timeout_seconds", "body_timeout_seconds",
                     "drain_timeout_seconds"):
            _check_seconds(name, getattr(self, name), allow_zero=name == "drain_timeout_seconds")
        if not self.served_model_name:
            raise ValueError(f"served_model_name ({self.served_model_name!r}) must not be empty")
        for key in self.api_keys:
            if not key or key != key.strip():
                raise ValueError("api keys must be non-empty and have no surrounding whitespace")
        for name in ("max_request_bytes", "max_n", "max_prompts", "max_sequences_per_request", "max_stop_sequences",
                     "max_stop_length", "max_waiting_requests", "retry_after_seconds", "prepare_workers",
                     "max_preparing_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an int >= 1")
        for name in ("max_top_logprobs", "max_logit_bias"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an int >= 0")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed origin ({origin!r}) must be '*' or scheme://host[:port], without a path")


def _check_seconds(name: str, value: object, allow_zero: bool) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} ({value!r}) must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side knows about the served model (read-only; the engine thread owns the engine)."""

    name: str
    """The served model id."""
    max_model_len: int
    """Context length in tokens (prompt + output)."""
    vocab_size: int
    """Rows of the model's logits: token ids must be below it."""
    kv_capacity_tokens: int = 0
    """Tokens the whole KV cache holds: the longest sequence (prompt + output) that can ever run; 0 = unknown."""
    created: int = 0
    """Unix time the server started (the ``created`` of /v1/models)."""
