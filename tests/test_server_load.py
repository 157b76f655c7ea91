"""Cancellation and overload: a client that goes away frees its KV blocks; a full queue answers 429, never hangs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from server_utils import ServerProcess, random_server

MODEL = "tiny-qwen3"
LONG = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 240, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, qwen3_tok_ckpt: Path) -> ServerProcess:
    return random_server(request, qwen3_tok_ckpt)


def wait_for(server: ServerProcess, done, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if done(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def idle(metrics: dict[str, float]) -> bool:
    return (metrics["fabrik_kv_cache_usage_perc"] == 0 and metrics["fabrik_num_requests_running"] == 0
            and metrics["fabrik_num_requests_waiting"] == 0)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Story?"}], "n": 2,
                              "max_tokens": 220, "ignore_eos": True}),
])
def test_disconnect_mid_stream_aborts_and_frees_kv(server, path, body):
    before = wait_for(server, idle)
    assert idle(before), before
    with server.http() as http:
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            for _ in range(6):
                next(events)
            assert server.metrics()["fabrik_kv_cache_usage_perc"] > 0
    after = wait_for(server, lambda m: idle(m) and m["fabrik_requests_aborted_total"] > before[
        "fabrik_requests_aborted_total"])
    assert idle(after), after
    assert after["fabrik_requests_aborted_total"] == before["fabrik_requests_aborted_total"] + 1
    generated = after["fabrik_generation_tokens_total"] - before["fabrik_generation_tokens_total"]
    assert generated < body["max_tokens"] * body.get("n", 1)


def test_disconnect_while_waiting_for_a_whole_response(server):
    before = wait_for(server, idle)
    with server.http(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**LONG, "n": 2})
    after = wait_for(server, lambda m: idle(m) and m["fabrik_requests_aborted_total"] > before[
        "fabrik_requests_aborted_total"])
    assert idle(after), after
    assert after["fabrik_requests_aborted_total"] == before["fabrik_requests_aborted_total"] + 1
    assert after["fabrik_generation_tokens_total"] - before["fabrik_generation_tokens_total"] < 2 * LONG["max_tokens"]


def test_queue_overflow_is_429_and_accepted_requests_complete(server):
    """The server runs 2 sequences and lets 4 requests wait: of 16 at once, the rest get 429 with Retry-After."""
    before = wait_for(server, idle)
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 24, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(16)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted, statuses
    for response in rejected:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    for response in accepted:
        assert response.json()["usage"]["completion_tokens"] == 24
    after = wait_for(server, idle)
    assert after["fabrik_requests_rejected_total"] - before["fabrik_requests_rejected_total"] == len(rejected)
    with server.http() as http:
        assert http.post("/v1/completions", json=body).status_code == 200
