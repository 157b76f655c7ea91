"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

The engine thread writes (latencies, token counts, engine gauges after each step); the HTTP side writes the
rejected counter and reads everything for GET /metrics. One lock keeps a scrape consistent.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field

_PREFIX = "fabrik_"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram: ``counts[i]`` observations fell at or below ``buckets[i]`` (and above the last)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, num in zip((*self.buckets, math.inf), self.counts):
            cumulative += num
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        out.append(f"{name}_sum{{{labels}}} {self.total!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class ServerMetrics:
    """Every metric GET /metrics exposes. Attributes are written under ``lock``."""

    def __init__(self, model_name: str) -> None:
        self.lock = threading.Lock()
        self.model_name = model_name
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.time_per_output_token = Histogram(TPOT_BUCKETS)
        self.e2e_request_latency = Histogram(E2E_BUCKETS)
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {"stop": 0, "length": 0}
        self.requests_aborted = 0
        self.requests_rejected = 0
        self.engine_errors = 0

    def render(self) -> str:
        """The Prometheus text exposition of all metrics."""
        labels = f'model_name="{_escape(self.model_name)}"'
        hit_rate = self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float | int) -> None:
            lines.extend([f"# HELP {_PREFIX}{name} {help_text}", f"# TYPE {_PREFIX}{name} {kind}",
                          f"{_PREFIX}{name}{{{labels}}} {value}"])

        def histogram(name: str, help_text: str, hist: Histogram) -> None:
            lines.extend([f"# HELP {_PREFIX}{name} {help_text}", f"# TYPE {_PREFIX}{name} histogram",
                          *hist.lines(_PREFIX + name, labels)])

        with self.lock:
            histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                      self.time_to_first_token)
            histogram("time_per_output_token_seconds", "Time between consecutive output tokens of a request.",
                      self.time_per_output_token)
            histogram("e2e_request_latency_seconds", "Time from request arrival to its last token.",
                      self.e2e_request_latency)
            metric("num_requests_running", "gauge", "Sequences in the running batch.", self.num_running)
            metric("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", self.num_waiting)
            metric("num_requests_swapped", "gauge",
                   "Sequences swapped to CPU memory: always 0, preemption recomputes instead.", 0)
            metric("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks held by requests (0 to 1).",
                   self.kv_cache_usage)
            metric("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / tokens looked up.",
                   hit_rate)
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   self.prefix_cache_queries)
            metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                   self.prefix_cache_hits)
            metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
                   self.num_preemptions)
            metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens)
            metric("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            lines.append(f"# HELP {_PREFIX}request_success_total Requests that finished, by finish reason.")
            lines.append(f"# TYPE {_PREFIX}request_success_total counter")
            for reason, count in sorted(self.requests_finished.items()):
                lines.append(f'{_PREFIX}request_success_total{{{labels},finished_reason="{reason}"}} {count}')
            metric("requests_aborted_total", "counter", "Requests aborted (client gone or engine error).",
                   self.requests_aborted)
            metric("requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
                   self.requests_rejected)
            metric("engine_errors_total", "counter", "Engine steps that raised.", self.engine_errors)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
