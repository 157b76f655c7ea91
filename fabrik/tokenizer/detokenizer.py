"""Streaming detokenization: token ids arriving one step at a time -> text deltas, with stop strings.

Two things make this harder than `decode(new_ids)`:

1. A token is not a unit of text. With byte-level BPE one character (an emoji, a CJK ideograph, "Ä") can be split
   over several tokens, and some tokenizers (SentencePiece) drop a token's leading space when it is decoded alone.
   So each new token is decoded together with a few tokens before it, and a delta is only released once it does not
   end in an incomplete UTF-8 sequence (U+FFFD), as in vLLM's `detokenize_incrementally`:

       tokens:   ... | t5  t6  t7 | t8  t9 |           decoded window = tokens[prefix:]
                     ^prefix      ^read                delta = decode(tokens[prefix:]) - decode(tokens[prefix:read])

   After a delta is released, `prefix` moves to the old `read` and `read` to the end, so the window stays a few
   tokens long and each step costs O(new tokens), however long the output.

2. Stop strings can span tokens, and once matched nothing after them may be returned. Decoded text is therefore
   held back while its tail could still grow into a stop string (`"<"` when a stop string is `"</s>"`), and released
   once it cannot, or at `flush()`.
"""

from __future__ import annotations

from collections.abc import Sequence

from fabrik.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

# Prompt tokens kept as decoding context for the first output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting broken UTF-8, and applies stop strings.

    Invariants: `"".join(all update() results) + flush() == text`; without a stop match and without an incomplete
    character at the very end, `text == tokenizer.decode(all_output_ids, skip_special_tokens)`. With a match, `text`
    ends right before the stop string (or right after it, with `include_stop_str_in_output`) and later tokens are
    ignored.

    When several stop strings occur, the one whose match ends first in the text wins (at an equal end, the longest),
    which is the match a token-by-token stream sees first; so the result does not depend on how the tokens were
    batched into `update` calls.

    Args:
        tokenizer: The model's tokenizer.
        skip_special_tokens: Leave special tokens (e.g. `<|im_end|>`) out of the text.
        stop: Stop strings; empty strings are ignored.
        include_stop_str_in_output: Keep the matched stop string at the end of the text.
        prompt_token_ids: The prompt; its last tokens are decoding context (a leading space, a split character),
            not output.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        if isinstance(stop, str):
            raise TypeError(f"stop must be a sequence of strings, not the string {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(dict.fromkeys(s for s in stop if s))
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        # The decoding window: tokens[prefix:] of the vLLM scheme, with `_read` relative to it.
        self._window: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        # `_decoded` is all complete output text; its first `_released` characters have been returned.
        self._decoded = ""
        self._released = 0
        self._stop_reason: str | None = None

    @property
    def text(self) -> str:
        """All final output text so far (the concatenation of the returned deltas)."""
        return self._decoded[: self._released]

    @property
    def stop_reason(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop_reason

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Append generated tokens.

        Args:
            new_token_ids: The tokens generated since the last call (usually one).

        Returns:
            The text that became final (may be ""). After a stop string matched, always "".
        """
        if self._stop_reason is not None:
            return ""
        start = self._released
        for token_id in new_token_ids:
            self._window.append(token_id)
            delta = self._decode_pending(final=False)
            if delta and self._append(delta):
                break
        if self._stop_reason is None:
            self._released = len(self._decoded) - self._stop_prefix_len()
        return self._decoded[start : self._released]

    def flush(self) -> str:
        """End of generation: return the text held back for stop strings.

        A trailing incomplete UTF-8 character (the output ended inside it) is dropped, not returned as U+FFFD.
        """
        if self._stop_reason is not None:
            return ""
        start = self._released
        delta = self._decode_pending(final=True)
        if not (delta and self._append(delta)):
            self._released = len(self._decoded)
        return self._decoded[start : self._released]

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_pending(self, *, final: bool) -> str:
        """Decode the window; return the new complete text, advancing the offsets, or "" if it is incomplete."""
        if self._read == len(self._window):
            return ""
        window_text = self._decode(self._window)
        if window_text.endswith(_REPLACEMENT_CHAR):
            if not final:
                # The last token(s) end inside a character; wait for the bytes that complete it.
                return ""
            window_text = window_text.rstrip(_REPLACEMENT_CHAR)
        delta = window_text[len(self._prefix_text) :]
        self._prefix_text = self._decode(self._window[self._read :])
        del self._window[: self._read]
        self._read = len(self._window)
        return delta

    def _append(self, delta: str) -> bool:
        """Add decoded text and look for a stop string in the part not yet released; True if one matched."""
        # A new match must end inside `delta`, so it starts at most `max_stop_len - 1` characters before it.
        search_from = max(self._released, len(self._decoded) - self._max_stop_len + 1)
        self._decoded += delta
        match = self._find_stop(search_from)
        if match is None:
            return False
        index, stop = match
        self._stop_reason = stop
        end = index + len(stop) if self._include_stop else index
        self._decoded = self._decoded[:end]
        self._released = end
        return True

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        # NOTE: searching from the first unreleased character is enough: text is only released when no suffix of it
        # can begin a stop string, so no match can start inside released text.
        best: tuple[int, int, str] | None = None  # (match end, -length, stop)
        for stop in self._stop:
            index = self._decoded.find(stop, search_from)
            if index >= 0:
                candidate = (index + len(stop), -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, neg_length, stop = best
        return end + neg_length, stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest unreleased tail of the text that is a proper prefix of some stop string."""
        longest = 0
        unreleased = len(self._decoded) - self._released
        for stop in self._stop:
            for k in range(min(len(stop) - 1, unreleased), longest, -1):
                if self._decoded.endswith(stop[:k]):
                    longest = k
                    break
        return longest
