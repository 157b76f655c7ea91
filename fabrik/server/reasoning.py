"""Splits Qwen3-style output into reasoning (``<think>...</think>``) and content, whole or while it streams.

A Qwen3 answer with thinking on looks like this; the parts are::

    <think>\\n  I should greet.\\n  </think>\\n\\n  Hello!
    ^tag  ^dropped  reasoning  ^dropped ^tag ^dropped  content

Rules (identical for ``split_reasoning`` and the streaming ``ReasoningParser``):

- ``<think>`` opens reasoning only as the first non-whitespace text of the output (the whitespace before it is
  dropped). A ``<think>`` later in the text is ordinary content: a model answering with thinking off may well quote
  the tag, and it should not swallow the rest of its answer.
- Everything up to the first ``</think>`` is reasoning; if ``</think>`` never comes, all of the rest is reasoning.
  After ``</think>`` everything is content, even another ``<think>``.
- No ``<think>`` at the start (and ``start_in_reasoning`` false): the whole output is content, verbatim.
- ``start_in_reasoning``: the prompt already ends inside an open ``<think>`` block, so the output starts as reasoning.

NOTE: newlines around the reasoning are dropped the way Qwen3's own chat template re-reads an assistant turn
(``reasoning.strip("\\n")`` and ``content.lstrip("\\n")``), so a reasoning block round-trips through the template.
vLLM's qwen3 parser keeps them (reasoning "\\nI should greet.\\n", content "\\n\\nHello!"); OpenAI clients show the
fields as they are, so fabrik returns them without the template's padding.
"""

from __future__ import annotations

__all__ = ["ReasoningParser", "split_reasoning"]

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str, start_in_reasoning: bool = False) -> tuple[str | None, str]:
    """Splits a whole output into its reasoning and its content.

    Args:
        text: The decoded output.
        start_in_reasoning: The prompt already opened a ``<think>`` block.

    Returns:
        (reasoning, content): reasoning is None when the output has no reasoning block, and "" for an empty one.
    """
    if not start_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return None, text
        text = stripped[len(THINK_START):]
    reasoning, _, content = text.partition(THINK_END)
    return reasoning.strip("\n"), content.lstrip("\n")


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (a tag that may still complete).

    Both tags hold one "<", their first character, so only the last "<" of the text can start such a suffix.
    """
    lt = text.rfind("<", max(0, len(text) - len(tag) + 1))
    return len(text) - lt if lt >= 0 and tag.startswith(text[lt:]) else 0


class ReasoningParser:
    """Streaming version of ``split_reasoning``: one output's text deltas in, (reasoning, content) deltas out.

    Text that may still turn out to be part of a tag (``"</thi"``), or newlines that are dropped if ``</think>``
    follows them, are held back until the next delta decides, or until ``finish``. So for any split of a text into
    deltas, the concatenated results equal ``split_reasoning(text)`` (with "" for None). Each call costs time linear
    in its delta.

    Args:
        start_in_reasoning: The rendered prompt already ends inside an open ``<think>`` block (templates that add
            ``"<think>\\n"`` themselves). For Qwen3 leave it False: the model writes ``<think>`` itself when thinking
            is on, and with ``enable_thinking=False`` the template closes an empty block so the output is all content.
    """

    _PRE = "pre"  # before the first non-whitespace text: is it "<think>"?
    _REASONING = "reasoning"  # inside the block, looking for "</think>"
    _CONTENT = "content"  # everything else is content

    def __init__(self, start_in_reasoning: bool = False) -> None:
        self._state = self._REASONING if start_in_reasoning else self._PRE
        self._leading_space: list[str] = []
        """_PRE: whitespace seen before anything else (dropped if "<think>" follows)."""
        self._tag = ""
        """Held-back text that may be the start of the tag the state looks for."""
        self._newlines = 0
        """_REASONING: newlines held back at the end of the reasoning so far (dropped if "</think>" follows)."""
        self._reasoning_started = False
        """Whether a non-newline reasoning character was emitted (leading newlines are dropped until then)."""
        self._strip_content_newlines = False
        """Whether leading newlines of the content are still dropped (right after "</think>")."""

    def feed(self, delta: str) -> tuple[str, str]:
        """Consumes the next piece of output text.

        Args:
            delta: The new text.

        Returns:
            (reasoning_delta, content_delta), either possibly "".
        """
        reasoning = ""
        if self._state == self._PRE:
            delta = self._feed_pre(delta)
            if self._state == self._PRE:
                return "", ""
            if self._state == self._CONTENT:
                return "", delta
        if self._state == self._REASONING:
            reasoning, delta = self._feed_reasoning(delta)
            if self._state == self._REASONING:
                return reasoning, ""
        return reasoning, self._content(delta)

    def finish(self) -> tuple[str, str]:
        """Releases what was held back once the output is complete.

        Returns:
            (reasoning_delta, content_delta), either possibly "".
        """
        if self._state == self._PRE:
            self._state = self._CONTENT
            return "", "".join(self._leading_space) + self._tag
        if self._state == self._REASONING:
            tag, self._tag = self._tag, ""
            return self._reasoning(tag, final=True), ""
        return "", ""

    def _feed_pre(self, delta: str) -> str:
        """Decides whether the output opens with "<think>"; returns the rest of ``delta`` for the new state."""
        if not self._tag:
            text = delta.lstrip()
            self._leading_space.append(delta[:len(delta) - len(text)])
            if not text:
                return ""
        else:
            text = self._tag + delta
        if text.startswith(THINK_START):
            self._state = self._REASONING
            self._tag = ""
            return text[len(THINK_START):]
        if THINK_START.startswith(text):
            self._tag = text
            return ""
        self._state = self._CONTENT
        self._tag = ""
        return "".join(self._leading_space) + text

    def _feed_reasoning(self, delta: str) -> tuple[str, str]:
        """Returns (reasoning, text after "</think>" if the block closed in this delta)."""
        text = self._tag + delta
        end = text.find(THINK_END)
        if end >= 0:
            self._tag = ""
            self._state = self._CONTENT
            self._strip_content_newlines = True
            return self._reasoning(text[:end], final=True), text[end + len(THINK_END):]
        keep = _partial_tag_len(text, THINK_END)
        self._tag = text[len(text) - keep:]
        return self._reasoning(text[:len(text) - keep], final=False), ""

    def _reasoning(self, body: str, final: bool) -> str:
        """Emits ``body`` (text known to be reasoning), holding back or dropping its trailing newlines."""
        if not self._reasoning_started:
            body = body.lstrip("\n")
        stripped = body.rstrip("\n")
        if not stripped:
            self._newlines = 0 if final else self._newlines + len(body)
            return ""
        out = "\n" * self._newlines + stripped
        self._newlines = 0 if final else len(body) - len(stripped)
        self._reasoning_started = True
        return out

    def _content(self, text: str) -> str:
        if self._strip_content_newlines:
            text = text.lstrip("\n")
            self._strip_content_newlines = not text
        return text
