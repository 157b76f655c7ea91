"""Encoding with a token limit: a text far over the limit is refused after reading about as much as the limit.

A server must not spend seconds and a gigabyte tokenizing an 8 MB message only to answer that it does not fit the
context. Long texts are counted piece by piece first, and encoding stops as soon as the count proves the limit
exceeded::

    text (8 MB) -> 64 Ki-character chunks, cut before whitespace -> count, count, count ... > limit: refuse
                                                                          (about limit x 4 characters read)

Chunk counts differ from the whole text's only at the cuts (a word or token string split in two), so each cut is
allowed ``SLACK_PER_CUT`` tokens of error, and only a count over the limit by more than that refuses: a text within the
limit is never refused, and is then encoded whole (its ids are exactly the unchunked ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer as BackendTokenizer

__all__ = ["CHUNK_CHARS", "SLACK_PER_CUT", "TokenLimitExceeded", "check_within"]

CHUNK_CHARS = 1 << 16
"""Characters per counted chunk."""
SLACK_PER_CUT = 16
"""Tokens a cut may add to a count (a split word, a split special token string)."""
_CUT_WINDOW = 1024
"""How far back from a chunk's end a cut looks for whitespace."""


class TokenLimitExceeded(ValueError):
    """A text has more tokens than allowed.

    Attributes:
        num_tokens: The tokens counted: exact if ``exact``, else a lower bound.
        exact: Whether the whole text was encoded.
    """

    def __init__(self, num_tokens: int, limit: int, exact: bool) -> None:
        bound = "" if exact else "at least "
        super().__init__(f"the text has {bound}{num_tokens} tokens, more than the limit of {limit}")
        self.num_tokens = num_tokens
        self.limit = limit
        self.exact = exact


def _chunks(text: str) -> Iterator[str]:
    """``text`` in pieces of at most CHUNK_CHARS characters, each cut just before whitespace when there is some."""
    start = 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            window_start = max(start + 1, end - _CUT_WINDOW)
            for i in range(end, window_start, -1):
                if text[i].isspace() and not text[i - 1].isspace():
                    end = i
                    break
        yield text[start:end]
        start = end


def check_within(backend: BackendTokenizer, texts: Sequence[str], limit: int, counted: int = 0) -> None:
    """Raise TokenLimitExceeded if ``texts`` certainly hold more than ``limit`` tokens (with ``counted`` already).

    Only texts longer than CHUNK_CHARS are counted (short ones cost little to encode outright); stops at the first
    chunk that proves the limit exceeded.
    """
    cuts = 0
    for text in texts:
        if len(text) <= CHUNK_CHARS:
            continue
        for i, chunk in enumerate(_chunks(text)):
            counted += len(backend.encode(chunk, add_special_tokens=False))
            cuts += i > 0
            if counted - cuts * SLACK_PER_CUT > limit:
                raise TokenLimitExceeded(counted - cuts * SLACK_PER_CUT, limit, exact=False)
