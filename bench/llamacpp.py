"""llama.cpp as a peer: build it from the llama-cpp-python source distribution, convert checkpoints, run its tools.

Layout of the cache (``~/.cache/fabrik/llama.cpp/<version>/``, or ``$FABRIK_CACHE/llama.cpp/<version>/``)::

    src/                  the unpacked sdist (llama.cpp itself is src/vendor/llama.cpp)
    build/                the cmake build tree
    bin/                  llama-bench, llama-server, llama-quantize (copied out of build/ when the build succeeded)
    build-info.json       version, cmake flags, llama.cpp commit; present only after a complete build

A complete build is reused; delete the version folder to rebuild. The build takes ~15-25 minutes on 2 cores.

GGUF conversion uses the ``convert_hf_to_gguf.py`` shipped in the same sdist. It needs the ``gguf`` package (installed
from the sdist's ``vendor/llama.cpp/gguf-py``) and ``sentencepiece`` in the running interpreter; NOTE: the sdist's
requirements file is deliberately not installed (it pins torch and transformers versions of its own).

Usage: ``python bench/llamacpp.py source`` (download and unpack the sdist, print the llama.cpp folder),
``python bench/llamacpp.py build`` (build or reuse, print the bin folder) or
``python bench/llamacpp.py gguf CKPT OUT_DIR`` (write BF16, Q8_0 and Q4_0 GGUFs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
CACHE_ROOT = Path(os.environ.get("FABRIK_CACHE", Path.home() / ".cache" / "fabrik")) / "llama.cpp"
TARGETS = ("llama-bench", "llama-server", "llama-quantize")
GGUF_TYPES = ("BF16", "Q8_0", "Q4_0")
"""Weight formats compared, as llama-quantize names them."""
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    # NOTE: no HTTPS, no web UI download, no tests or examples: the benchmark needs three tools and no network.
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
)


def cache_dir(version: str = VERSION) -> Path:
    return CACHE_ROOT / version


def llama_src(version: str = VERSION) -> Path:
    return cache_dir(version) / "src" / "vendor" / "llama.cpp"


def bin_dir(version: str = VERSION) -> Path:
    return cache_dir(version) / "bin"


def build_info(version: str = VERSION) -> dict[str, Any] | None:
    """The record of a complete build, or None when there is none."""
    path = cache_dir(version) / "build-info.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def fetch_source(version: str = VERSION) -> Path:
    """Downloads and unpacks the sdist with pip (the project's ordinary registry client) unless already unpacked."""
    root = cache_dir(version)
    if (llama_src(version) / "CMakeLists.txt").is_file():
        return llama_src(version)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(root / "src", ignore_errors=True)
        (Path(tmp) / f"llama_cpp_python-{version}").rename(root / "src")
    return llama_src(version)


def build(version: str = VERSION, jobs: int | None = None) -> Path:
    """Builds llama-bench, llama-server and llama-quantize once; returns the folder holding them."""
    info = build_info(version)
    if info is not None and all((bin_dir(version) / t).is_file() for t in TARGETS):
        return bin_dir(version)
    src = fetch_source(version)
    root = cache_dir(version)
    build_tree = root / "build"
    t0 = time.monotonic()
    _log(f"building {', '.join(TARGETS)} from llama-cpp-python {version} in {build_tree} (15-25 min on 2 cores)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_tree), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_tree), "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
    bins = bin_dir(version)
    bins.mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_tree / "bin" / target, bins / target)
    info = {"llama_cpp_python": version, "llama_cpp": version_string(version), "cmake_flags": list(CMAKE_FLAGS),
            "build_seconds": round(time.monotonic() - t0, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (root / "build-info.json").write_text(json.dumps(info, indent=2))
    _log(f"built in {info['build_seconds']:.0f} s")
    return bins


def version_string(version: str = VERSION) -> str:
    """``llama-bench --version`` output (its ``version: N (commit)`` line), for the report."""
    out = subprocess.run([str(bin_dir(version) / "llama-bench"), "--version"], capture_output=True, text=True,
                         timeout=30)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0].removeprefix("version:").strip() if lines else f"llama-cpp-python {version}"


def convert(checkpoint: str | Path, out_dir: str | Path, types: tuple[str, ...] = GGUF_TYPES,
            version: str = VERSION) -> dict[str, Path]:
    """Converts the checkpoint to BF16 GGUF, then quantizes it to the other ``types``; reuses existing files.

    Returns:
        Weight format -> GGUF file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = out / "model-BF16.gguf"
    if not bf16.is_file():
        _log(f"converting {checkpoint} to {bf16}")
        tmp = bf16.with_suffix(".tmp")
        env = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the gguf package installed from the same sdist
        subprocess.run([sys.executable, str(llama_src(version) / "convert_hf_to_gguf.py"), str(checkpoint),
                        "--outtype", "bf16", "--outfile", str(tmp)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(bf16)
    files = {"BF16": bf16}
    for qtype in types:
        if qtype == "BF16":
            continue
        path = out / f"model-{qtype}.gguf"
        if not path.is_file():
            _log(f"quantizing to {qtype}")
            tmp = path.with_suffix(".tmp")
            subprocess.run([str(bin_dir(version) / "llama-quantize"), str(bf16), str(tmp), qtype, "2"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(path)
        files[qtype] = path
    return {t: files[t] for t in types}


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of every tensor in a GGUF: the bytes read per decoded token (the tied token_embd is the LM head)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def run_bench(gguf: str | Path, threads: int, n_prompt: int, n_gen: int, repetitions: int,
              version: str = VERSION, timeout: float = 1800.0, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``llama-bench -p N_PROMPT -n N_GEN -d 0,N_PROMPT`` (each test ``repetitions`` times).

    The ppN test is taken on an empty cache, like a fresh prompt; the tgN test after N_PROMPT tokens of context
    (``-d``), like the other engines' decode after their N_PROMPT-token prompt: a tg test on an empty cache reads
    no KV cache and would flatter llama.cpp against engines that decode after a prompt. Its empty-cache rate is kept
    as ``tg_depth0_tokens_per_s``. ``extra`` is appended to the command (e.g. the KV cache type).

    Returns:
        ``{"pp_tokens_per_s", "tg_tokens_per_s", "pp_stddev", "tg_stddev", "tg_depth0_tokens_per_s", "command",
        "raw"}``.
    """
    command = [str(bin_dir(version) / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt),
               "-n", str(n_gen), "-d", f"0,{n_prompt}", "-r", str(repetitions), "-o", "json", *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout).stdout
    rows = json.loads(out)
    result: dict[str, Any] = {"command": command, "raw": rows}
    for row in rows:
        depth = row.get("n_depth", 0)
        if row["n_prompt"] > 0 and row["n_gen"] == 0 and depth == 0:
            result["pp_tokens_per_s"], result["pp_stddev"] = row["avg_ts"], row["stddev_ts"]
        elif row["n_gen"] > 0 and depth == n_prompt:
            result["tg_tokens_per_s"], result["tg_stddev"] = row["avg_ts"], row["stddev_ts"]
        elif row["n_gen"] > 0 and depth == 0:
            result["tg_depth0_tokens_per_s"] = row["avg_ts"]
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One process serving HTTP on 127.0.0.1: started, polled until ``/health`` answers 200, stopped by its pid.

    Args:
        command: The command; it must bind 127.0.0.1 and ``port``.
        port: The port in ``command``.
        log_path: File receiving the process's stdout and stderr.
        env: Extra environment variables.
        startup_timeout: Seconds to wait for health.
    """

    def __init__(self, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout: float = 300.0) -> None:
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        log = open(self.log_path, "w")
        # NOTE: its own session, so stop() can signal the server and any child it forks, by the process group id.
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.command[0]} was not healthy after {self.startup_timeout:.0f} s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def server(gguf: str | Path, threads: int, slots: int, ctx_per_slot: int, log_path: Path,
           version: str = VERSION, extra: tuple[str, ...] = ()) -> Server:
    """A ``llama-server`` with ``slots`` parallel sequences of ``ctx_per_slot`` tokens each, on a free port
    (``extra``: more options, e.g. the KV cache type)."""
    port = free_port()
    command = [str(bin_dir(version) / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
               "--no-webui", "--metrics", *extra]
    return Server(command, port, log_path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["source"]:
        print(fetch_source())
        return 0
    if args[:1] == ["build"]:
        print(build())
        return 0
    if args[:1] == ["gguf"] and len(args) == 3:
        build()
        for qtype, path in convert(args[1], args[2]).items():
            print(f"{qtype} {path} {gguf_weight_bytes(path) / 1e9:.3f} GB")
        return 0
    print(__doc__.split("Usage: ", 1)[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
