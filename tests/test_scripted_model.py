"""The fabrik_scripted test model writes its script exactly, through the real engine and paged KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import QWEN3_EOS_IDS, make_scripted_checkpoint
from fabrik import LLM, SamplingParams
from fabrik.model_config import ModelConfig, load_model_config
from fabrik.models.scripted import ScriptedForCausalLM, _to_digits

SCRIPT_TEXT = ('<think>\nok\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call>')
EOS = QWEN3_EOS_IDS[0]  # <|im_end|>
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def script_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    from tokenizers import Tokenizer

    from checkpoints import tokenizer_dir

    script = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json")).encode(
        SCRIPT_TEXT, add_special_tokens=False).ids
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"), script, EOS), script


def _check(outputs, script: list[int]) -> None:
    for out in outputs:
        completion = out.outputs[0]
        assert completion.token_ids == [*script, EOS]
        assert completion.text == SCRIPT_TEXT
        assert completion.finish_reason == "stop"


def test_script_round_trips_through_the_tokenizer(script_ckpt) -> None:
    path, script = script_ckpt
    llm = LLM(str(path))
    assert llm.tokenizer.decode(script) == SCRIPT_TEXT
    assert load_model_config(path).script == (*script, EOS)


@pytest.mark.parametrize("dtype, temperature", [("float32", 0.0), ("float32", 1.0), ("bfloat16", 1.0)])
def test_chat_yields_exactly_the_script(script_ckpt, dtype: str, temperature: float) -> None:
    path, script = script_ckpt
    llm = LLM(str(path), dtype=dtype)
    params = SamplingParams(temperature=temperature, max_tokens=200, seed=0)
    _check(llm.chat(MESSAGES, params, tools=TOOLS), script)


def test_chunked_prefill_and_batch_give_the_same(script_ckpt) -> None:
    path, script = script_ckpt
    llm = LLM(str(path), max_num_batched_tokens=8, block_size=4)
    conversations = [MESSAGES, [{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, *MESSAGES]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=200))
    assert len(outputs) == 3
    _check(outputs, script)
    # Again: now most prompt blocks come from the prefix cache.
    again = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=200))
    assert all(out.num_cached_tokens > 0 for out in again)
    _check(again, script)


def test_repeats_the_script_without_eos(script_ckpt) -> None:
    path, script = script_ckpt
    llm = LLM(str(path))
    params = SamplingParams(temperature=0, max_tokens=2 * len(script) + 5, ignore_eos=True)
    completion = llm.generate({"prompt_token_ids": [1, 2, 3]}, params)[0].outputs[0]
    assert completion.token_ids == ([*script, EOS] * 3)[:2 * len(script) + 5]
    assert completion.finish_reason == "length"


def _config(script: tuple[int, ...] | None, **changes) -> ModelConfig:
    raw = dict(model_type="fabrik_scripted", vocab_size=16, hidden_size=8, intermediate_size=1, num_hidden_layers=1,
               num_attention_heads=1, num_key_value_heads=1, head_dim=8,
               script=None if script is None else list(script), **changes)
    return ModelConfig.from_dict(raw)


def test_prediction_follows_the_longest_script_prefix() -> None:
    model = ScriptedForCausalLM(_config((1, 1, 2, 1, 3)))
    # After "1 1 2 1 1" the longest match is "1 1" (not the whole-script attempt "1 1 2 1" + 1), so 2 comes next.
    assert model._predict([5, 1, 1, 2, 1, 1]) == [1, 1, 2, 1, 3, 2]
    # The prompt ends with the script's first token, so the model goes on from there.
    assert model._predict([1]) == [1]
    # After the whole script it starts again.
    assert model._predict([1, 1, 2, 1, 3]) == [1, 2, 1, 3, 1]


def test_compute_logits_is_one_hot_in_bfloat16() -> None:
    model = ScriptedForCausalLM(_config((3, 15)))
    model.logit_scale = torch.nn.Parameter(torch.tensor([30.0], dtype=torch.bfloat16))
    logits = model.compute_logits(_to_digits(torch.tensor([15, 3]), torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (2, 16)
    assert logits.argmax(-1).tolist() == [15, 3]
    assert logits.sum().item() == 60.0


@pytest.mark.parametrize("script, message", [(None, "needs a non-empty 'script'"), ((), "needs a non-empty 'script'"),
                                             ((1, 16), "not token ids"), ((1, True), "not token ids")])
def test_bad_scripts_are_rejected(script, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScriptedForCausalLM(_config(script))
