"""fabrik bench: the statistics against numpy, and smoke runs of the three commands.

``serve`` runs against a fake OpenAI-compatible streaming server on 127.0.0.1 (http.server in a thread), so the
driver is tested without the real fabrik server.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fabrik.bench.stats import (RequestRecord, StreamTokenCounter, goodput, inter_token_latencies, level_metrics,
                                parse_sse_line, percentile, summarize, tpot)
from fabrik.bench.workload import random_text_prompts, random_token_prompts
from fabrik.entrypoints.cli import main


# -- statistics -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 17, 100])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(n: int, q: float) -> None:
    values = np.random.default_rng(n).exponential(size=n).tolist()
    ours, ref = percentile(values, q), float(np.percentile(values, q))
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12), f"n={n} q={q}: {ours} vs numpy {ref}"


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="101"):
        percentile([1.0], 101)
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert summarize([1.0, 3.0], 1e3) == {"mean": 2000.0, "p50": 2000.0, "p90": 2800.0, "p99": 2980.0}


def test_tpot_and_itl() -> None:
    assert tpot(e2e=1.0, ttft=0.1, output_tokens=10) == pytest.approx(0.1)
    assert tpot(e2e=1.0, ttft=0.1, output_tokens=1) is None  # no token after the first
    assert tpot(e2e=1.0, ttft=0.1, output_tokens=0) is None
    assert inter_token_latencies([1.0, 1.5, 1.75]) == [0.5, 0.25]
    assert inter_token_latencies([1.0]) == []
    one_token = RequestRecord(success=True, output_tokens=1, ttft=0.2, e2e=0.2)
    assert one_token.tpot is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = [
        RequestRecord(success=True, output_tokens=11, ttft=0.05, e2e=0.55),   # TPOT 50 ms: meets both
        RequestRecord(success=True, output_tokens=11, ttft=0.50, e2e=0.60),   # TTFT too slow
        RequestRecord(success=True, output_tokens=11, ttft=0.05, e2e=2.05),   # TPOT 200 ms: too slow
        RequestRecord(success=True, output_tokens=1, ttft=0.05, e2e=0.05),    # one token: no TPOT, meets TTFT
        RequestRecord(success=False, error="HTTP 500"),
    ]
    assert goodput(records, 2.0, slo_ttft_ms=100, slo_tpot_ms=100) == pytest.approx(2 / 2.0)
    assert goodput(records, 2.0, slo_ttft_ms=100, slo_tpot_ms=None) == pytest.approx(3 / 2.0)
    assert goodput(records, 2.0, slo_ttft_ms=None, slo_tpot_ms=None) is None
    metrics = level_metrics(records, 2.0, 100, 100)
    assert (metrics["completed"], metrics["failed"], metrics["output_tokens"]) == (4, 1, 34)
    assert metrics["request_throughput"] == pytest.approx(2.0)
    assert metrics["errors"] == ["HTTP 500"]
    assert metrics["tpot_ms"]["p50"] == pytest.approx(50.0)  # of 50, 10 and 200 ms (the 1-token request has none)


def test_token_counting_from_streamed_chunks() -> None:
    lines = ['data: {"choices": [{"index": 0, "text": "He"}]}', "", ": keep-alive",
             'data: {"choices": [{"index": 0, "text": ""}]}',         # a held-back token: no text, not counted
             'data: {"choices": [{"index": 0, "text": "llo", "finish_reason": "length"}]}',
             "data: [DONE]"]
    counter = StreamTokenCounter()
    flags = [counter.feed(chunk) for chunk in map(parse_sse_line, lines) if chunk is not None]
    assert flags == [True, False, True]
    assert counter.output_tokens == 2
    # The server's usage, when it sends it, wins over the chunk count.
    counter.feed(parse_sse_line('data: {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 3}}'))
    assert (counter.output_tokens, counter.usage_prompt_tokens, counter.chunk_tokens) == (3, 8, 2)
    with pytest.raises(ValueError, match="not JSON"):
        parse_sse_line("data: {oops")


def test_workloads_are_seeded_and_exact() -> None:
    ids = random_token_prompts(3, 8, seed=1, id_range=(100, 200))
    assert ids == random_token_prompts(3, 8, seed=1, id_range=(100, 200))
    assert ids != random_token_prompts(3, 8, seed=2, id_range=(100, 200))
    assert all(len(p) == 8 and all(100 <= t < 200 for t in p) for p in ids)
    assert all(len(p.split()) == 5 for p in random_text_prompts(2, 5, seed=0))
    with pytest.raises(ValueError, match="input_len"):
        random_token_prompts(1, 0)


# -- offline commands on a tiny checkpoint ----------------------------------------------------
def test_throughput_smoke(qwen3_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--model", str(qwen3_ckpt), "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["output_tokens"] == 3 * 4 and r["prompt_tokens"] == 3 * 8
    for key in ("elapsed_s", "requests_per_s", "prompt_tokens_per_s", "output_tokens_per_s"):
        assert r[key] > 0, key
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert r["requests_per_s"] * 4 == pytest.approx(r["output_tokens_per_s"])
    assert "output tokens/s" in capsys.readouterr().out


def test_latency_smoke(qwen3_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(qwen3_ckpt), "--input-len", "8", "--output-len", "4",
                 "--batch-size", "2", "--num-iters", "2", "--warmup", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["iterations"]) == 2
    for it in r["iterations"]:
        # The first token of each sequence comes from prefill; the other 3 from 3 decode steps of 2 sequences.
        assert (it["decode_steps"], it["decode_tokens"]) == (3, 2 * 3)
        assert it["decode_tokens_per_s_total"] == pytest.approx(2 * it["decode_tokens_per_s_per_seq"])
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s_total"] > 0
    assert r["decode_step_ms"]["p50"] > 0
    assert "decode tokens/s total" in capsys.readouterr().out


def test_latency_split_accounts_for_the_decode_step(qwen3_ckpt, tmp_path, capsys) -> None:
    """--split: the parts of a decode step are positive, add up to it, and the share outside the matmuls is the
    step less the linears and the LM head; a model without the native forward is refused."""
    from fabrik.kernels import select_backend

    if select_backend("auto").name == "torch":
        pytest.skip("no native kernels on this CPU")
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(qwen3_ckpt), "--input-len", "40", "--output-len", "6",
                 "--num-iters", "2", "--warmup", "0", "--dtype", "bfloat16", "--split", "--json", str(out)]) == 0
    split = json.loads(out.read_text())["decode_split"]
    parts = ("linears_ms", "lm_head_ms", "attention_ms", "forward_other_ms", "outside_forward_ms")
    assert all(split[p] > 0 for p in parts), split
    assert sum(split[p] for p in parts) == pytest.approx(split["step_ms"])
    assert split["outside_matmuls_fraction"] == pytest.approx(
        (split["step_ms"] - split["linears_ms"] - split["lm_head_ms"]) / split["step_ms"])
    assert "outside the matmuls (%)" in capsys.readouterr().out
    assert main(["bench", "latency", "--model", str(qwen3_ckpt), "--input-len", "8", "--output-len", "2",
                 "--dtype", "float32", "--split"]) != 0
    assert "--split needs the native forward" in capsys.readouterr().err


# -- serve against a fake streaming server ----------------------------------------------------
class _FakeCompletions(BaseHTTPRequestHandler):
    """Streams ``max_tokens`` one-token chunks (1 ms apart); every third request fails with HTTP 500."""

    protocol_version = "HTTP/1.0"  # the stream ends when the connection closes
    bodies: list[dict] = []
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            count = len(self.bodies)
        if self.path != "/v1/completions" or count % 3 == 0:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "boom"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            time.sleep(0.001)
            choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_server():
    _FakeCompletions.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serve_smoke_against_fake_server(fake_server, tmp_path, capsys) -> None:
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", fake_server, "--model", "fake", "--concurrency", "1,3",
                 "--num-prompts", "6", "--input-len", "8", "--output-len", "5", "--warmup", "0",
                 "--slo-ttft-ms", "10000", "--slo-tpot-ms", "10000", "--json", str(out),
                 "--plot", str(tmp_path / "p.png")])
    assert code == 0
    r = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in r["levels"]] == [1, 3]
    for lv in r["levels"]:
        assert (lv["num_requests"], lv["completed"], lv["failed"]) == (6, 4, 2)
        assert lv["output_tokens"] == 4 * 5 and lv["prompt_tokens"] == 4 * 8
        assert lv["goodput"] == pytest.approx(lv["request_throughput"])  # generous SLOs: every success meets them
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert lv[key]["p50"] > 0 and lv[key]["p50"] <= lv[key]["p99"], key
        assert lv["e2e_ms"]["p50"] >= lv["ttft_ms"]["p50"]
        assert lv["errors"] and "HTTP 500" in lv["errors"][0]
    sent = _FakeCompletions.bodies[0]
    assert (sent["max_tokens"], sent["ignore_eos"], sent["stream"], len(sent["prompt"])) == (5, True, True, 8)
    captured = capsys.readouterr()
    assert "TTFT p50" in captured.out
    assert "6/6 done, 2 failed" in captured.err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "needs matplotlib" in captured.err
    else:
        assert (tmp_path / "p.png").exists()


def test_serve_reports_unreachable_server() -> None:
    # A closed port on 127.0.0.1: the warm-up request fails and the command says so.
    with ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions) as probe:
        port = probe.server_address[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--concurrency", "1",
                 "--num-prompts", "1", "--input-len", "4", "--output-len", "2", "--timeout", "5"]) == 2
