"""Where a decode step's time goes (``fabrik bench latency --split``): the matmuls, the attention, the rest.

The native forward times its own parts (``NativeForward.enable_timings``: the projections, and the attention with its
per-head norms, rotary and K/V stores); the LM head call is timed here. Per decode step::

    step = linears + attention + other forward (RMSNorms, SiLU-and-multiply, embedding rows, buffers)
         + LM head (the call, its ~20 us of Python included) + outside the forward (scheduler, inputs, sampling, Python)

and the share outside the matmuls is ``(step - linears - LM head) / step``.
"""

from __future__ import annotations

import time
from typing import Any

class StepSplit:
    """Cumulative seconds of the native forward's parts and of the LM head, read before and after each step."""

    def __init__(self, engine: Any) -> None:
        model = engine.runner.model
        self._forward = getattr(model, "native_forward", None)
        if self._forward is None:
            raise ValueError("--split needs the native forward (a bfloat16 or quantized model on the native kernels)")
        self._forward.enable_timings()
        self._head_s = 0.0
        head = model.compute_logits

        def timed_head(hidden):
            start = time.perf_counter()
            try:
                return head(hidden)
            finally:
                self._head_s += time.perf_counter() - start

        model.compute_logits = timed_head  # this engine is the benchmark's own

    def read(self) -> tuple[float, ...]:
        """Seconds so far: (linears, attention, whole forward, LM head)."""
        t = self._forward.timings()
        return t["linears"], t["attention"], t["total"], self._head_s


def summarize_split(steps: list[tuple[float, ...]]) -> dict[str, float] | None:
    """Mean milliseconds per step of each part, from (step seconds, *deltas of StepSplit.read()) per decode step."""
    if not steps:
        return None
    n = len(steps)
    step, linears, attention, forward, head = (sum(s[i] for s in steps) / n * 1e3 for i in range(5))
    return {"step_ms": step, "linears_ms": linears, "lm_head_ms": head, "attention_ms": attention,
            "forward_other_ms": forward - linears - attention, "outside_forward_ms": step - forward - head,
            "outside_matmuls_fraction": (step - linears - head) / step}
