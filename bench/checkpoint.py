"""A random-weight bf16 checkpoint of the Qwen3-0.6B shape with the real Qwen3 tokenizer, for the peer comparison.

Every engine reads the same folder (llama.cpp through a GGUF converted from it). Random weights produce garbage
text, so every engine is told to ignore EOS; the speed of a dense model does not depend on its weights.

Tensors are written straight to safetensors with Hugging Face names (no transformers model is instantiated: that
would cost an fp32 copy of 596M parameters). The same seed gives the same checkpoint; the folder is reused when its
``bench-checkpoint.json`` records the same settings.

Usage: ``python bench/checkpoint.py OUT_DIR [--layers N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "tests" / "assets" / "qwen3-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>

QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "initializer_range": 0.02,
}
"""config.json of Qwen/Qwen3-0.6B (the fields that matter to inference)."""


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter name -> shape, for a tied-embedding Qwen3 config."""
    h, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h),
                                          "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def build(out_dir: str | Path, layers: int | None = None, seed: int = 0) -> Path:
    """Writes (or reuses) the checkpoint in ``out_dir``.

    Args:
        out_dir: Folder to create.
        layers: Number of decoder layers (None: 28, the real model; fewer for a quick smoke test).
        seed: Seed of the random weights.

    Returns:
        The folder.
    """
    import torch
    from safetensors.torch import save_file

    config = {**QWEN3_0_6B}
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers ({layers}) must be >= 1")
        config.update(num_hidden_layers=layers, max_window_layers=layers)
    folder = Path(out_dir)
    stamp = folder / "bench-checkpoint.json"
    settings = {"config": config, "seed": seed, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            # Norm gains near 1 (the final one ~3, as in tests/checkpoints.py) keep activations in a sane range.
            gain = 3.0 if name == "model.norm.weight" else 1.0
            t = torch.randn(shape, generator=gen) * (0.1 * gain) + gain
        else:
            t = torch.randn(shape, generator=gen) * (1.2 / shape[1] ** 0.5)
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": EOS_IDS, "do_sample": False}, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    stamp.write_text(json.dumps(settings, indent=2))
    return folder


def weight_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters read per decoded token: ``matrix`` (projections + the tied LM head) and ``vector`` (norms).

    The embedding lookup reads one row only, but with tied embeddings the same table is read whole as the LM head.
    """
    matrix = vector = 0
    for shape in tensor_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        if len(shape) == 2:
            matrix += n
        else:
            vector += n
    return {"matrix": matrix, "vector": vector}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 28)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.layers, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
