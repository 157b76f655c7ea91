"""The Qwen3 reasoning parser: whole-text rules, and the streaming parser agreeing with them for every split."""

from __future__ import annotations

import random
import time

import pytest

from fabrik.server.reasoning import ReasoningParser, split_reasoning

# (text, start_in_reasoning, expected reasoning, expected content)
CASES = [
    ("<think>\nI should greet.\n</think>\n\nHello!", False, "I should greet.", "Hello!"),
    ("Hello!", False, None, "Hello!"),
    ("", False, None, ""),
    ("\n\nHello\n", False, None, "\n\nHello\n"),  # no reasoning block: content verbatim
    ("<think>\n\n</think>\n\nHi", False, "", "Hi"),  # an empty block is "", not None
    ("<think>a\n\nb</think>c\n\nd", False, "a\n\nb", "c\n\nd"),  # only the outer newlines go
    ("  \n<think>x</think>y", False, "x", "y"),  # whitespace before <think> is dropped
    ("<think>\nstill thinking\n", False, "still thinking", ""),  # </think> never came
    ("<think>", False, "", ""),
    ("<thi", False, None, "<thi"),  # a partial tag at the end is text
    ("<thinker>", False, None, "<thinker>"),
    ("The tag <think> opens reasoning.", False, None, "The tag <think> opens reasoning."),
    ("<think>a</think>b<think>c</think>d", False, "a", "b<think>c</think>d"),
    ("<think>a </thin</think> b", False, "a </thin", " b"),
    ("<think>\n</think\n</think>\n\n\n", False, "</think", ""),
    ("</think>x", False, None, "</think>x"),
    ("I should greet.\n</think>\n\nHello!", True, "I should greet.", "Hello!"),
    ("\nno end", True, "no end", ""),
    ("<think>x</think>y", True, "<think>x", "y"),
    ("", True, "", ""),
]


@pytest.mark.parametrize("text, start_in_reasoning, reasoning, content", CASES)
def test_split_reasoning(text: str, start_in_reasoning: bool, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text, start_in_reasoning) == (reasoning, content)


def _stream(pieces: list[str], start_in_reasoning: bool = False) -> tuple[str, str]:
    parser = ReasoningParser(start_in_reasoning)
    reasoning, content = [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return "".join(reasoning) + r, "".join(content) + c


@pytest.mark.parametrize("text, start_in_reasoning, reasoning, content", CASES)
def test_stream_matches_split_at_every_boundary(text: str, start_in_reasoning: bool, reasoning: str | None,
                                                content: str) -> None:
    expected = (reasoning or "", content)
    assert _stream([text], start_in_reasoning) == expected
    assert _stream(list(text), start_in_reasoning) == expected
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]], start_in_reasoning) == expected, f"split at {cut}"


def test_stream_matches_split_at_random_boundaries() -> None:
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<", "</", "think", ">", "\n", "\n\n", " ", "a", "b"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        start_in_reasoning = rng.random() < 0.3
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        reasoning, content = split_reasoning(text, start_in_reasoning)
        assert _stream(pieces, start_in_reasoning) == (reasoning or "", content), repr(pieces)


def test_stream_releases_text_as_soon_as_it_is_decided() -> None:
    parser = ReasoningParser()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>\nStep one") == ("Step one", "")
    assert parser.feed(".\n</thi") == (".", "")  # the newline and partial tag wait
    assert parser.feed("s is not the end") == ("\n</this is not the end", "")
    assert parser.feed("</think>\n") == ("", "")
    assert parser.feed("\nAnswer") == ("", "Answer")
    assert parser.finish() == ("", "")


def test_stream_without_reasoning_passes_content_through() -> None:
    parser = ReasoningParser()
    assert parser.feed("Hello") == ("", "Hello")
    assert parser.feed(" <think>") == ("", " <think>")
    assert parser.finish() == ("", "")


def test_adversarial_megabyte_is_linear() -> None:
    texts = [
        "<think>" + "\n" * 1_000_000,
        "<think>" + "</thin" * 170_000,
        "<think>" + "<think>" * 140_000,
        "\n" * 1_000_000 + "<think>x",
    ]
    for text in texts:
        start = time.perf_counter()
        split_reasoning(text)
        parser = ReasoningParser()
        for i in range(0, len(text), 16):
            parser.feed(text[i:i + 16])
        parser.finish()
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{elapsed:.2f} s for {text[:20]!r}..."
