"""Maps the ``model_type`` of a ``config.json`` to the class that runs it."""

from __future__ import annotations

from fabrik.models.decoder import DecoderForCausalLM
from fabrik.models.llama import LlamaForCausalLM
from fabrik.models.qwen2 import Qwen2ForCausalLM
from fabrik.models.qwen3 import Qwen3ForCausalLM
from fabrik.models.scripted import ScriptedForCausalLM

MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "fabrik_scripted": ScriptedForCausalLM,
}


def get_model_class(model_type: str) -> type[DecoderForCausalLM]:
    """Returns the model class for a ``config.json`` ``model_type``.

    Raises:
        ValueError: The type is not supported; the message lists the supported ones.
    """
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_CLASSES))})")
    return MODEL_CLASSES[model_type]
