"""Load driver for any OpenAI-compatible server: streaming ``/v1/completions`` at several concurrency levels.

For each level, ``concurrency`` workers take prompts from one shared queue until it is empty (a closed loop, as a
fixed number of users would), and every request is timed on the client's monotonic clock::

    send ──── first text chunk ──── chunk ── chunk ── ... ── end of stream
    |<-- TTFT -->|<- ITL ->|<- ITL ->|                       |
    |<------------------------------- E2E ------------------>|
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fabrik.bench.stats import RequestRecord, StreamTokenCounter, inter_token_latencies, level_metrics, parse_sse_line
from fabrik.bench.workload import DEFAULT_TOKEN_ID_RANGE, random_text_prompts, random_token_prompts


@dataclass(frozen=True)
class ServeConfig:
    """What ``fabrik bench serve`` sends, and to whom."""

    base_url: str
    """Server root, e.g. http://127.0.0.1:8000 (``/v1/completions`` is appended)."""
    model: str
    """The ``model`` field of each request."""
    concurrency: tuple[int, ...]
    """Concurrency levels, run one after the other."""
    num_prompts: int
    """Requests per concurrency level."""
    input_len: int
    """Prompt length: token ids, or words with ``prompt_type="text"``."""
    output_len: int
    """``max_tokens`` of each request (sent with ``ignore_eos``)."""
    prompt_type: str = "ids"
    """``ids`` (a list of token ids: exact length) or ``text`` (random words: about one token each)."""
    token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE
    """Prompt ids are drawn from [low, high)."""
    seed: int = 0
    """Prompt seed."""
    warmup: int = 1
    """Requests sent (one at a time, not counted) before the first level."""
    timeout_s: float = 600.0
    """Per-request timeout."""
    slo_ttft_ms: float | None = None
    """Goodput SLO on time to first token."""
    slo_tpot_ms: float | None = None
    """Goodput SLO on time per output token."""
    api_key: str | None = None
    """Sent as a bearer token when set."""

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels ({self.concurrency}) must all be >= 1")
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.prompt_type not in ("ids", "text"):
            raise ValueError(f"prompt_type must be ids or text, got {self.prompt_type!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"

    def prompts(self, level: int) -> list[Any]:
        seed = self.seed + 1000 * level  # fresh prompts per level: the prefix cache must not serve them
        if self.prompt_type == "text":
            return random_text_prompts(self.num_prompts, self.input_len, seed)
        return random_token_prompts(self.num_prompts, self.input_len, seed, self.token_id_range)


def request_body(config: ServeConfig, prompt: Any) -> dict[str, Any]:
    """The JSON of one streaming completion request."""
    return {"model": config.model, "prompt": prompt, "max_tokens": config.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def send_one(client, config: ServeConfig, prompt: Any) -> RequestRecord:
    """Send one streaming request and time it; failures are recorded, never raised."""
    record = RequestRecord(prompt_tokens=len(prompt) if isinstance(prompt, list) else config.input_len)
    counter = StreamTokenCounter()
    arrivals: list[float] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", config.url, json=request_body(config, prompt)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:200]}"
                return record
            async for line in response.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    record.error = f"stream error: {str(chunk['error'])[:200]}"
                    return record
                if counter.feed(chunk):
                    arrivals.append(time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - any transport failure is one failed request
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        return record
    record.e2e = time.perf_counter() - start
    if not arrivals:
        record.error = "the stream carried no output text"
        return record
    record.ttft = arrivals[0] - start
    record.itl = inter_token_latencies(arrivals)
    record.output_tokens = counter.output_tokens
    if counter.usage_prompt_tokens is not None:
        record.prompt_tokens = counter.usage_prompt_tokens
    record.success = True
    return record


class _Progress:
    """One self-overwriting line on stderr (a terminal): level, requests done, failures."""

    def __init__(self, concurrency: int, total: int) -> None:
        self.concurrency, self.total, self.done, self.failed = concurrency, total, 0, 0

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.success
        last = self.done == self.total
        if not (last or sys.stderr.isatty()):
            return  # a log file gets the final count only, not one carriage-return line per request
        print(f"\r  concurrency {self.concurrency}: {self.done}/{self.total} done, {self.failed} failed",
              end="\n" if last else "", file=sys.stderr, flush=True)


async def run_level(client, config: ServeConfig, concurrency: int, prompts: Sequence[Any]) -> dict[str, Any]:
    """Run every prompt with ``concurrency`` requests in flight; returns the level's figures."""
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    records: list[RequestRecord] = []
    progress = _Progress(concurrency, len(prompts))

    async def worker() -> None:
        while not queue.empty():
            record = await send_one(client, config, queue.get_nowait())
            records.append(record)
            progress.update(record)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    duration = time.perf_counter() - start
    return {"concurrency": concurrency,
            **level_metrics(records, duration, config.slo_ttft_ms, config.slo_tpot_ms)}


async def run_serve_async(config: ServeConfig) -> dict[str, Any]:
    """Warm up, then run each concurrency level in turn."""
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    connections = max(config.concurrency) + 1
    # NOTE: no keep-alive: llama-server sometimes closes a reused connection without answering (seen on 1-2 of
    # 8 requests), which would count as failures of the server under test rather than of the benchmark.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=config.timeout_s, headers=headers, limits=limits) as client:
        for prompt in config.prompts(-1)[:config.warmup]:
            record = await send_one(client, config, prompt)
            if not record.success:
                raise OSError(f"warm-up request to {config.url} failed: {record.error}")
        levels = []
        for level, concurrency in enumerate(config.concurrency):
            levels.append(await run_level(client, config, concurrency, config.prompts(level)))
    settings = {k: v for k, v in config.__dict__.items() if k != "api_key"}
    return {"config": settings, "levels": levels}


def run_serve(config: ServeConfig) -> dict[str, Any]:
    """Blocking entry point of ``fabrik bench serve``."""
    return asyncio.run(run_serve_async(config))


def plot_levels(result: dict[str, Any], path: str) -> bool:
    """Draw output throughput against median TPOT and TTFT, one point per level; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "tpot_ms", "median TPOT (ms)"), (axes[1], "ttft_ms", "median TTFT (ms)")):
        points = [(lv["output_throughput"], lv[key]["p50"], lv["concurrency"]) for lv in levels
                  if lv[key]["p50"] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, c in points:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{result['config']['model']} at {result['config']['base_url']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
