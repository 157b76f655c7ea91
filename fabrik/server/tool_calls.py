"""Finds Qwen3 / Hermes tool calls in model output, whole or while it streams.

The model writes each call as a JSON object between tags, anywhere in its content::

    Let me check.\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>
    '-- content ---''-- one call: name + arguments, which OpenAI returns as a JSON string ------------'

Rules (identical for ``extract_tool_calls`` and the streaming ``ToolCallStreamParser``):

- A block is ``<tool_call>``, a JSON object ``{"name": str, "arguments": object}`` (arguments may be left out for
  ``{}``), then ``</tool_call>``. ``</tool_call>`` inside a JSON string does not close the block.
- A valid block becomes a call whose arguments are ``json.dumps(arguments, ensure_ascii=False)``; the text around
  blocks is content, verbatim (whitespace between calls included: whether whitespace-only content is sent as null is
  the caller's choice).
- A block that does not hold such an object (malformed JSON, NaN, missing name, ...) stays in the content as it was
  written, and makes no call. Nothing here raises on model output.
- A block still open at the end of the output is a call if its text is a valid call (the model stopped right after
  the JSON), else content.
- Given the request's tool names, a call to any other function stays in the content as written (as OpenAI's strict
  behaviour implies: it is not a call the client can make). Given a most number of calls (``parallel_tool_calls:
  false`` allows one), valid calls past it are dropped.

NOTE, known limits: a ``<tool_call>`` written in plain content (a model explaining the format) opens a block; a
malformed block with an unbalanced ``"`` never closes, so everything after it is content, released at ``finish``.

Work is linear in the text: each delta is scanned once, with regular expressions whose alternatives start with
different characters (no catastrophic backtracking), and a block's JSON is parsed once, when it closes.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

__all__ = ["ToolCall", "ToolCallDelta", "ToolCallStreamParser", "extract_tool_calls"]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_SKIP_OUTSIDE_STRINGS = re.compile(r'(?:[^"<]+|<(?!/tool_call>)|"(?:[^"\\]|\\.)*")*', re.DOTALL)
"""Inside a block: JSON text up to a closing tag or a string that does not end in this text (both not consumed)."""
_SKIP_STRING_REST = re.compile(r'(?:[^"\\]+|\\.)*', re.DOTALL)
"""Inside a JSON string: up to its closing quote, or a trailing lone backslash (neither consumed)."""


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call, as in an OpenAI chat completion message."""

    id: str
    """"call_" + 24 random hex digits."""
    name: str
    """Function name."""
    arguments: str
    """Arguments as a JSON string, as OpenAI returns them."""


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call in a stream, as in an OpenAI chat completion chunk."""

    index: int
    """Position of the call in the output: 0, 1, ...; the same for all pieces of one call."""
    id: str | None
    """Set on the first piece of a call."""
    name: str | None
    """Set on the first piece of a call."""
    arguments: str
    """A piece of the arguments JSON string (may be "")."""


def extract_tool_calls(text: str, names: frozenset[str] | None = None,
                       max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """Splits a whole output into its content and its tool calls.

    Args:
        text: The decoded output (content only: no reasoning).
        names: The functions that may be called (None: any).
        max_calls: Most calls kept (None: all).

    Returns:
        (content with the valid tool-call blocks removed, the calls in order).
    """
    parser = ToolCallStreamParser(names, max_calls)
    content, deltas = parser.feed(text)
    rest, more = parser.finish()
    calls: dict[int, ToolCall] = {}
    for delta in deltas + more:
        if delta.index in calls:
            call = calls[delta.index]
            calls[delta.index] = ToolCall(call.id, call.name, call.arguments + delta.arguments)
        else:
            calls[delta.index] = ToolCall(delta.id or "", delta.name or "", delta.arguments)
    return content + rest, [calls[i] for i in sorted(calls)]


def _partial_tag_len(text: str, tag: str, start: int) -> int:
    """Length of the longest suffix of ``text[start:]`` that is a proper prefix of ``tag`` (may still complete).

    Both tags hold one "<", their first character, so only the last "<" of the text can start such a suffix.
    """
    lt = text.rfind("<", max(start, len(text) - len(tag) + 1))
    return len(text) - lt if lt >= 0 and tag.startswith(text[lt:]) else 0


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# NOTE: json.loads accepts NaN/Infinity, which json.dumps would write back as invalid JSON.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_call(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a block's text, or None if it is not a valid call."""
    if not block.lstrip().startswith("{"):
        return None  # cheap rejection of most non-calls, without an exception
    try:
        obj = _DECODER.decode(block)
        if not isinstance(obj, dict):
            return None
        name, arguments = obj.get("name"), obj.get("arguments", {})
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        return name, json.dumps(arguments, ensure_ascii=False)
    except (ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the interpreter's recursion limit.
        return None


class ToolCallStreamParser:
    """Streaming version of ``extract_tool_calls``: content deltas in, (content, tool-call deltas) out.

    Content is released as soon as it cannot be the start of ``<tool_call>``; a block is buffered until it closes,
    then its call is emitted whole, as one ``ToolCallDelta`` with index, id, name and the complete arguments. So
    for any split of a text into deltas, the results concatenate to ``extract_tool_calls(text)`` (ids aside).
    """

    def __init__(self, names: frozenset[str] | None = None, max_calls: int | None = None) -> None:
        self._names = names
        self._max_calls = max_calls
        self._carry = ""
        """Held back: a partial "<tool_call>" in content; in a block, a partial "</tool_call>" or a lone backslash."""
        self._in_block = False
        self._in_string = False
        """Inside a block, inside a JSON string (where "</tool_call>" does not close the block)."""
        self._block: list[str] = []
        """Text of the open block so far, after "<tool_call>" and before ``_carry``."""
        self._num_calls = 0

    @property
    def saw_tool_call(self) -> bool:
        """Whether at least one valid tool call was emitted (the finish reason becomes "tool_calls")."""
        return self._num_calls > 0

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Consumes the next piece of content.

        Args:
            delta: The new text.

        Returns:
            (content_delta, the tool-call deltas completed by this text).
        """
        if not self._in_block and not self._carry and "<" not in delta:
            return delta, []  # the common case: plain content
        text = self._carry + delta
        self._carry = ""
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        pos = 0
        while pos < len(text):
            if not self._in_block:
                start = text.find(TOOL_CALL_START, pos)
                if start < 0:
                    keep = _partial_tag_len(text, TOOL_CALL_START, pos)
                    content.append(text[pos:len(text) - keep])
                    self._carry = text[len(text) - keep:]
                    break
                content.append(text[pos:start])
                self._in_block = True
                pos = start + len(TOOL_CALL_START)
                continue
            end = self._scan_block(text, pos)
            if end is None:
                break
            self._close_block(content, calls)
            pos = end + len(TOOL_CALL_END)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Releases what was held back once the output is complete.

        Returns:
            (content_delta, tool-call deltas of a block left open, if it holds a valid call).
        """
        carry, self._carry = self._carry, ""
        if not self._in_block:
            return carry, []
        calls: list[ToolCallDelta] = []
        parsed = None if self._in_string else self._known_call("".join(self._block))
        if parsed is not None:
            calls.extend(self._emit(*parsed))
            content = ""  # a partial "</tool_call>" in the carry is the call's own tag
        else:
            content = TOOL_CALL_START + "".join(self._block) + carry
        self._in_block = self._in_string = False
        self._block = []
        return content, calls

    def _scan_block(self, text: str, pos: int) -> int | None:
        """Adds the block's text from ``pos`` on to the buffer; returns where "</tool_call>" starts, or None."""
        scan = pos
        if self._in_string:
            scan = _SKIP_STRING_REST.match(text, scan).end()
            if scan == len(text) or text[scan] == "\\":
                self._block.append(text[pos:scan])
                self._carry = text[scan:]  # "" or a lone backslash, whose escaped character comes next
                return None
            self._in_string = False
            scan += 1  # the closing quote
        scan = _SKIP_OUTSIDE_STRINGS.match(text, scan).end()
        if scan < len(text) and text[scan] == "<":
            self._block.append(text[pos:scan])
            return scan
        if scan < len(text):
            # A string opens and does not close in this text.
            self._in_string = True
            scan = _SKIP_STRING_REST.match(text, scan + 1).end()
            keep = len(text) - scan
        else:
            keep = _partial_tag_len(text, TOOL_CALL_END, pos)
        self._block.append(text[pos:len(text) - keep])
        self._carry = text[len(text) - keep:]
        return None

    def _close_block(self, content: list[str], calls: list[ToolCallDelta]) -> None:
        block = "".join(self._block)
        self._in_block = False
        self._block = []
        parsed = self._known_call(block)
        if parsed is None:
            content.append(TOOL_CALL_START + block + TOOL_CALL_END)
        else:
            calls.extend(self._emit(*parsed))

    def _known_call(self, block: str) -> tuple[str, str] | None:
        parsed = _parse_call(block)
        if parsed is None or (self._names is not None and parsed[0] not in self._names):
            return None
        return parsed

    def _emit(self, name: str, arguments: str) -> list[ToolCallDelta]:
        if self._max_calls is not None and self._num_calls >= self._max_calls:
            return []
        delta = ToolCallDelta(index=self._num_calls, id=f"call_{secrets.token_hex(12)}", name=name,
                              arguments=arguments)
        self._num_calls += 1
        return [delta]
