"""Streaming detokenizer: deltas never hold broken UTF-8 or part of a stop string, and add up to decode()."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from fabrik.tokenizer import IncrementalDetokenizer, Tokenizer

ASSETS = Path(__file__).parent / "assets" / "qwen3-tokenizer"
IM_END = 151645

UTF8_TEXTS = [
    " this is 🦙.cpp",
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "Äpfel und Birnen, Cửa Việt",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅",
    "កាន់តែពិសេសអាចខលចេញ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(ASSETS)


def stream(tok: Tokenizer, ids: Sequence[int], chunk: int = 1, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `ids` `chunk` at a time; return every update() result, then flush()'s, and the detokenizer."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.update(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", UTF8_TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_split_characters_never_yield_replacement_chars(tok, text, chunk):
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids, chunk=chunk)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert detok.stop_reason is None


def test_cases_do_split_characters(tok):
    # The UTF-8 cases are only meaningful if tokens hold parts of characters ("Äpfel" is the exception: whole).
    for text in UTF8_TEXTS:
        assert any(tok.token_to_text(i) == "\ufffd" for i in tok.encode(text)) == (not text.startswith("Ä")), text


def test_each_character_is_emitted_as_soon_as_it_is_complete(tok):
    ids = tok.encode(" 🦙!")
    assert ids[:3] == [11162, 99, 247]
    deltas, _ = stream(tok, ids)
    assert deltas == ["", "", " 🦙", "!", ""]


def test_trailing_incomplete_character_is_dropped(tok):
    ids = tok.encode(" this is 🦙")[:-1]  # the last byte of the emoji never came
    assert tok.decode(ids) == " this is \ufffd"
    deltas, detok = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.text == " this is "  # the space belongs to the token that starts the emoji


def test_stop_string_split_over_tokens(tok):
    text = "The answer is forty-two. END OF STORY and then more text"
    ids = tok.encode(text)
    stop = ". END OF"
    expected = "The answer is forty-two"
    # The stop string spans at least three tokens.
    pieces = [tok.token_to_text(i) for i in ids]
    start = "".join(pieces).index(stop)
    ends = [len("".join(pieces[: k + 1])) for k in range(len(pieces))]
    assert sum(start < e <= start + len(stop) + len(pieces[0]) for e in ends) >= 3
    for chunk in (1, 2, 3, len(ids)):
        detok = IncrementalDetokenizer(tok, stop=[stop])
        released = ""
        for i in range(0, len(ids), chunk):
            released += detok.update(ids[i : i + chunk])
            # Only text that is certainly before the stop string is ever released.
            assert expected.startswith(released), released
        released += detok.flush()
        assert released == detok.text == expected
        assert detok.stop_reason == stop
        assert detok.update(tok.encode(" more")) == "" and detok.flush() == ""


def test_stop_string_inside_a_token_and_inside_a_character(tok):
    deltas, detok = stream(tok, tok.encode("Hello world"), stop=["wor"])
    assert "".join(deltas) == detok.text == "Hello "
    deltas, detok = stream(tok, tok.encode(" this is 🦙.cpp"), stop=["🦙"])
    assert "".join(deltas) == detok.text == " this is "
    assert detok.stop_reason == "🦙"


def test_include_stop_str_in_output(tok):
    ids = tok.encode("The answer is forty-two. END OF STORY and more")
    deltas, detok = stream(tok, ids, stop=["END OF"], include_stop_str_in_output=True)
    assert "".join(deltas) == detok.text == "The answer is forty-two. END OF"
    assert detok.stop_reason == "END OF"


def test_earliest_match_wins(tok):
    ids = tok.encode("one two three four")
    for chunk in (1, len(ids)):
        deltas, detok = stream(tok, ids, chunk=chunk, stop=["four", "two", "three"])
        assert detok.stop_reason == "two" and "".join(deltas) == detok.text == "one "
    # A stream sees " two" complete before "one two three" does, however the tokens are batched.
    for chunk in (1, len(ids)):
        _, detok = stream(tok, ids, chunk=chunk, stop=["one two three", " two"])
        assert detok.stop_reason == " two" and detok.text == "one"
    # Same end: the longer one.
    _, detok = stream(tok, ids, stop=["two", "one two"], include_stop_str_in_output=True)
    assert detok.stop_reason == "one two" and detok.text == "one two"


def test_possible_stop_prefix_is_held_back_until_flush(tok):
    ids = tok.encode("x = a <")
    detok = IncrementalDetokenizer(tok, stop=["</answer>", "\n\n"])
    released = "".join(detok.update([i]) for i in ids)
    assert released == "x = a "
    assert detok.text == "x = a "
    assert detok.flush() == "<"
    assert detok.text == "x = a <" and detok.stop_reason is None


def test_text_that_cannot_start_a_stop_string_is_not_held(tok):
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, stop=["</answer>"])
    assert [detok.update([i]) for i in ids] == ["Hello", " world"]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("<think>\nhmm\n</think>\n\nHi there<|im_end|>", add_special_tokens=False)
    assert IM_END in ids
    deltas, detok = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert detok.text.endswith("Hi there" if skip else "Hi there<|im_end|>")
    assert detok.text.startswith("<think>")  # not a special token in Qwen3's config


def test_stop_string_on_special_token_text(tok):
    ids = tok.encode("Hi<|im_end|>more", add_special_tokens=False)
    _, detok = stream(tok, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert detok.text == "Hi" and detok.stop_reason == "<|im_end|>"
    _, detok = stream(tok, ids, skip_special_tokens=True, stop=["<|im_end|>"])
    assert detok.text == "Himore" and detok.stop_reason is None


def test_prompt_gives_context_but_is_not_output(tok):
    prompt = tok.encode("<|im_start|>assistant\nThe capital of France is")
    output = tok.encode(" Paris. It is 🦙-free.")
    assert tok.token_to_text(output[0]).startswith(" ")
    deltas, detok = stream(tok, output, prompt_token_ids=prompt, stop=["The capital"])
    assert "".join(deltas) == detok.text == " Paris. It is 🦙-free."
    assert detok.stop_reason is None  # stop strings are matched on the output only


def test_ignores_empty_stop_strings_and_rejects_a_bare_string(tok):
    deltas, detok = stream(tok, tok.encode("abc"), stop=[""])
    assert detok.text == "abc"
    with pytest.raises(TypeError):
        IncrementalDetokenizer(tok, stop="abc")


class _CountingTokenizer:
    """Wraps a Tokenizer and records how many ids each decode() call gets."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self.lengths: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(token_ids))
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_output(tok):
    ids = tok.encode(" ".join(UTF8_TEXTS) * 20)
    assert len(ids) > 1000
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, stop=["never appears"], prompt_token_ids=ids[:50])
    text = "".join(detok.update([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert max(counting.lengths) <= 10, max(counting.lengths)
