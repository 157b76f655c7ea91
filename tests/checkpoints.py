"""Tiny random-weight Hugging Face checkpoints for tests, written with transformers itself.

``make_checkpoint(folder, kind)`` builds one in a second or less. Session fixtures in ``tests/conftest.py``
(``qwen3_ckpt``, ``qwen3_untied_ckpt``, ``qwen2_ckpt``, ``llama_ckpt``, ``qwen3_tok_ckpt``) build each kind once per
test session; use them rather than calling ``make_checkpoint`` in every test.

Kinds:
    "qwen3": Qwen3, tied embeddings, GQA (4 query / 2 kv heads), head_dim 16.
    "qwen3_untied": Qwen3, untied lm_head, head_dim 32 != hidden_size / heads.
    "qwen2": Qwen2, q/k/v biases, untied lm_head.
    "llama": Llama, GQA, tied embeddings, rope_scaling of type llama3 that changes most frequencies.

Weights are redrawn with a larger spread than transformers' init (std 0.02 makes all logits nearly equal, so greedy
picks would hinge on rounding) and the final norm has a gain of ~3; biases and norm weights are random too so that they
are exercised. Measured over 64 random positions: median top-1/top-2 logit margin 0.57-1.04, smallest 0.002-0.02,
against a float32 difference from transformers of ~1e-5.

The end-of-sequence id is the last vocabulary id (``vocab_size - 1``), or Qwen3's real ids with the tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

KINDS = ("qwen3", "qwen3_untied", "qwen2", "llama")
QWEN3_VOCAB_SIZE = 151936
QWEN3_EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_TOKENIZER_DIRS = (Path(__file__).parent / "assets" / "qwen3-tokenizer",)

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
_KIND_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "qwen3_untied": dict(head_dim=32, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),
    "llama": dict(
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    ),
}
_WEIGHT_GAIN = 1.2
"""Matrices get std gain / sqrt(fan_in): 0.15 at hidden size 64, 7.5x transformers' 0.02."""
_BIAS_STD = 0.1
_FINAL_NORM_GAIN = 3.0
"""Spreads the logits (std ~3.5 instead of ~1.2) so that the top two rarely come within rounding of each other."""


def tokenizer_dir() -> Path:
    """The folder holding the vendored Qwen3 tokenizer files."""
    for folder in _TOKENIZER_DIRS:
        if all((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(f"no Qwen3 tokenizer files in any of {[str(d) for d in _TOKENIZER_DIRS]}")


def hf_config(kind: str, vocab_size: int, **overrides: Any):
    """The transformers config object for ``kind`` (see the module docstring)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    config_class = {"qwen3": Qwen3Config, "qwen3_untied": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}
    eos = QWEN3_EOS_IDS if vocab_size == QWEN3_VOCAB_SIZE else [vocab_size - 1]
    kwargs = {**_COMMON, **_KIND_CONFIGS[kind], "vocab_size": vocab_size, "eos_token_id": eos[0], "bos_token_id": None,
              **overrides}
    return config_class[kind](**kwargs)


def make_checkpoint(path: str | Path, kind: str, *, vocab_size: int = 512, dtype: torch.dtype = torch.float32,
                    with_tokenizer: bool = False, seed: int = 0, max_shard_size: str | None = None,
                    **overrides: Any) -> Path:
    """Writes a tiny random checkpoint (config.json, generation_config.json, safetensors) into ``path``.

    Args:
        path: Folder to create (may exist).
        kind: One of ``KINDS``.
        vocab_size: Vocabulary size; forced to Qwen3's 151936 when ``with_tokenizer``.
        dtype: Dtype the weights are saved in (config.json records it).
        with_tokenizer: Also copy the Qwen3 tokenizer files into the folder.
        seed: Seed of the random weights; the same arguments give the same checkpoint.
        max_shard_size: e.g. "50KB" to save several shards with an index.
        **overrides: Fields of the transformers config to change (e.g. ``num_hidden_layers=3``).

    Returns:
        The folder.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if with_tokenizer:
        vocab_size = QWEN3_VOCAB_SIZE
    config = hf_config(kind, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "model.norm.weight":
                param.normal_(_FINAL_NORM_GAIN, 0.1 * _FINAL_NORM_GAIN)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif param.dim() == 2:
                # Scaled by fan-in so that bigger shapes (tests/test_large_model.py) behave like the tiny ones.
                param.normal_(0.0, _WEIGHT_GAIN / param.shape[1] ** 0.5)
            else:
                param.normal_(0.0, _BIAS_STD)
    model = model.to(dtype)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **save_kwargs)
    eos = QWEN3_EOS_IDS if vocab_size == QWEN3_VOCAB_SIZE else [vocab_size - 1]
    GenerationConfig(eos_token_id=eos, bos_token_id=None, do_sample=False).save_pretrained(folder)
    if with_tokenizer:
        for name in _TOKENIZER_FILES:
            shutil.copy(tokenizer_dir() / name, folder / name)
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder."""
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def write_config(path: str | Path, raw: dict[str, Any]) -> None:
    """Overwrites the config.json of a checkpoint folder."""
    (Path(path) / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")


SCRIPTED_LOGIT_SCALE = 30.0
"""Logit of the scripted token (every other id gets 0): sampling at temperature 1 still picks it."""


def make_scripted_checkpoint(path: str | Path, script: list[int], eos_token_id: int,
                             with_tokenizer: bool = True) -> Path:
    """Writes a ``fabrik_scripted`` checkpoint: a model that emits ``script`` then ``eos_token_id`` from any prompt.

    See ``fabrik/models/scripted.py``. config.json's "script" is ``script + [eos_token_id]``, so generation stops
    right after the scripted tokens.

    Args:
        path: Folder to create (may exist).
        script: Token ids to emit, without the eos.
        eos_token_id: The end-of-sequence id written after the script (also the checkpoint's eos).
        with_tokenizer: Also copy the Qwen3 tokenizer files; the vocabulary is then Qwen3's 151936 ids, else 512.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    vocab_size = QWEN3_VOCAB_SIZE if with_tokenizer else 512
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(
        model_type="fabrik_scripted",
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="float32",
        eos_token_id=eos_token_id,
        script=[*script, eos_token_id],
    )
    write_config(folder, config)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}), encoding="utf-8")
    save_file({"logit_scale": torch.tensor([SCRIPTED_LOGIT_SCALE])}, str(folder / "model.safetensors"))
    if with_tokenizer:
        for name in _TOKENIZER_FILES:
            shutil.copy(tokenizer_dir() / name, folder / name)
    return folder
