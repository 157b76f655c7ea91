"""The server's pure-Python parts, without a model: config checks, error mapping, metrics and the engine thread
(driven with a fake engine, so that failures can be injected)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import pytest

from fabrik.outputs import SequenceUpdate
from fabrik.sampling.params import SamplingParams
from fabrik.server.common import ServerContext
from fabrik.server.config import ModelInfo, ServerConfig
from fabrik.server.engine_client import EngineClient, EngineDeadError, EngineError, QueueFullError, RequestAborted
from fabrik.server.errors import _format_path, _path_of_loc, param_of_message
from fabrik.server.metrics import Histogram, ServerMetrics


@pytest.mark.parametrize("field_name,value", [
    ("port", 70000), ("max_n", 0), ("max_request_bytes", -1), ("max_waiting_requests", True),
    ("max_top_logprobs", -1), ("served_model_name", ""), ("api_keys", ("",)), ("api_keys", (" key",)),
])
def test_server_config_names_the_bad_field(field_name, value):
    with pytest.raises(ValueError, match=field_name.removesuffix("s").replace("api_key", "api key")):
        ServerConfig(**{field_name: value})


def test_server_config_defaults_are_private_and_bounded():
    config = ServerConfig()
    assert config.host == "127.0.0.1" and not config.enable_request_logging
    assert config.max_request_bytes < 50 * 2**20 and config.max_n < 10**6 and config.max_stop_sequences < 10_000


@pytest.mark.parametrize("message,param", [
    ("temperature must be >= 0, got -1.0", "temperature"),
    ("top_p must be in (0, 1], got 1.5", "top_p"),
    ("min_tokens (5) must be <= max_tokens (2)", "min_tokens"),
    ("logit_bias[5] must be in [-100, 100], got 1000.0", "logit_bias"),
    ("prompt token id 999999 is out of range [0, 512)", "prompt"),
    ("a sequence of 900 tokens needs 57 KV blocks, but the cache has only 8", "max_tokens"),
    ("something else entirely", None),
])
def test_value_error_messages_name_the_parameter(message, param):
    assert param_of_message(message) == param


def test_validation_locations_become_parameter_paths():
    assert _format_path(_path_of_loc(("body", "messages", 0, "role"))) == "messages[0].role"
    assert _format_path(_path_of_loc(("body", "prompt", "list[int]", 3))) == "prompt[3]"
    assert _format_path(_path_of_loc(("body",))) is None


@pytest.mark.parametrize("enabled", [False, True])
def test_request_logging_only_when_enabled(caplog, enabled):
    ctx = ServerContext(config=ServerConfig(enable_request_logging=enabled), model=ModelInfo("m", 16, 16),
                        tokenizer=None, client=None, reasoning=False)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fabrik.server.requests"):
        ctx.log_request("r1", [11, 12], SamplingParams())
        ctx.log_output("r1", ["the answer"])
    assert ("[11, 12]" in caplog.text and "the answer" in caplog.text) == enabled
    assert enabled or caplog.text == ""


def test_histogram_buckets_are_cumulative():
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        hist.observe(value)
    lines = hist.lines("x", 'a="b"')
    assert lines[:3] == ['x_bucket{a="b",le="0.1"} 2', 'x_bucket{a="b",le="1.0"} 3', 'x_bucket{a="b",le="+Inf"} 4']
    assert lines[-1] == 'x_count{a="b"} 4'


def test_metrics_render_every_family_once():
    text = ServerMetrics('m"odel').render()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert 'model_name="m\\"odel"' in text


# -- the engine thread, with a fake engine ---------------------------------------------------------------------
@dataclass
class FakeScheduler:
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0


@dataclass
class FakeStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


@dataclass
class FakeBlocks:
    usage: float = 0.0
    stats: FakeStats = field(default_factory=FakeStats)


class FakeEngine:
    """Each request yields ``max_tokens`` tokens, one per step; ``fail_steps`` steps raise before that."""

    def __init__(self) -> None:
        self.scheduler = FakeScheduler()
        self.block_manager = FakeBlocks()
        self.requests: dict[str, list[int]] = {}  # request id -> [tokens left, n]
        self.fail_steps = 0
        self.fail_probe = False

    def add_request(self, request_id: str, prompt, params: SamplingParams, group: str | None = None) -> None:
        if params.max_tokens is not None and params.max_tokens > 100:
            raise ValueError("max_tokens too large for the fake engine")
        self.requests[request_id] = [params.max_tokens or 1, params.n]
        self.block_manager.usage = 0.5

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> bool:
        found = self.requests.pop(request_id, None) is not None
        self.block_manager.usage = 0.5 if self.requests else 0.0
        return found

    def step(self) -> list[SequenceUpdate]:
        time.sleep(0.002)  # a step takes time, so that commands arrive between steps as they do for real
        if self.fail_steps or (self.fail_probe and "fabrik-health-probe" in self.requests):
            self.fail_steps = max(0, self.fail_steps - 1)
            raise RuntimeError("injected failure")
        updates = []
        for request_id, state in list(self.requests.items()):
            state[0] -= 1
            finish = "length" if state[0] == 0 else None
            updates += [SequenceUpdate(request_id, i, (7,), "x", finish_reason=finish) for i in range(state[1])]
            if finish:
                del self.requests[request_id]
        self.block_manager.usage = 0.5 if self.requests else 0.0
        return updates


async def collect(client: EngineClient, request_id: str, max_tokens: int, n: int = 1) -> str:
    output: asyncio.Queue = asyncio.Queue()
    await client.add(request_id, [1, 2], SamplingParams(max_tokens=max_tokens, n=n), output, 0.0)
    text = ""
    async for _, updates in client.stream(output, [request_id], n):
        text += "".join(u.new_text for u in updates)
    return text


def run_with_client(scenario, max_waiting: int = 8):
    async def main():
        engine = FakeEngine()
        client = EngineClient(engine, ServerMetrics("fake"), max_waiting)
        client.start(asyncio.get_running_loop())
        await asyncio.to_thread(client.wait_ready)
        try:
            return await scenario(engine, client)
        finally:
            await asyncio.to_thread(client.stop)

    return asyncio.run(main())


def test_outputs_reach_the_right_request():
    async def scenario(engine, client):
        return await asyncio.gather(collect(client, "a", 3), collect(client, "b", 5, n=2))

    assert run_with_client(scenario) == ["xxx", "x" * 10]


def test_add_errors_travel_back_to_the_request():
    async def scenario(engine, client):
        with pytest.raises(ValueError, match="max_tokens"):
            await collect(client, "bad", 1000)
        return await collect(client, "good", 2)

    assert run_with_client(scenario) == "xx"


def test_step_error_fails_the_batch_and_the_engine_recovers():
    async def scenario(engine, client):
        engine.fail_steps = 1
        with pytest.raises(EngineError, match="injected failure"):
            await collect(client, "a", 3)
        assert client.healthy and client.metrics.engine_errors == 1
        return await collect(client, "b", 2)

    assert run_with_client(scenario) == "xx"


def test_failed_probe_marks_the_engine_dead():
    async def scenario(engine, client):
        engine.fail_steps, engine.fail_probe = 1, True
        with pytest.raises(EngineError):
            await collect(client, "a", 3)
        assert not client.healthy and "injected" in client.dead_reason
        with pytest.raises(EngineDeadError):
            await collect(client, "b", 1)

    run_with_client(scenario)


def test_abort_frees_the_request_and_ends_its_stream():
    async def scenario(engine, client):
        output: asyncio.Queue = asyncio.Queue()
        await client.add("long", [1], SamplingParams(max_tokens=100), output, 0.0)
        client.abort("long")
        with pytest.raises(RequestAborted):
            async for _ in client.stream(output, ["long"], 1):
                pass
        for _ in range(100):
            if client.metrics.kv_cache_usage == 0.0:
                break
            await asyncio.sleep(0.01)
        return client.metrics.kv_cache_usage, client.metrics.requests_aborted

    assert run_with_client(scenario) == (0.0, 1)


def test_capacity_counts_requests_that_have_not_started():
    async def scenario(engine, client):
        client.check_capacity(2)
        with pytest.raises(QueueFullError):
            client.check_capacity(3)
        assert client.metrics.requests_rejected == 1

    run_with_client(scenario, max_waiting=2)
