"""The demo model shipped inside the package: `fabrik serve` runs it when no model is given.

A tiny Qwen3 chat model that answers with King James Bible passages; see README.md in this folder for what it is,
where its text comes from and how `tools/train_demo_model.py` rebuilt it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL_NAME", "default_model_path"]

DEMO_MODEL_NAME = "fabrik-demo"
"""The model id the server announces when it serves the demo model."""


def default_model_path() -> Path:
    """The folder of the shipped demo model (a Hugging Face folder: config.json, model.safetensors, tokenizer)."""
    return Path(__file__).resolve().parent
