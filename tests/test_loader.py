"""Checkpoint loading: config spellings, strict key/shape checks, shards, dtype choice, memory mapping, hub errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint, read_config, write_config
from fabrik.loader import load_model, resolve_dtype, resolve_model_path
from fabrik.model_config import ModelConfig, RopeScaling, load_eos_token_ids, load_model_config
from fabrik.models.attention import AttentionMetadata, kv_cache_shape

REPO = Path(__file__).resolve().parents[1]


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return load_model(path, load_model_config(path), dtype)


def prefill_logits(model: torch.nn.Module, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits of one prompt run through a fresh paged cache."""
    config = model.config
    num_blocks = -(-len(tokens) // block_size)
    dtype = model.model.embed_tokens.weight.dtype
    caches = [torch.zeros(kv_cache_shape(config, num_blocks, block_size), dtype=dtype)
              for _ in range(config.num_hidden_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(len(tokens)), query_start_loc=(0, len(tokens)),
                             seq_lens=(len(tokens),), block_tables=torch.arange(num_blocks)[None, :],
                             block_size=block_size)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta))


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copies a single-file checkpoint, letting ``edit`` change its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# --- config.json ---------------------------------------------------------------------------------------------------

QWEN3_0_6B_STYLE = {  # the shape of the official Qwen/Qwen3-0.6B config.json (written by transformers 4.51)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_top_level_rope_theta_form() -> None:
    config = ModelConfig.from_dict(QWEN3_0_6B_STYLE)
    assert (config.rope_theta, config.rope_scaling, config.head_dim, config.torch_dtype) == (1e6, None, 128,
                                                                                             "bfloat16")
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (16, 8, True)


def test_rope_parameters_form_equals_top_level_form() -> None:
    llama3 = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
              "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    base = {k: v for k, v in QWEN3_0_6B_STYLE.items() if k not in ("rope_theta", "rope_scaling")}
    old = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": llama3})
    new = ModelConfig.from_dict({**base, "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    assert old == new
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    plain = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert (plain.rope_theta, plain.rope_scaling) == (1e6, None)
    # Older configs spell the type "type".
    linear = ModelConfig.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", 2.0)


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    raw = {k: v for k, v in QWEN3_0_6B_STYLE.items() if k != "head_dim"}
    assert ModelConfig.from_dict(raw).head_dim == 1024 // 16


@pytest.mark.parametrize(("change", "named"), [
    ({"num_key_value_heads": 3}, "num_key_value_heads (3)"),
    ({"hidden_size": 0}, "hidden_size (0)"),
    ({"hidden_act": "gelu"}, "'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'factor'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"vocab_size": None}, "vocab_size (None)"),
])
def test_invalid_config_names_the_value(change: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict({**QWEN3_0_6B_STYLE, **change})


def test_missing_config_field() -> None:
    raw = {k: v for k, v in QWEN3_0_6B_STYLE.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_dict(raw)


def test_eos_token_ids(tmp_path: Path) -> None:
    write_config(tmp_path, {"eos_token_id": 7})
    assert load_eos_token_ids(tmp_path) == (7,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    assert load_eos_token_ids(tmp_path) == (151645, 151643)
    (tmp_path / "generation_config.json").write_text('{"do_sample": true}')
    assert load_eos_token_ids(tmp_path) == (7,)
    write_config(tmp_path, {})
    assert load_eos_token_ids(tmp_path) == ()


def test_both_rope_spellings_load_the_same_model(llama_ckpt: Path, tmp_path: Path) -> None:
    raw = read_config(llama_ckpt)
    assert raw["rope_parameters"]["rope_type"] == "llama3"  # transformers 5 wrote the new form
    old_form = tmp_path / "old_form"
    shutil.copytree(llama_ckpt, old_form)
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    raw["torch_dtype"] = raw.pop("dtype")
    write_config(old_form, raw)
    assert load_model_config(old_form) == load_model_config(llama_ckpt)
    tokens = list(range(40))
    assert torch.equal(prefill_logits(load(old_form), tokens), prefill_logits(load(llama_ckpt), tokens))


# --- weights -------------------------------------------------------------------------------------------------------

def test_sharded_checkpoint_equals_single_file(qwen3_untied_ckpt: Path, tmp_path: Path) -> None:
    sharded = make_checkpoint(tmp_path / "sharded", "qwen3_untied", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    one, many = load(qwen3_untied_ckpt), load(sharded)
    assert one.state_dict().keys() == many.state_dict().keys()
    for name, tensor in one.state_dict().items():
        assert torch.equal(tensor, many.state_dict()[name]), name
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(prefill_logits(one, tokens), prefill_logits(many, tokens))


def test_tied_and_untied_heads(qwen3_ckpt: Path, qwen3_untied_ckpt: Path) -> None:
    tied, untied = load(qwen3_ckpt), load(qwen3_untied_ckpt)
    assert "lm_head.weight" not in tied.state_dict()
    assert "lm_head.weight" in untied.state_dict()
    hidden = torch.randn(3, 64)
    assert torch.equal(tied.compute_logits(hidden), hidden @ tied.model.embed_tokens.weight.T)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_missing_tensor(qwen3_ckpt: Path, tmp_path: Path) -> None:
    bad = edited_copy(qwen3_ckpt, tmp_path / "bad", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\): model\.layers\.1\.self_attn\.k_norm\.weight"):
        load(bad)


def test_untied_checkpoint_without_lm_head(qwen3_untied_ckpt: Path, tmp_path: Path) -> None:
    bad = edited_copy(qwen3_untied_ckpt, tmp_path / "bad", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load(bad)


def test_unexpected_tensor(qwen3_ckpt: Path, tmp_path: Path) -> None:
    bad = edited_copy(qwen3_ckpt, tmp_path / "bad",
                      lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load(bad)


def test_misshaped_tensor(qwen3_ckpt: Path, tmp_path: Path) -> None:
    bad = edited_copy(qwen3_ckpt, tmp_path / "bad",
                      lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*\(128, 32\).*\(128, 64\)"):
        load(bad)


def test_ignored_tensors(qwen3_ckpt: Path, tmp_path: Path) -> None:
    """A saved tied head and saved rotary buffers are tolerated, as some exporters write them."""

    def add_extras(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    model = load(edited_copy(qwen3_ckpt, tmp_path / "extras", add_extras))
    assert torch.equal(model.state_dict()["model.norm.weight"], load(qwen3_ckpt).state_dict()["model.norm.weight"])


def test_unsupported_model_type(qwen3_ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(qwen3_ckpt, other)
    write_config(other, {**read_config(qwen3_ckpt), "model_type": "gpt_neox"})
    with pytest.raises(ValueError, match=r"'gpt_neox' is not supported \(supported: .*llama, qwen2, qwen3\)"):
        load(other)


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process where ``file`` is memory-mapped."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_are_memory_mapped_not_copied(qwen3_untied_ckpt: Path) -> None:
    model = load(qwen3_untied_ckpt, torch.float32)
    ranges = mapped_ranges(qwen3_untied_ckpt / "model.safetensors")
    assert ranges, "the checkpoint file is not mapped"
    for name, param in model.state_dict().items():
        assert any(start <= param.data_ptr() < end for start, end in ranges), f"{name} was copied"
    # Converting the dtype has to copy.
    converted = load(qwen3_untied_ckpt, torch.bfloat16)
    ranges = mapped_ranges(qwen3_untied_ckpt / "model.safetensors")
    assert not any(start <= converted.lm_head.weight.data_ptr() < end for start, end in ranges)


def test_loaded_model_is_inference_ready(qwen2_ckpt: Path) -> None:
    model = load(qwen2_ckpt)
    assert not model.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())


# --- dtype ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("saved", "requested", "expected"), [
    ("float32", "auto", torch.float32),
    ("bfloat16", "auto", torch.bfloat16),
    ("float16", "auto", torch.bfloat16),
    ("bfloat16", "float32", torch.float32),
    ("float32", "bfloat16", torch.bfloat16),
])
def test_resolve_dtype(saved: str, requested: str, expected: torch.dtype) -> None:
    config = ModelConfig.from_dict({**QWEN3_0_6B_STYLE, "torch_dtype": saved})
    assert resolve_dtype(config, requested) == expected


def test_resolve_dtype_rejects() -> None:
    with pytest.raises(ValueError, match="'float16'"):
        resolve_dtype(ModelConfig.from_dict(QWEN3_0_6B_STYLE), "float16")
    with pytest.raises(ValueError, match="'int8'"):
        resolve_dtype(ModelConfig.from_dict({**QWEN3_0_6B_STYLE, "torch_dtype": "int8"}), "auto")


def test_bfloat16_checkpoint_loads_in_auto_dtype(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16)
    config = load_model_config(path)
    assert config.torch_dtype == "bfloat16"
    model = load_model(path, config, resolve_dtype(config, "auto"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = prefill_logits(model, [1, 2, 3, 4, 5])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --- model path ----------------------------------------------------------------------------------------------------

def test_local_folder_is_used_as_is(qwen3_ckpt: Path) -> None:
    assert resolve_model_path(str(qwen3_ckpt)) == qwen3_ckpt
    with pytest.raises(ValueError, match="revision"):
        resolve_model_path(str(qwen3_ckpt), revision="main")


def test_hub_id_offline_fails_fast_with_advice(tmp_path: Path) -> None:
    # A subprocess, because huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = ("from fabrik.loader import resolve_model_path\n"
              "try:\n    resolve_model_path('fabrik-tests/no-such-model')\n"
              "except (OSError, ValueError) as e:\n    print(type(e).__name__, e)\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "could not reach the Hugging Face hub" in result.stdout
    assert "'fabrik-tests/no-such-model'" in result.stdout and "local folder" in result.stdout
    assert elapsed < 20, f"took {elapsed:.1f}s"


def test_invalid_hub_id() -> None:
    with pytest.raises(ValueError, match="neither a local folder nor a valid"):
        resolve_model_path("not/a/valid/hub/id")


def test_checkpoint_with_tokenizer(qwen3_tok_ckpt: Path) -> None:
    assert (qwen3_tok_ckpt / "tokenizer.json").is_file() and (qwen3_tok_ckpt / "tokenizer_config.json").is_file()
    config = load_model_config(qwen3_tok_ckpt)
    assert config.vocab_size == 151936
    assert load_eos_token_ids(qwen3_tok_ckpt) == (151645, 151643)
    assert prefill_logits(load(qwen3_tok_ckpt), [9707, 11, 1879]).shape == (3, 151936)
