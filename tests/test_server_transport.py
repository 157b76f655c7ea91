"""Connections against a real ``fabrik serve`` (the demo model): deadlines on slow or incomplete requests, the cap on
open connections under a low file limit, graceful shutdown on SIGTERM, and an access log without client secrets;
then the accept-error log of a real asyncio server out of descriptors, and the new ServerConfig fields.

Raw sockets play the bad clients, httpx and the openai client the good ones. Time bounds are loose (a loaded 2-core
machine); each bad connection must end within its timeout plus ``SLACK`` and not long before it.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from fabrik.server.config import ServerConfig
from server_utils import ServerProcess

IDLE, HEADER, BODY = 1.0, 1.5, 2.0
SLACK = 5.0
SHUTTING_DOWN = "the server is shutting down"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(None, "--idle-timeout", str(IDLE), "--header-timeout", str(HEADER), "--body-timeout",
                            str(BODY), "--max-request-bytes", "64KiB").start()
    yield process
    process.stop()


def read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # closed while the client was still sending: what came before still counts
        pass
    return data


def openai_error(response: bytes, status: int) -> dict:
    """The error of a raw HTTP response, checked: its status and OpenAI's error shape; with its Connection header."""
    head, _, rest = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    error = json.loads(rest[:int(headers["content-length"])])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return {**error, "connection": headers.get("connection")}


class Trickle:
    """Sends ``piece`` every ``every`` seconds on ``sock`` until the server closes it (or ``stop``)."""

    def __init__(self, sock: socket.socket, piece: bytes, every: float) -> None:
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sock, piece, every), daemon=True)
        self.thread.start()

    def _run(self, sock: socket.socket, piece: bytes, every: float) -> None:
        try:
            while not self.stopped.is_set():
                sock.sendall(piece)
                time.sleep(every)
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def assert_others_are_served(server: ServerProcess) -> None:
    started = time.monotonic()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert time.monotonic() - started < 0.5
    completion = server.openai(timeout=30).completions.create(model="fabrik-demo", prompt="Hi", max_tokens=4,
                                                              extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 4


CHUNKED_POST = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-fabrik-test\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

# name: (first bytes, (piece, seconds between pieces) sent after them or None, deadline, status or None: closed
# without an answer)
SLOW_CLIENTS = {
    "idle new connection": (b"", None, IDLE, None),
    "partial head": (b"GET /health HTTP/1.1\r\nHost: x\r\n", None, HEADER, 408),
    "head one line at a time": (b"GET /health HTTP/1.1\r\n", (b"X-Slow: 1\r\n", HEADER / 6), HEADER, 408),
    "partial body": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-fabrik-test\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ", None, BODY, 408),
    "endless chunked body, slow": (CHUNKED_POST, (b"1\r\n \r\n", BODY / 8), BODY, 408),
}


@pytest.mark.parametrize("name", list(SLOW_CLIENTS))
def test_slow_and_incomplete_requests_are_closed_after_their_timeout(server, name):
    first, trickle, deadline, status = SLOW_CLIENTS[name]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(first)
        sender = Trickle(sock, *trickle) if trickle else None
        assert_others_are_served(server)
        response = read_until_closed(sock)
        seconds = time.monotonic() - started
        if sender:
            sender.stop()
    assert deadline * 0.8 <= seconds < deadline + SLACK, seconds
    if status is None:
        assert response == b""
    else:
        error = openai_error(response, status)
        assert error["connection"] == "close" and "did not arrive within" in error["message"]


def test_endless_fast_chunked_body_gets_413_then_is_closed(server):
    """Past the body limit the server answers at once, and stops reading the rest when the body timeout passes."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(CHUNKED_POST)
        sender = Trickle(sock, b"4000\r\n" + b" " * 0x4000 + b"\r\n", 0.002)
        response = read_until_closed(sock)
        seconds = time.monotonic() - started
        sender.stop()
    assert openai_error(response, 413)["code"] == "request_too_large"
    assert response.count(b"HTTP/1.1 ") == 1  # no second answer when the body timeout passes
    assert BODY * 0.8 <= seconds < BODY + SLACK, seconds
    assert_others_are_served(server)


def test_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_until_closed(sock)
        seconds = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 200 ")
    assert IDLE * 0.8 <= seconds < IDLE + SLACK


def test_unparseable_request_gets_an_openai_shaped_400(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        response = read_until_closed(sock, timeout=SLACK)
    assert openai_error(response, 400)["connection"] == "close"


def test_access_log_has_no_query_string_and_cuts_long_paths(server):
    secret = "sk-secret-in-the-query-string"
    with server.http() as http:
        assert http.get(f"/v1/models?api_key={secret}").status_code == 200
        assert http.get(f"/v1/models/{'m' * 10_000}?api_key={secret}").status_code == 404
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # httpx refuses URLs over 64 KiB
        sock.sendall(f"GET /v1/models/{'h' * 100_000}?api_key={secret} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {server.api_key}\r\nConnection: close\r\n\r\n".encode())
        huge = read_until_closed(sock)
    # 431 when h11's 16 KiB buffer fills before the whole head is in, else the route's 404
    assert openai_error(huge, int(huge[9:12])) and huge[9:12] in (b"404", b"431")
    time.sleep(0.5)  # the access line is written once the response has been sent
    output = server.output()
    assert secret not in output
    assert max(len(line) for line in output.splitlines()) < 400
    assert re.search(r"GET /v1/models 200 \d+\.\d+s", output)
    assert re.search(r"GET /v1/models/m{100,}\.\.\. 404 ", output)


@pytest.mark.slow
def test_over_the_cap_connections_get_503_under_a_low_file_limit():
    """With 128 descriptors the cap is lowered to fit; held connections past it never use the descriptors up."""
    server = ServerProcess(None, "--header-timeout", "10", file_limit=128).start()
    try:
        cap = int(re.search(r"at most (\d+) open connections", server.output()).group(1))
        assert 1 <= cap < 128
        held = []
        for _ in range(cap):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                response = read_until_closed(sock, timeout=SLACK)
            error = openai_error(response, 503)
            assert error["connection"] == "close" and error["type"] == "service_unavailable"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503  # a good client too, at once
        for sock in held:
            response = read_until_closed(sock)
            assert openai_error(response, 408)["connection"] == "close"
            sock.close()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        output = server.output()
        assert len(output) < 20_000, output[-2000:]
        assert "Too many open files" not in output and "Traceback" not in output
    finally:
        server.stop()


async def _stream(client: httpx.AsyncClient, max_tokens: int, got: asyncio.Event, events: int) -> list[str]:
    """A completions stream's lines; ``got`` is set once ``events`` of them came."""
    body = {"model": "fabrik-demo", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    lines = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                if len(lines) >= events:
                    got.set()
    return lines


@pytest.mark.slow
def test_sigterm_drains_streams_then_ends_them_cleanly_and_exits_0():
    """Streams a few tokens from their end at the signal finish during the drain; long ones end with an error event
    and [DONE]; a whole response and requests still arriving get 503; no connection is accepted after the signal;
    the process exits 0, promptly, without a traceback."""
    drain = 4.0
    server = ServerProcess(None, "--drain-timeout", str(drain)).start()
    half_head = half_body = None
    try:
        async def scenario() -> tuple[list[list[str]], httpx.Response, float]:
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60,
                                         limits=limits) as client:
                started = [asyncio.Event() for _ in range(16)]
                streams = [asyncio.ensure_future(_stream(client, 24, started[i], 21) if i < 8 else
                                                 _stream(client, 490, started[i], 1)) for i in range(16)]
                whole = asyncio.ensure_future(client.post("/v1/completions", json={
                    "model": "fabrik-demo", "prompt": "Once", "max_tokens": 490, "ignore_eos": True}))
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 120)
                nonlocal half_head, half_body
                half_head = socket.create_connection(("127.0.0.1", server.port))
                half_body = socket.create_connection(("127.0.0.1", server.port))
                half_head.sendall(b"GET /health HTTP/1.1\r\n")
                half_body.sendall(SLOW_CLIENTS["partial body"][0])
                await asyncio.sleep(0.2)
                server.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(1.0)
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
                return await asyncio.gather(*streams), await whole, signalled

        streams, whole, signalled = asyncio.run(scenario())
        head_answer, body_answer = read_until_closed(half_head), read_until_closed(half_body)
        status = server.proc.wait(drain + 15)
        exited_after = time.monotonic() - signalled
        assert status == 0
        assert exited_after < drain + 6
        output = server.output()
        assert "Traceback" not in output, output[-3000:]
    finally:
        for sock in (half_head, half_body):
            if sock is not None:
                sock.close()
        server.stop()
    endings = []
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]  # each one whole
        if "error" in events[-1]:
            assert events[-1]["error"]["type"] == "service_unavailable" and SHUTTING_DOWN in events[-1]["error"][
                "message"]
            endings.append("error")
        else:
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            endings.append("finished")
    assert endings[:8] == ["finished"] * 8, endings  # 3 tokens to go at the signal: within the drain at any load
    assert "error" in endings[8:], endings  # 490 tokens take far longer
    assert whole.status_code == 503 and SHUTTING_DOWN in whole.json()["error"]["message"]
    for answer in (head_answer, body_answer):  # requests still arriving: at the signal, or at the drain timeout
        assert SHUTTING_DOWN in openai_error(answer, 503)["message"]


