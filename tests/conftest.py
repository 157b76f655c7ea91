"""Session fixtures: each tiny checkpoint kind is built once per test run (see tests/checkpoints.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3, tied embeddings, vocab 512."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def qwen3_untied_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3, untied lm_head, head_dim 32 != hidden / heads, vocab 512."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_untied"), "qwen3_untied")


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with q/k/v biases, untied, vocab 512."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with GQA and llama3 rope scaling, tied, vocab 512."""
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen3_tok_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3 with the real Qwen3 tokenizer files, vocab 151936, tiny hidden size."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_tok"), "qwen3", with_tokenizer=True)
