"""Where a decode step's time goes (``fabrik bench latency --split``): the matmuls, the attention, the rest.

The native forward times its own parts (``NativeForward.enable_timings``: the projections, the attention with its
per-head norms, rotary and K/V stores, and the LM head it runs in the same call). Per decode step::

    step = linears + attention + other forward (RMSNorms, SiLU-and-multiply, embedding rows, buffers)
         + LM head (with the gather of its rows) + outside the forward (scheduler, inputs, sampling, Python)

and the share outside the matmuls is ``(step - linears - LM head) / step``.
"""

from __future__ import annotations

from typing import Any


class StepSplit:
    """Cumulative seconds of the native forward's parts and of the LM head, read before and after each step."""

    def __init__(self, engine: Any) -> None:
        model = engine.runner.model
        self._forward = getattr(model, "native_forward", None)
        if self._forward is None or not self._forward.has_head:
            raise ValueError("--split needs the native forward with its LM head (a bfloat16 or quantized model on the "
                             "native kernels)")
        self._forward.enable_timings()

    def read(self) -> tuple[float, ...]:
        """Seconds so far: (linears, attention, whole forward without the LM head, LM head)."""
        t = self._forward.timings()
        return t["linears"], t["attention"], t["total"] - t["head"], t["head"]


def summarize_split(steps: list[tuple[float, ...]]) -> dict[str, float] | None:
    """Mean milliseconds per step of each part, from (step seconds, *deltas of StepSplit.read()) per decode step."""
    if not steps:
        return None
    n = len(steps)
    step, linears, attention, forward, head = (sum(s[i] for s in steps) / n * 1e3 for i in range(5))
    return {"step_ms": step, "linears_ms": linears, "lm_head_ms": head, "attention_ms": attention,
            "forward_other_ms": forward - linears - attention, "outside_forward_ms": step - forward - head,
            "outside_matmuls_fraction": (step - linears - head) / step}
