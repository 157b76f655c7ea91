"""Finds a checkpoint, picks the compute dtype, and loads safetensors weights into a model without copying them.

Loading builds the model on the ``meta`` device (no memory, no random init), opens every safetensors file
memory-mapped, checks each tensor's name and shape against the model, and assigns the mapped tensors as the
parameters. Pages of the file are read on first use, and a weight is copied only when its dtype must change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fabrik.model_config import ModelConfig
from fabrik.models.registry import get_model_class

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
"""Files fetched from the hub: configs, weights, tokenizer files and chat templates (no .bin/.pt/.gguf)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some exporters save but fabrik recomputes."""


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """Turns a local folder or a Hugging Face hub id into a local folder.

    Args:
        model: A folder holding config.json and safetensors files, or a hub id like "Qwen/Qwen3-0.6B".
        revision: Branch, tag or commit of the hub repository; must be None for a local folder.

    Returns:
        The folder.

    Raises:
        ValueError: ``model`` is neither an existing folder nor a valid hub id.
        OSError: The hub could not be reached (or has no such repository) and no cached copy exists.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision ({revision!r}) only applies to hub ids, not to the local folder {model!r}")
        return local
    # Imported here: the hub client is only needed when the model is not local.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as e:
        raise ValueError(f"{model!r} is neither a local folder nor a valid Hugging Face hub id") from e
    except LocalEntryNotFoundError as e:
        raise OSError(f"could not reach the Hugging Face hub to download {model!r}, and it is not in the local cache; "
                      f"pass the path of a local folder with config.json and *.safetensors instead") from e
    except OSError as e:
        raise OSError(f"could not download {model!r} from the Hugging Face hub ({e}); check the id, or pass the path "
                      f"of a local folder with config.json and *.safetensors instead") from e


def resolve_dtype(config: ModelConfig, dtype: str) -> torch.dtype:
    """Picks the compute dtype.

    Args:
        config: The model config (its ``torch_dtype`` decides "auto").
        dtype: "auto", "float32" or "bfloat16".

    Returns:
        The torch dtype. "auto" keeps a float32 or bfloat16 checkpoint's dtype and runs float16 ones in bfloat16.

    Raises:
        ValueError: ``dtype`` is not one of the three, or "auto" meets a checkpoint dtype with no CPU equivalent.
    """
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not supported (choose 'auto', 'float32' or 'bfloat16')")
    if config.torch_dtype in _DTYPES:
        return _DTYPES[config.torch_dtype]
    if config.torch_dtype == "float16":
        # NOTE: float16 matmuls are slow on most CPUs and overflow where bfloat16 does not.
        return torch.bfloat16
    raise ValueError(f"checkpoint dtype {config.torch_dtype!r} has no automatic choice; pass dtype='float32' or "
                     f"'bfloat16'")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards listed by the index, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with index.open(encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = [path / "model.safetensors"]
    for file in files:
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} does not exist")
    return files


def load_model(path: str | Path, config: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """Builds the model for ``config`` and loads the checkpoint's weights into it.

    Args:
        path: The model folder (``model.safetensors``, or shards listed by ``model.safetensors.index.json``).
        config: The config read from the same folder.
        dtype: Dtype of the parameters; weights already in it stay memory-mapped.

    Returns:
        The model in eval mode on the CPU, gradients off.

    Raises:
        ValueError: Unsupported model_type, or a tensor that is missing, unexpected or of the wrong shape.
    """
    model_class = get_model_class(config.model_type)
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    # NOTE: some exporters save the tied head too; it is the embedding table, so it is skipped.
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file.name} (not a parameter of "
                                     f"{model_class.__name__})")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file.name} has shape {shape}, the model expects "
                                     f"{expected[name]}")
                if name in state:
                    raise ValueError(f"tensor {name!r} appears in more than one checkpoint file")
                tensor = f.get_tensor(name)
                state[name] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s): {', '.join(missing[:10])}"
                         + (", ..." if len(missing) > 10 else ""))
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()
