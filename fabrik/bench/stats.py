"""Statistics of a benchmark run. Pure Python (no numpy), so the definitions are visible in one place.

Definitions, per request:

    TTFT  time from sending the request to the first streamed chunk that carries output text
    E2E   time from sending the request to the end of its stream
    TPOT  (E2E - TTFT) / (output_tokens - 1); undefined for a single output token
    ITL   the gaps between the arrivals of consecutive text-carrying chunks (one per gap)

Per run: percentiles by linear interpolation between the closest ranks (numpy's default method), and goodput =
requests that succeeded and met every SLO given, per second of the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values``, interpolating linearly (numpy's default ``"linear"`` method).

    The rank is ``q / 100 * (n - 1)`` in the sorted values; a fractional rank mixes its two neighbours.

    Raises:
        ValueError: if ``values`` is empty or ``q`` is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q ({q}) must be in [0, 100]")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """Mean and the p50 / p90 / p99 of ``values`` times ``scale``; every figure is None when there are none."""
    keys = ["mean"] + [f"p{q:g}" for q in PERCENTILES]
    if not values:
        return dict.fromkeys(keys)
    scaled = [v * scale for v in values]
    out: dict[str, float | None] = {"mean": sum(scaled) / len(scaled)}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(scaled, q)
    return out


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (output_tokens - 1)``; None below 2 tokens."""
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


def inter_token_latencies(arrivals: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunk arrival times (seconds, monotonic clock)."""
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


@dataclass
class StreamTokenCounter:
    """Counts output tokens of one streamed ``/v1/completions`` response, chunk by chunk.

    Each chunk whose choices carry non-empty text counts as one token (servers stream one token per chunk);
    when the server sends ``usage`` (``stream_options.include_usage``), its ``completion_tokens`` wins, because
    a chunk may hold several tokens or a token may produce no text.
    """

    chunk_tokens: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None

    def feed(self, chunk: dict[str, Any]) -> bool:
        """Account for one decoded chunk; returns True if it carried output text."""
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.usage_completion_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                self.usage_prompt_tokens = int(usage["prompt_tokens"])
        has_text = any(choice.get("text") for choice in chunk.get("choices") or ())
        if has_text:
            self.chunk_tokens += 1
        return has_text

    @property
    def output_tokens(self) -> int:
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.chunk_tokens


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON payload of one server-sent-events line, or None for blank lines, comments and ``[DONE]``.

    Raises:
        ValueError: if a ``data:`` payload is not valid JSON.
    """
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"stream chunk is not JSON: {payload[:200]!r}") from exc


@dataclass
class RequestRecord:
    """What the client measured for one request (times in seconds)."""

    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None:
            return None
        return tpot(self.e2e, self.ttft, self.output_tokens)


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a request succeeded and met every SLO given (a request of one token has no TPOT: it passes it)."""
    if not record.success:
        return False
    if slo_ttft_ms is not None and (record.ttft is None or record.ttft * 1e3 > slo_ttft_ms):
        return False
    tp = record.tpot
    return not (slo_tpot_ms is not None and tp is not None and tp * 1e3 > slo_tpot_ms)


def goodput(records: Iterable[RequestRecord], duration: float, slo_ttft_ms: float | None,
            slo_tpot_ms: float | None) -> float | None:
    """Requests per second that succeeded and met every SLO; None when no SLO is given."""
    if slo_ttft_ms is None and slo_tpot_ms is None:
        return None
    if duration <= 0:
        raise ValueError(f"duration ({duration}) must be > 0")
    return sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records) / duration


def level_metrics(records: Sequence[RequestRecord], duration: float, slo_ttft_ms: float | None = None,
                  slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """Every figure of one concurrency level: throughputs, goodput, and latency percentiles in milliseconds."""
    if duration <= 0:
        raise ValueError(f"duration ({duration}) must be > 0")
    ok = [r for r in records if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "goodput": goodput(records, duration, slo_ttft_ms, slo_tpot_ms),
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None], 1e3),
        "tpot_ms": summarize([t for t in (r.tpot for r in ok) if t is not None], 1e3),
        "itl_ms": summarize([gap for r in ok for gap in r.itl], 1e3),
        "e2e_ms": summarize([r.e2e for r in ok if r.e2e is not None], 1e3),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }
