"""Memory read bandwidth of this machine: a streaming read of a 1 GiB array with every benchmark thread.

The decode roofline of a model is ``bandwidth / bytes of weights read per token``, so the benchmark needs an honest
read bandwidth measured right beside each figure (it swings ~1.6x within minutes on our virtual machines; see
/work/shared/PERF-NOTES.md).

How: a tiny C program, compiled on first use with ``gcc -O3 -march=native -fopenmp`` and cached in
``~/.cache/fabrik/bench/``. It allocates the array once and touches every page before timing (first touch runs at
~4 GB/s in our VMs and is not a read), then each pass sums the whole array with ``OMP_NUM_THREADS`` threads, each
reading one contiguous half. A pass reads 1 GiB, 32x the L3 cache, so the caches cannot serve it.

``python bench/bandwidth.py --compare`` also times ``torch.Tensor.sum`` on the same amount of memory, to show the
C reader is the faster (so the honest) one: the roofline must be an upper bound.

Usage: ``python bench/bandwidth.py [--passes N] [--mib SIZE] [--compare] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHE_DIR = Path(os.environ.get("FABRIK_CACHE", Path.home() / ".cache" / "fabrik")) / "bench"
DEFAULT_MIB = 1024
DEFAULT_PASSES = 7

_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    int passes = argc > 2 ? atoi(argv[2]) : 7;
    size_t n = mib * 1024 * 1024 / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) { fprintf(stderr, "cannot allocate %zu MiB\n", mib); return 1; }
    /* First touch by the threads that will read, so every page is mapped before timing. */
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    int threads = omp_get_max_threads();
    printf("{\"mib\": %zu, \"threads\": %d, \"gbps\": [", mib, threads);
    float total = 0.0f;
    for (int p = 0; p < passes; p++) {
        float sum = 0.0f;
        double t0 = now();
        /* 64 accumulators = four independent AVX-512 add chains, so the adds never limit the read. */
        #pragma omp parallel reduction(+:sum)
        {
            float acc[64] = {0};
            #pragma omp for schedule(static) nowait
            for (size_t i = 0; i < n; i += 64)
                for (int j = 0; j < 64; j++) acc[j] += a[i + j];
            for (int j = 0; j < 64; j++) sum += acc[j];
        }
        double dt = now() - t0;
        total += sum;
        printf("%s%.3f", p ? ", " : "", n * sizeof(float) / dt / 1e9);
    }
    printf("], \"checksum\": %g}\n", (double)total);
    free(a);
    return 0;
}
"""


def _binary() -> Path:
    """Compiles the reader once per source version and machine flags; later calls reuse the binary."""
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    exe = CACHE_DIR / f"stream-read-{digest}"
    if not exe.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        src = exe.with_suffix(".c")
        src.write_text(_SOURCE)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(tmp), str(src)], check=True)
        tmp.rename(exe)
    return exe


def measure(threads: int = 2, mib: int = DEFAULT_MIB, passes: int = DEFAULT_PASSES) -> dict[str, Any]:
    """Streams ``mib`` MiB ``passes`` times with ``threads`` OpenMP threads.

    Returns:
        ``{"gbps": best pass, "gbps_median": ..., "gbps_passes": [...], "threads", "mib", "time"}``; the roofline uses
        the best pass, the rate the memory demonstrably reached in this window.
    """
    if threads < 1 or mib < 1 or passes < 1:
        raise ValueError(f"threads ({threads}), mib ({mib}) and passes ({passes}) must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
    out = subprocess.run([str(_binary()), str(mib), str(passes)], env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout
    raw = json.loads(out)
    rates = raw["gbps"]
    return {"gbps": max(rates), "gbps_median": statistics.median(rates), "gbps_passes": rates,
            "threads": raw["threads"], "mib": mib, "time": time.time()}


def measure_torch(threads: int = 2, mib: int = DEFAULT_MIB, passes: int = DEFAULT_PASSES) -> dict[str, Any]:
    """The same read done by ``torch.Tensor.sum`` (float32), for comparison with :func:`measure`."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)
    a.sum()
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        a.sum()
        rates.append(a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"gbps": max(rates), "gbps_median": statistics.median(rates), "gbps_passes": rates, "threads": threads,
            "mib": mib, "time": time.time()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=DEFAULT_MIB)
    parser.add_argument("--passes", type=int, default=DEFAULT_PASSES)
    parser.add_argument("--compare", action="store_true", help="also time torch.Tensor.sum on the same bytes")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    result = {"c": measure(args.threads, args.mib, args.passes)}
    if args.compare:
        result["torch"] = measure_torch(args.threads, args.mib, args.passes)
        result["c_after"] = measure(args.threads, args.mib, args.passes)
    for name, r in result.items():
        print(f"{name:8s} best {r['gbps']:6.2f} GB/s  median {r['gbps_median']:6.2f} GB/s  "
              f"({r['threads']} threads, {r['mib']} MiB x {len(r['gbps_passes'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
