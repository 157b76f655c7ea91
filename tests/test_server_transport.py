"""Connections against a real ``fabrik serve`` (the demo model): an access log without client secrets.

Raw sockets send what httpx refuses to.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from server_utils import ServerProcess


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(None).start()
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


def test_access_log_has_no_query_string_and_cuts_long_paths(server):
    secret = "sk-secret-in-the-query-string"
    with server.http() as http:
        assert http.get(f"/v1/models?api_key={secret}").status_code == 200
        assert http.get(f"/v1/models/{'m' * 10_000}?api_key={secret}").status_code == 404
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # httpx refuses URLs over 64 KiB
        sock.sendall(f"GET /v1/models/{'h' * 100_000}?api_key={secret} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {server.api_key}\r\nConnection: close\r\n\r\n".encode())
        huge = read_until_closed(sock)
    # 400 when h11's 16 KiB buffer fills before the whole head is in, else the route's 404
    assert huge[9:12] in (b"404", b"400")
    time.sleep(0.5)  # the access line is written once the response has been sent
    output = server.output()
    assert secret not in output
    assert max(len(line) for line in output.splitlines()) < 400
    assert re.search(r"GET /v1/models 200 \d+\.\d+s", output)
    assert re.search(r"GET /v1/models/m{100,}\.\.\. 404 ", output)
