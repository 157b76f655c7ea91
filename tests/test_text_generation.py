"""Text in and out: the real Qwen3 tokenizer, chat, stop strings through the engine, and `fabrik generate`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fabrik import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen3_tok_ckpt):
    return LLM(str(qwen3_tok_ckpt), dtype="float32", kv_cache_memory_bytes=16 * 2**20)


def test_text_equals_decode_of_tokens(llm):
    (out,) = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    seq = out.outputs[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
    assert len(seq.token_ids) == 24 and seq.finish_reason == "length"
    assert seq.text == llm.tokenizer.decode(seq.token_ids)


def test_stop_string_spanning_tokens_is_cut_from_the_text(llm):
    prompt = "Once upon a time"
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    free = llm.generate([prompt], params)[0].outputs[0]
    pieces = [llm.tokenizer.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    texts = [b[len(a):] for a, b in zip(pieces, pieces[1:])]  # each token's own text
    # A stop string from the end of one token's text into the next token's text.
    i = next(i for i in range(5, 35) if len(texts[i]) >= 2 and texts[i + 1] and "\ufffd" not in texts[i] + texts[i + 1])
    stop = texts[i][-2:] + texts[i + 1][:2]
    (out,) = llm.generate([prompt], params.replace(stop=[stop]))
    seq = out.outputs[0]
    cut = free.text.index(stop)
    assert (seq.text, seq.finish_reason, seq.stop_reason) == (free.text[:cut], "stop", stop)
    (kept,) = llm.generate([prompt], params.replace(stop=[stop], include_stop_str_in_output=True))
    assert kept.outputs[0].text == free.text[:cut + len(stop)]


def test_chat_uses_the_template_and_eos_text_is_dropped(llm):
    messages = [{"role": "user", "content": "Hi"}]
    im_end = llm.tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1
    (out,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, min_tokens=2, skip_special_tokens=False,
                                               logit_bias={im_end[0]: 100.0}),
                      chat_template_kwargs={"enable_thinking": False})
    rendered = llm.tokenizer.apply_chat_template(messages, chat_template_kwargs={"enable_thinking": False})
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    seq = out.outputs[0]
    # min_tokens holds eos back for 2 tokens; then the biased <|im_end|> ends the turn, and is not in the text.
    assert len(seq.token_ids) == 3 and seq.token_ids[-1] == im_end[0] and seq.finish_reason == "stop"
    assert "<|im_end|>" not in seq.text and seq.text == llm.tokenizer.decode(seq.token_ids[:2], skip_special_tokens=False)


def test_fabrik_generate_streams_to_stdout(qwen3_tok_ckpt, llm):
    cmd = [sys.executable, "-m", "fabrik.entrypoints.cli", "generate", "--model", str(qwen3_tok_ckpt),
           "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert proc.stdout == expected.text + "\n"
    assert "finish_reason: length" in proc.stderr


def test_fabrik_generate_reports_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fabrik.entrypoints.cli", "generate", "--model", str(tmp_path),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
