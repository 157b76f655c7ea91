"""The demo model shipped in `fabrik/demo_model/`, and the script that trains it (`tools/train_demo_model.py`).

The shipped model must load, answer chat requests under its template, and end its turn by itself; the script must
run end to end on a tiny configuration and write a folder fabrik loads. The full training run is not a test.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fabrik import LLM, SamplingParams
from fabrik.demo_model import default_model_path
from fabrik.tokenizer.tokenizer import Tokenizer

_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train_demo_model.py"

PROMPTS = [
    "Tell me a fortune.",
    "Read me a verse from Psalms.",
    "Share some wisdom about mercy.",
    "What does the Bible say about bread?",
    "Hello!",
    "Give me a passage from Genesis.",
    "I need some comfort.",
    "Tell me about the sea.",
]
MAX_TOKENS = 200
_MAX_FOLDER_BYTES = 30 * 2**20


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM(str(default_model_path()), kv_cache_memory_bytes=32 * 2**20)


def test_shipped_folder_is_complete_and_small():
    folder = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (folder / name).is_file(), f"{name} missing from {folder}"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= _MAX_FOLDER_BYTES, f"demo model folder is {size} bytes, more than {_MAX_FOLDER_BYTES}"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3"


def test_eos_ids_are_end_of_turn_and_end_of_text():
    folder = default_model_path()
    tokenizer = Tokenizer.from_pretrained(folder)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    im_end, end_of_text = tokenizer.encode("<|im_end|><|endoftext|>", add_special_tokens=False)
    assert set(eos) == {im_end, end_of_text}
    assert tokenizer.eos_token_id == im_end


def test_chat_template_matches_transformers_and_the_training_text():
    transformers = pytest.importorskip("transformers")
    folder = default_model_path()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Read me a verse from Psalms."},
        {"role": "assistant", "content": "Psalms 23:1\n\nThe LORD is my shepherd; I shall not want."},
        {"role": "user", "content": "Another, please."},
    ]
    ours = Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # The script renders training conversations itself; its text must be what the template gives at inference.
    script = _load_script()
    trained_text = "".join(piece for piece, _ in script.render(messages))
    assert trained_text == ours.apply_chat_template(messages, add_generation_prompt=False)
    assert ours.apply_chat_template(messages[:2]).endswith("<|im_start|>assistant\n")


def test_replies_end_their_turn_by_themselves(demo_llm):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=MAX_TOKENS, seed=0)
    outputs = [out.outputs[0] for out in demo_llm.chat(conversations, params)]
    report = "\n".join(f"{p!r} -> {o.finish_reason} {o.text!r}" for p, o in zip(PROMPTS, outputs))
    stopped = [o for o in outputs if o.finish_reason == "stop"]
    assert len(stopped) >= 6, f"fewer than 6 of {len(PROMPTS)} replies ended by themselves:\n{report}"
    for o in outputs:
        assert o.text.strip(), f"empty reply:\n{report}"
        assert all(c.isprintable() or c == "\n" for c in o.text) and "\ufffd" not in o.text, f"unprintable:\n{report}"
        assert "<|im_end|>" not in o.text and "<|im_start|>" not in o.text, report


def test_greedy_reply_names_the_book_asked_for(demo_llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    (out,) = demo_llm.chat([{"role": "user", "content": "Read me a verse from Psalms."}], params)
    assert out.outputs[0].text.startswith("Psalms "), out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop", out.outputs[0].text


_TINY_CORPUS = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of the deep.
  3 And God said, Let there be light: and there was light.

Psalms 23

  1 The LORD is my shepherd; I shall not want.
  2 He maketh me to lie down in green pastures: he leadeth me beside the still waters.
  3 He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.

1 John 4

  7 Beloved, let us love one another: for love is of God; and every one that loveth is born of God.
  8 He that loveth not knoweth not God; for God is love.
"""


def _train_tiny(corpus: Path, out: Path) -> dict:
    script = _load_script()
    return script.main([
        "--corpus", str(corpus), "--out", str(out), "--steps", "3", "--vocab-size", "300", "--hidden-size", "32",
        "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--seq-len", "64", "--max-position-embeddings", "128", "--batch-size", "2", "--warmup", "1",
        "--log-every", "1", "--seed", "3",
    ])


def test_training_script_runs_a_few_steps_and_writes_a_loadable_folder(tmp_path):
    corpus = tmp_path / "kjv.txt"
    corpus.write_text(_TINY_CORPUS, encoding="utf-8")
    figures = _train_tiny(corpus, tmp_path / "a")
    assert figures["steps"] == 3
    assert figures["final_train_loss"] == figures["final_train_loss"]  # not NaN
    llm = LLM(str(tmp_path / "a"), kv_cache_memory_bytes=4 * 2**20)
    (out,) = llm.chat([{"role": "user", "content": "Read me a verse from Psalms."}],
                      SamplingParams(temperature=0, max_tokens=8))
    assert len(out.outputs[0].token_ids) >= 1
    # Deterministic given the seed: a second run writes the same weights and tokenizer.
    _train_tiny(corpus, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), f"{name} differs"


def test_fabrik_serve_without_a_model_serves_the_demo_with_its_sampling_defaults():
    """`make run` on a fresh clone: the README's chat request gets a reply that ends its turn."""
    from server_utils import ServerProcess

    server = ServerProcess(None, api_key=None).start()
    try:
        client = server.openai()
        assert [m.id for m in client.models.list().data] == ["fabrik-demo"]
        finished = []
        for seed in range(4):
            reply = client.chat.completions.create(
                model="fabrik-demo", messages=[{"role": "user", "content": "Share some wisdom about mercy."}],
                max_tokens=200, seed=seed)
            choice = reply.choices[0]
            text = choice.message.content
            assert text.strip() and all(ch.isprintable() or ch in "\n\t" for ch in text), text
            finished.append(choice.finish_reason)
        # The defaults come from generation_config.json (temperature 0.7, top_p 0.9), not the API's 1.0.
        assert finished.count("stop") >= 3, finished
    finally:
        server.stop()


def test_sampling_defaults_come_from_generation_config(demo_llm):
    assert demo_llm.engine.sampling_defaults == {"temperature": 0.7, "top_p": 0.9}
    params = demo_llm.default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 0)
