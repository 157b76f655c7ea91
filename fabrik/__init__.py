"""fabrik: an LLM inference engine and OpenAI-compatible server, fast on ordinary CPUs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from fabrik.entrypoints.llm import LLM
    from fabrik.outputs import CompletionOutput, RequestOutput
    from fabrik.sampling.params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import fabrik.core` must not pull in torch.
    if name == "LLM":
        from fabrik.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from fabrik.sampling.params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from fabrik import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'fabrik' has no attribute {name!r}")