# An asyncio server that never closes a connection, with fabrik's accept-error handler, under a file limit of 32.
_NO_CAP_SERVER = """
import asyncio, logging, sys
from fabrik.server.logs import AcceptErrorHandler

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorHandler(logging.getLogger("accept")))
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, backlog=64)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3)

asyncio.run(main())
"""


def test_accept_errors_out_of_descriptors_are_logged_once_per_interval():
    """asyncio alone logs thousands of tracebacks a second here; with the handler, one line in 3 s."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))  # noqa: E731
    process = subprocess.Popen([sys.executable, "-c", _NO_CAP_SERVER], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    try:
        port = int(process.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(48)]
        _, stderr = process.communicate(timeout=30)
        for client in clients:
            client.close()
    finally:
        process.kill()
        process.wait()
    assert stderr.count("accepting a connection failed (Too many open files)") == 1, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr) < 1000


@pytest.mark.parametrize("field_name,value", [
    ("max_connections", 0), ("max_connections", True), ("idle_timeout_seconds", 0), ("header_timeout_seconds", -1),
    ("body_timeout_seconds", float("inf")), ("body_timeout_seconds", "30"), ("drain_timeout_seconds", -0.5),
    ("drain_timeout_seconds", float("nan")),
])
def test_server_config_refuses_bad_timeouts_and_caps(field_name, value):
    with pytest.raises(ValueError, match=rf"^{field_name} \({re.escape(repr(value))}\)"):
        ServerConfig(**{field_name: value})
    assert ServerConfig(drain_timeout_seconds=0).drain_timeout_seconds == 0  # end every stream at once
