"""OpenAI request fields fabrik knows but cannot honour: refused with a 400 that names them, never silently ignored.

Labels (``user``, ``metadata``, ``safety_identifier``, ``prompt_cache_key``) are accepted and not acted on. A field
is refused only for the values that would ask for something we do not do; its default (or null) is always fine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabrik.server.errors import bad_request
from fabrik.server.protocol import ChatCompletionRequest


def _never(_value: Any) -> bool:
    return False


def _default_cache_options(value: Any) -> bool:
    """OpenAI's defaults (an implicit breakpoint, a 30-minute lifetime) are what the automatic prefix cache does."""
    return isinstance(value, dict) and value.get("mode", "implicit") == "implicit" and value.get("ttl", "30m") == "30m"


# field -> (accepts this non-null value?, why not)
_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (lambda v: v is False, "stored chat completions are not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "only the 'auto' and 'default' service tiers exist here"),
    "modalities": (lambda v: all(m == "text" for m in v), "only text output is supported"),
    "verbosity": (lambda v: v == "medium", "verbosity cannot be steered for this model"),
    "reasoning_effort": (_never, "reasoning_effort is not supported yet"),
    "prompt_cache_retention": (lambda v: v == "in_memory", "the prefix cache is in memory only"),
    "prompt_cache_options": (_default_cache_options,
                             "only the default prompt cache options exist here; the prefix cache is automatic"),
    "audio": (_never, "audio output is not supported"),
    "prediction": (_never, "predicted outputs are not supported"),
    "web_search_options": (_never, "web search is not supported"),
    "moderation": (_never, "moderation is not supported"),
    "functions": (_never, "the deprecated functions field is not supported; use tools"),
    "function_call": (_never, "the deprecated function_call field is not supported; use tool_choice"),
}


def check_chat_fields(req: ChatCompletionRequest) -> None:
    """400 naming the first field set to a value we cannot honour."""
    for name, (accepts, why) in _CHAT.items():
        value = getattr(req, name)
        if value is not None and not accepts(value):
            raise bad_request(f"{name}: {why}", name)
