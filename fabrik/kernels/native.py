"""Builds, caches and loads the native kernel library (``csrc/*.c``) with ctypes.

The library is plain C with OpenMP and no torch headers. It is compiled on first use with the system C compiler into
``$FABRIK_KERNEL_CACHE/<key>/libfabrik_kernels.so`` (default ``~/.cache/fabrik/kernels``); the key hashes the
sources, the compiler's version, the flags and the CPU's flags (``-march=native`` code must not run on another CPU).
Two processes building at once take a file lock; the library is written under a temporary name and renamed into
place, so a reader never sees half a file. ``python -m fabrik.kernels.build`` runs the same build ahead of time.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
LIBRARY_NAME = "libfabrik_kernels.so"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
ABI_VERSION = 10

ISA_AVX512 = 1
"""AVX-512 F/BW/VL + BF16 + VNNI kernels (``isa`` field of the C layer descriptor)."""
ISA_AVX2 = 2
"""AVX2 + FMA + F16C kernels."""

X_BF16 = 1
"""Call flag: x is bfloat16 (else float32)."""
OUT_BF16 = 2
"""Call flag: the output is bfloat16 (else float32)."""


class KernelBuildError(RuntimeError):
    """The native library could not be compiled or loaded."""


class LinearDescriptor(ctypes.Structure):
    """Mirror of ``fabrik_linear`` in csrc/fabrik.h: one packed layer, filled once, passed by address."""

    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("kp", ctypes.c_int32),
        ("nblocks", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("isa", ctypes.c_int32),
        ("group", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class NativeLibrary:
    """The loaded library and its entry points (ctypes function objects, argument types set once)."""

    path: Path
    cdll: ctypes.CDLL
    linear_bf16: ctypes._CFuncPtr
    """int (descriptor*, x*, M, out*, flags, argmax*) -> 0, or -1 when out of memory; argmax: NULL, or (M,) int64 that
    receives each row's argmax of a float32 out (lowest index on ties, -1 for a row with NaN)."""
    linear_int8: ctypes._CFuncPtr
    """Same signature as ``linear_bf16``, for int8-packed layers."""
    linear_int4: ctypes._CFuncPtr
    """Same signature as ``linear_bf16``, for int4-packed layers."""
    stream_read: ctypes._CFuncPtr
    """uint64 (data*, nbytes, nthreads): sums the bytes' 64-bit words; the bandwidth reference."""
    forward: ctypes._CFuncPtr
    """int (model*, batch*, out*): the decoder stack of one step (csrc/forward.c); 0, or a negative error code."""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when it cannot be read, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def best_isa(flags: frozenset[str]) -> int | None:
    """The fastest kernel set the CPU runs: ``ISA_AVX512``, ``ISA_AVX2``, or None (use torch)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma"} <= flags:
        return ISA_AVX512
    if {"avx2", "fma", "f16c"} <= flags:
        return ISA_AVX2
    return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cache_root() -> Path:
    override = os.environ.get("FABRIK_KERNEL_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "fabrik" / "kernels"


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for source in sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"C compiler {compiler!r} does not run: {exc}") from exc
    digest.update(version.encode())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    return digest.hexdigest()[:16]


def build(force: bool = False) -> Path:
    """Compiles the library into the cache unless it is already there, and returns its path.

    Raises:
        KernelBuildError: No C compiler, or the compiler failed (its output is in the message).
    """
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    folder = _cache_root() / _build_key(compiler)
    target = folder / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and not force:
            return target  # another process built it while we waited
        fd, tmp = tempfile.mkstemp(prefix=LIBRARY_NAME, suffix=".tmp", dir=folder)
        os.close(fd)
        sources = [str(s) for s in sorted(SOURCE_DIR.glob("*.c"))]
        cmd = [compiler, *CFLAGS, "-o", tmp, *sources, "-lm"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            os.unlink(tmp)
            raise KernelBuildError(f"{' '.join(cmd)} failed: {exc}") from exc
        if result.returncode != 0:
            os.unlink(tmp)
            raise KernelBuildError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
        os.replace(tmp, target)
    logger.info("built native kernels: %s", target)
    return target


def _load(path: Path) -> NativeLibrary:
    cdll = ctypes.CDLL(str(path))
    if cdll.fabrik_abi_version() != ABI_VERSION:
        raise KernelBuildError(f"{path} has ABI version {cdll.fabrik_abi_version()}, expected {ABI_VERSION}")
    call = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
    functions = {}
    for name in ("linear_bf16", "linear_int8", "linear_int4"):
        fn = getattr(cdll, f"fabrik_{name}")
        fn.argtypes = call
        fn.restype = ctypes.c_int
        functions[name] = fn
    stream = cdll.fabrik_stream_read
    stream.argtypes = (ctypes.c_void_p, ctypes.c_long, ctypes.c_int)
    stream.restype = ctypes.c_uint64
    forward = cdll.fabrik_forward
    forward.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    forward.restype = ctypes.c_int
    return NativeLibrary(path=path, cdll=cdll, stream_read=stream, forward=forward, **functions)


@lru_cache(maxsize=1)
def load_library() -> NativeLibrary:
    """Builds (if needed) and loads the library once per process.

    Raises:
        KernelBuildError: The build or the load failed.
    """
    # NOTE: torch ships its own libgomp.so.1; importing torch first makes the loader reuse it, so torch and the
    # kernels share one OpenMP thread pool instead of two pools spinning against each other on the same cores.
    import torch  # noqa: F401

    try:
        return _load(build())
    except OSError as exc:
        raise KernelBuildError(f"cannot load the native kernels: {exc}") from exc
