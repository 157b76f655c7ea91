"""The Qwen3 / Hermes tool-call parser: whole-text rules, and the streaming parser agreeing with them at any split."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from fabrik.server.tool_calls import ToolCall, ToolCallDelta, ToolCallStreamParser, extract_tool_calls


def _block(obj: object) -> str:
    return f"<tool_call>\n{json.dumps(obj, ensure_ascii=False)}\n</tool_call>"


WEATHER = {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}
TRICKY = {"name": "run", "arguments": {"code": 'print("</tool_call>", "<tool_call>", "}{", "\\\\")',
                                       "nested": {"a": [1, {"b": [[], {}]}], "s": "\"quoted\" \\ </tool_"}}}
MALFORMED = '<tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call>'
UNBALANCED = '<tool_call>{"name": "f\'}</tool_call>'

# (text, expected content, expected [(name, arguments object)])
CASES = [
    ("Just an answer.", "Just an answer.", []),
    ("", "", []),
    (_block(WEATHER), "", [WEATHER]),
    ("Let me check.\n" + _block(WEATHER), "Let me check.\n", [WEATHER]),
    (_block(WEATHER) + "\n" + _block(TRICKY), "\n", [WEATHER, TRICKY]),
    ("a" + _block(TRICKY) + "b", "ab", [TRICKY]),
    (MALFORMED, MALFORMED, []),
    (MALFORMED + _block(WEATHER) + " done", MALFORMED + " done", [WEATHER]),
    ('<tool_call>{"name": "f"}</tool_call>', "", [{"name": "f", "arguments": {}}]),
    ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', '<tool_call>{"name": "", "arguments": {}}</tool_call>',
     []),
    ('<tool_call>{"name": "f", "arguments": "x"}</tool_call>', '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
     []),
    ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("<tool_call></tool_call>", "<tool_call></tool_call>", []),
    # Left open at the end: a call if the JSON is complete, else text.
    ("<tool_call>\n" + json.dumps(WEATHER) + "\n", "", [WEATHER]),
    ("<tool_call>\n" + json.dumps(WEATHER) + "\n</tool_c", "", [WEATHER]),
    ('<tool_call>\n{"name": "get_weather", "argum', '<tool_call>\n{"name": "get_weather", "argum', []),
    ("<tool_", "<tool_", []),
    ("1 < 2 and <tool> </tool_call>", "1 < 2 and <tool> </tool_call>", []),
    # Documented limit: an unbalanced quote keeps the block open to the end, so everything after it is text.
    (UNBALANCED + _block(WEATHER), UNBALANCED + _block(WEATHER), []),
]


def _check_calls(calls: list[ToolCall], expected: list[dict]) -> None:
    assert [c.name for c in calls] == [e["name"] for e in expected]
    for call, e in zip(calls, expected):
        assert call.arguments == json.dumps(e.get("arguments", {}), ensure_ascii=False)
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("text, content, expected", CASES)
def test_extract_tool_calls(text: str, content: str, expected: list[dict]) -> None:
    got_content, calls = extract_tool_calls(text)
    assert got_content == content
    _check_calls(calls, expected)


def _stream(pieces: list[str]) -> tuple[str, list[tuple[int, str, str]], bool]:
    """Feeds the pieces; returns (content, [(index, name, arguments)], saw_tool_call)."""
    parser = ToolCallStreamParser()
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        c, d = parser.feed(piece)
        content.append(c)
        deltas.extend(d)
    c, d = parser.finish()
    content.append(c)
    deltas.extend(d)
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.index not in calls:
            # The first delta of a call names it.
            assert delta.id is not None and delta.name is not None
            calls[delta.index] = [delta.name, ""]
        calls[delta.index][1] += delta.arguments
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [(i, *calls[i]) for i in sorted(calls)], parser.saw_tool_call


def _expected(text: str) -> tuple[str, list[tuple[int, str, str]], bool]:
    content, calls = extract_tool_calls(text)
    return content, [(i, c.name, c.arguments) for i, c in enumerate(calls)], bool(calls)


@pytest.mark.parametrize("text, content, expected", CASES)
def test_stream_matches_extract_at_every_boundary(text: str, content: str, expected: list[dict]) -> None:
    want = _expected(text)
    assert _stream([text]) == want
    assert _stream(list(text)) == want
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]]) == want, f"split at {cut}"


def test_stream_matches_extract_at_random_boundaries() -> None:
    rng = random.Random(0)
    alphabet = [_block(WEATHER), _block(TRICKY), MALFORMED, "<tool_call>", "</tool_call>", '{"name": "f"}', "<", "\"",
                "\\", "{", "}", "\n", " ", "text"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text) + 1, 40))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _stream(pieces) == _expected(text), repr(pieces)


def test_stream_releases_content_before_the_call_and_emits_the_call_when_it_closes() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("Let me check. <tool") == ("Let me check. ", [])
    assert parser.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_') == ("", [])
    assert not parser.saw_tool_call
    content, deltas = parser.feed("call>\n")
    assert content == "\n"
    assert len(deltas) == 1
    assert (deltas[0].index, deltas[0].name, deltas[0].arguments) == (0, "get_weather", '{"city": "Paris"}')
    assert parser.saw_tool_call
    assert parser.finish() == ("", [])


def test_adversarial_megabyte_is_linear() -> None:
    texts = [
        "<tool_call>" * 90_000,
        "<tool_call></tool_call>" * 45_000,
        "<tool_call>" + "{" * 1_000_000 + "</tool_call>",
        "<tool_call>" + '{"a":' * 200_000 + "1" + "}" * 200_000 + "</tool_call>",
        "<tool_call>" + '["' * 500_000,
        "<tool_call>{" + '""' * 500_000,
        "<tool_call>" + "<" * 1_000_000,
        "<" * 1_000_000,
        "<tool_call>\"" + "\\" * 1_000_000,
    ]
    for text in texts:
        start = time.perf_counter()
        content, calls = extract_tool_calls(text)
        assert (content, calls) == (text, [])
        parser = ToolCallStreamParser()
        for i in range(0, len(text), 16):
            parser.feed(text[i:i + 16])
        parser.finish()
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{elapsed:.2f} s for {text[:20]!r}..."
