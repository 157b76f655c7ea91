"""The architecture of a decoder-only checkpoint, read from its Hugging Face ``config.json``.

Two spellings of RoPE settings exist in the wild and both are accepted:

- official checkpoints (transformers < 5): top-level ``rope_theta`` and ``rope_scaling``;
- transformers >= 5 writes one ``rope_parameters`` dict holding ``rope_theta``, ``rope_type`` and the scaling keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts (absent for plain RoPE)."""

    rope_type: str
    """"linear" (every frequency divided by ``factor``) or "llama3" (low frequencies only, smoothed)."""
    factor: float
    """How much the context window is stretched."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above ``original_max_position_embeddings / low_freq_factor`` are fully scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below ``original_max_position_embeddings / high_freq_factor`` are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pretrained with."""


@dataclass(frozen=True)
class ModelConfig:
    """The fields of ``config.json`` that the model code needs, validated."""

    model_type: str
    """Architecture name, e.g. "qwen3"; selects the model class."""
    vocab_size: int
    """Rows of the embedding table and of the output projection."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads per layer."""
    num_key_value_heads: int
    """Key/value heads per layer (fewer than query heads for grouped-query attention)."""
    head_dim: int
    """Width of one attention head; not always hidden_size / num_attention_heads."""
    rms_norm_eps: float
    """Epsilon added to the mean square in every RMSNorm."""
    rope_theta: float
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None
    """Frequency scaling for long contexts, None for plain RoPE."""
    max_position_embeddings: int
    """Longest sequence the model was configured for."""
    tie_word_embeddings: bool
    """Whether the output projection reuses the embedding table."""
    attention_bias: bool
    """Whether q/k/v/o projections have a bias (llama, qwen3; qwen2 always biases q/k/v whatever this says)."""
    mlp_bias: bool
    """Whether the MLP projections have a bias (llama only)."""
    torch_dtype: str
    """Dtype the weights were saved in, e.g. "bfloat16"."""
    script: tuple[int, ...] | None = None
    """Token ids the ``fabrik_scripted`` test model writes (config.json "script"); None for real models."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Builds and validates a config from the parsed JSON of a ``config.json``.

        Args:
            raw: The JSON object.

        Returns:
            The validated config.

        Raises:
            ValueError: A field is missing, malformed or describes something fabrik does not run.
        """
        for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise ValueError(f"config.json has no {key!r}")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
        if raw.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported")
        heads = raw["num_attention_heads"]
        rope_theta, rope_scaling = _parse_rope(raw)
        config = cls(
            model_type=raw["model_type"],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // max(heads, 1),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            # NOTE: transformers >= 5 writes "dtype", older versions "torch_dtype".
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            script=tuple(raw["script"]) if isinstance(raw.get("script"), list) else None,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Checks that the sizes are consistent.

        Raises:
            ValueError: Naming the first bad value.
        """
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be > 0")


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads (rope_theta, rope_scaling) from either spelling of the RoPE settings."""
    params = raw.get("rope_parameters") or {}
    scaling = dict(raw.get("rope_scaling") or {})
    if params:
        # NOTE: per-layer-type rope dicts ({"full_attention": {...}}) belong to models fabrik does not run.
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters ({params!r}) must be one flat dict")
        scaling = {**scaling, **params}
    rope_theta = float(scaling.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    # Old configs spell the type "type" instead of "rope_type".
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return rope_theta, None
    if "factor" not in scaling:
        raise ValueError(f"rope scaling of type {rope_type!r} needs a 'factor' (got {scaling!r})")
    factor = float(scaling["factor"])
    if not factor > 0:
        raise ValueError(f"rope scaling factor ({factor}) must be > 0")
    if rope_type == "linear":
        return rope_theta, RopeScaling(rope_type="linear", factor=factor)
    rope_scaling = RopeScaling(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )
    if not rope_scaling.high_freq_factor > rope_scaling.low_freq_factor:
        raise ValueError(f"llama3 rope high_freq_factor ({rope_scaling.high_freq_factor}) must be > "
                         f"low_freq_factor ({rope_scaling.low_freq_factor})")
    return rope_theta, rope_scaling


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_model_config(path: str | Path) -> ModelConfig:
    """Reads ``config.json`` from a model folder.

    Args:
        path: The model folder.

    Returns:
        The validated config.

    Raises:
        ValueError: The folder has no config.json, or the config is invalid.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist")
    return ModelConfig.from_dict(_read_json(config_file))


def load_eos_token_ids(path: str | Path) -> tuple[int, ...]:
    """Reads the end-of-sequence token ids of a model folder.

    ``generation_config.json`` wins because chat models list their end-of-turn token there; ``config.json`` is the
    fallback.

    Args:
        path: The model folder.

    Returns:
        The ids, possibly empty when neither file names one.
    """
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        eos = _read_json(file).get("eos_token_id")
        if eos is None:
            continue
        ids = (eos,) if isinstance(eos, int) else tuple(eos)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"eos_token_id ({eos!r}) in {file} must be an int or a list of ints")
        return ids
    return ()


_SAMPLING_DEFAULT_KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                          "repetition_penalty": float}


def load_sampling_defaults(path: str | Path) -> dict[str, float | int]:
    """The sampling parameters the model's authors recommend, from ``generation_config.json`` (as vLLM reads them).

    Requests that leave a parameter out get this value instead of the API's own default.

    Args:
        path: The model folder.

    Returns:
        Some of temperature, top_p, top_k, min_p, repetition_penalty; empty without the file.
    """
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    raw = _read_json(file)
    defaults: dict[str, float | int] = {}
    for key, kind in _SAMPLING_DEFAULT_KEYS.items():
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[key] = kind(value)
    return defaults
