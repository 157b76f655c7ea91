"""Run a real ``fabrik serve`` process for tests: a free port on 127.0.0.1, wait for /health, kill at the end.

Loading torch and a model takes seconds, so test modules share servers: ``shared_server(request, name, ...)``
starts one per ``name`` for the whole session and stops it when the session ends.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-fabrik-test"
_STARTUP_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fabrik_command() -> list[str]:
    script = Path(sys.executable).with_name("fabrik")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "fabrik.entrypoints.cli"]


class ServerProcess:
    """One ``fabrik serve MODEL ARGS...`` subprocess.

    Args:
        model: The model folder (None: serve the default demo model).
        args: Extra command-line arguments.
        api_key: Passed as --api-key (None: no key).
        file_limit: RLIMIT_NOFILE of the server process (None: this process's).
        env: Environment variables to set for the server process, over this process's.
    """

    def __init__(self, model: str | Path | None, *args: str, api_key: str | None = API_KEY,
                 file_limit: int | None = None, env: dict[str, str] | None = None) -> None:
        self.model = None if model is None else str(model)
        self.file_limit = file_limit
        self.env = dict(env or {})
        self.port = free_port()
        self.api_key = api_key
        self.args = [*args, *(("--api-key", api_key) if api_key else ())]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fabrik-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        model = [] if self.model is None else [self.model]  # None: the server's default (demo) model
        command = [*_fabrik_command(), "serve", *model, "--host", "127.0.0.1", "--port", str(self.port),
                   *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("FABRIK_API_KEY", None)
        limit = self.file_limit
        lower = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, preexec_fn=lower)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fabrik serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fabrik serve did not become healthy in {_STARTUP_TIMEOUT}s:\n{self.output()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    # -- clients -------------------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kwargs):
        """The official openai client, without retries (a retried 5xx would hide a bug)."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kwargs)

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {name: value} for the unlabelled-by-reason samples (histograms as _sum/_count)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        values: dict[str, float] = {}
        for match in re.finditer(r"^(fabrik_\w+)\{([^}]*)\} (\S+)$", text, re.M):
            name, labels, value = match.groups()
            extra = [p for p in labels.split(",") if not p.startswith("model_name=")]
            key = name if not extra else f"{name}{{{','.join(extra)}}}"
            values[key] = float(value)
        return values


_SERVERS: dict[str, ServerProcess] = {}


def shared_server(request: pytest.FixtureRequest, name: str, model: str | Path, *args: str,
                  api_key: str | None = API_KEY, env: dict[str, str] | None = None) -> ServerProcess:
    """The session's server called ``name``, started on first use and stopped when the session ends."""
    server = _SERVERS.get(name)
    if server is None or not server.alive:
        server = ServerProcess(model, *args, api_key=api_key, env=env).start()
        _SERVERS[name] = server
        request.config.add_cleanup(server.stop)
    return server


# The server most tests share: the tiny random Qwen3 with the real tokenizer. max_num_seqs 2 and 4 waiting
# requests make the queue-overflow test cheap; nothing else sends more than one request at a time.
RANDOM_SERVER_ARGS = ("--max-model-len", "256", "--kv-cache-memory", "8MiB", "--max-num-seqs", "2",
                      "--max-waiting-requests", "4", "--served-model-name", "tiny-qwen3")


def random_server(request: pytest.FixtureRequest, checkpoint: Path) -> ServerProcess:
    return shared_server(request, "random", checkpoint, *RANDOM_SERVER_ARGS)
