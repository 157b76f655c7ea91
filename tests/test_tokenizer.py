"""Tokenizer: encode matches llama.cpp's test vectors and transformers; decode matches transformers."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from fabrik.tokenizer import Tokenizer

ASSETS = Path(__file__).parent / "assets" / "qwen3-tokenizer"


def _reference_cases() -> list[tuple[str, list[int]]]:
    # llama.cpp's format: inputs separated by "\n__ggml_vocab_test__\n" (the file ends with one), one id line each.
    inputs = (ASSETS / "reference-cases.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (ASSETS / "reference-cases.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


CASES = _reference_cases()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(ASSETS)


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ASSETS)


@pytest.mark.parametrize("text,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_encode_matches_llama_cpp_and_transformers(tok, ref, text, expected):
    assert tok.encode(text) == expected
    assert ref(text)["input_ids"] == expected


@pytest.mark.parametrize("text,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_decode_round_trips(tok, ref, text, expected):
    # The normalizer is NFC, so the round trip gives the NFC form of the input.
    assert tok.decode(expected) == unicodedata.normalize("NFC", text)
    assert tok.decode(expected) == ref.decode(expected)


def test_special_token_attributes(tok, ref):
    assert tok.eos_token_id == ref.eos_token_id == 151645
    assert tok.pad_token_id == ref.pad_token_id == 151643
    assert tok.bos_token_id is ref.bos_token_id is None
    assert tok.vocab_size == len(ref) == 151669
    # The named special tokens are in all_special_ids; so is every token that decode(skip_special_tokens) drops.
    assert set(ref.all_special_ids) <= tok.all_special_ids
    for token_id in tok.all_special_ids:
        assert ref.decode([token_id], skip_special_tokens=True) == ""
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_special_tokens_in_text_encode_to_their_ids(tok, ref):
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think><tool_call>"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.encode(text)[0] == 151644
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_special_tokens_like_transformers(tok, ref, skip):
    # <think> and <tool_call> are added tokens that tokenizer_config.json marks non-special: always kept.
    ids = [151644, 872, 198, 9707, 151645, 151643, 151667, 21927, 151668, 151657, 151658, 220]
    assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert "<think>" in tok.decode(ids, skip_special_tokens=skip)


def test_token_to_text(tok):
    assert tok.token_to_text(9707) == "Hello"
    assert tok.token_to_text(21927) == " Hello"
    assert tok.token_to_text(151645) == "<|im_end|>"
    # " 🦙" is 3 tokens (llama.cpp case 18); the middle one holds bytes of the emoji but not all of them.
    assert tok.encode(" 🦙") == [11162, 99, 247]
    assert tok.token_to_text(99) == "\ufffd"


def test_bos_comes_from_tokenizer_json_like_transformers(tmp_path):
    # A Llama-3-style post-processor that prepends a BOS; the config's add_bos_token is ignored when
    # tokenizer.json exists, by transformers and by us.
    transformers = pytest.importorskip("transformers")
    data = json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))
    bos = "<|endoftext|>"
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [151643], "tokens": [bos]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(bos_token=bos, add_bos_token=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.bos_token_id == theirs.bos_token_id == 151643
    assert ours.encode("Hello world") == theirs("Hello world")["input_ids"] == [151643, 9707, 1879]
    assert ours.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_added_tokens_declared_only_in_config_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").symlink_to((ASSETS / "tokenizer.json").resolve())
    config = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {"normalized": False, "lstrip": False, "rstrip": False, "single_word": False}
    config["added_tokens_decoder"]["151669"] = {"content": "<|extra|>", "special": True, **flags}
    config["added_tokens_decoder"]["151670"] = {"content": "<tag>", "special": False, **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "a<|extra|>b<tag>c<|im_end|>"
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"] == [64, 151669, 65, 151670, 66, 151645]
    assert ours.vocab_size == len(theirs) == 151671
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    shutil.copy(ASSETS / "tokenizer_config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
