"""Special tokens typed in a conversation stay text: the control tokens of a chat prompt come only from its template.

A chat template pastes message content into the prompt text, and tokenizing that text would turn any
``<|im_end|>\\n<|im_start|>system`` a user typed into real control tokens: a forged system turn. OpenAI tokenizes
user text with special tokens as plain text; so do we::

    messages --protect--> every added-token string (and any private-use placeholder character) in the client's strings
                          replaced by a placeholder: one character of plane 15-16's private use area, per request
             --render---> prompt text: the template's own control tokens, and placeholders where the client's were
             --split----> [text, <|im_start|>, text, <|im_end|>, ...]: control tokens found by their strings
             --restore--> placeholders back to the client's strings, inside the text pieces only

The text pieces are then encoded by a backend that knows no added tokens, so what the client wrote is tokenized as
the characters it is. For a conversation without such strings the ids are exactly those of encoding the rendered
text (the tokenizer itself splits text at added tokens and encodes the pieces between them separately).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["AddedTokenPattern", "ContentGuard", "Protected"]

_FIRST_PLACEHOLDER = 0xF0000
_LAST_PLACEHOLDER = 0x10FFFD
_PLACEHOLDER_CHARS = "\U000F0000-\U0010FFFD"


@dataclass(frozen=True)
class AddedTokenPattern:
    """How the tokenizer matches one added token in text (its ``AddedToken`` flags)."""

    content: str
    """The token's text."""
    token_id: int
    """Its id."""
    lstrip: bool = False
    """The token takes the whitespace on its left."""
    rstrip: bool = False
    """The token takes the whitespace on its right."""
    single_word: bool = False
    """Matched only as a whole word."""


@dataclass(frozen=True)
class Protected:
    """Conversation inputs with the client's special-token strings replaced by placeholders."""

    value: Any
    """The messages (or tools) as given, placeholders in their strings."""
    originals: tuple[str, ...]
    """``originals[i]`` is the text of placeholder ``chr(0xF0000 + i)``."""


class _Table:
    """The placeholders of one request: each distinct original string gets one character."""

    def __init__(self) -> None:
        self.originals: list[str] = []
        self._index: dict[str, str] = {}

    def placeholder(self, original: str) -> str:
        found = self._index.get(original)
        if found is None:
            if _FIRST_PLACEHOLDER + len(self.originals) > _LAST_PLACEHOLDER:
                raise ValueError("the conversation holds too many distinct special-token strings")
            found = chr(_FIRST_PLACEHOLDER + len(self.originals))
            self.originals.append(original)
            self._index[original] = found
        return found


class ContentGuard:
    """Finds a tokenizer's added tokens in text, and keeps clients' copies of them out of the template's tokens.

    Args:
        tokens: Every added token of the tokenizer (special or not: ``<think>`` and ``<tool_call>`` are not special
            in Qwen3's files, yet each is a single control token).
    """

    def __init__(self, tokens: Iterable[AddedTokenPattern]) -> None:
        tokens = sorted(tokens, key=lambda t: len(t.content), reverse=True)  # longest first, as the tokenizer
        self._ids = {t.content: t.token_id for t in tokens}
        literal = "|".join(re.escape(t.content) for t in tokens)
        # In clients' strings: any added token's text, and any character we use as a placeholder (two patterns: a
        # character class beside the literals would keep the regex engine from skipping ahead).
        self._literals = re.compile(literal) if literal else None
        # In rendered text: the tokens as the tokenizer matches them. NOTE: one group per token only when some token
        # has flags: groups keep the regex engine from skipping ahead to a possible first character (~30x slower).
        self._grouped = any(t.lstrip or t.rstrip or t.single_word for t in tokens)
        parts = []
        for t in tokens:
            part = re.escape(t.content)
            if self._grouped:
                if t.single_word:
                    part = rf"(?<!\w){part}(?!\w)"
                space = r"\s*"
                part = f"{space if t.lstrip else ''}({part}){space if t.rstrip else ''}"
            parts.append(part)
        self._control = re.compile("|".join(parts)) if parts else None
        self._restore = re.compile(f"[{_PLACEHOLDER_CHARS}]")

    def protect(self, value: Any) -> Protected:
        """``value`` (JSON-like: dicts, lists, strings) with placeholders for the token strings in its strings.

        Dict keys are protected too (tool parameter names reach the prompt through ``tojson``).
        """
        table = _Table()

        def sub(match: re.Match[str]) -> str:
            return table.placeholder(match.group(0))

        def walk(item: Any) -> Any:
            if isinstance(item, str):
                if self._restore.search(item):  # first: the placeholders made next are left alone
                    item = self._restore.sub(sub, item)
                return self._literals.sub(sub, item) if self._literals is not None else item
            if isinstance(item, Mapping):
                return {walk(k): walk(v) for k, v in item.items()}
            if isinstance(item, (list, tuple)):
                return [walk(v) for v in item]
            return item

        return Protected(walk(value), tuple(table.originals))

    def split(self, rendered: str, originals: tuple[str, ...]) -> list[str | int]:
        """The rendered prompt as text pieces (placeholders restored) and the ids of the template's control tokens.

        Args:
            rendered: The template's output for protected inputs.
            originals: The ``Protected.originals`` of those inputs.
        """
        pieces: list[str | int] = []
        pos = 0
        if self._control is not None:
            for match in self._control.finditer(rendered):
                if match.start() > pos:
                    pieces.append(self.restore(rendered[pos:match.start()], originals))
                content = next(g for g in match.groups() if g is not None) if self._grouped else match.group(0)
                pieces.append(self._ids[content])
                pos = match.end()
        if pos < len(rendered):
            pieces.append(self.restore(rendered[pos:], originals))
        return pieces

    def restore(self, text: str, originals: tuple[str, ...]) -> str:
        """``text`` with each placeholder back to the client's string it stands for."""
        def original(match: re.Match[str]) -> str:
            index = ord(match.group(0)) - _FIRST_PLACEHOLDER
            # NOTE: a placeholder outside the table can only come from the template source itself; keep it as is.
            return originals[index] if index < len(originals) else match.group(0)

        return self._restore.sub(original, text) if originals else text
