"""Micro-benchmark of the native paged attention kernels (fabrik/kernels/csrc/attention*.c), outside the engine.

Three measurements, for the bf16 and the int8 KV cache, each against a plain read of the same bytes so that the figures can be read as fractions of
what the memory gives:

  decode   one new token per sequence: B sequences x `--ctx` cached keys x 28 layers x 8 KV heads (G = 2, head_dim
           128, blocks of 64 as the engine's default, shuffled), each layer with its own cache and 40 MB of other
           reads between layers (untimed, as a layer's weights) so that K/V come from DRAM as in a real step; ns per (key, KV head) and GB/s of K/V, with 2 threads, the work split as the native
           forward splits it (each thread one run of (sequence, KV head) pairs, a sequence's heads in one item), and
           split as before stop 13 (one item per (sequence, KV head), dynamically scheduled).
  stream   the same K/V rows read through the same block tables with the same prefetching and no math: the limit of
           the access pattern.
  tile     a 16-token prefill tile against the decode kernel run token by token on the same L2-resident work (one
           KV head, --ctx keys): ns per (key, KV head).

A small C driver is compiled with the library's flags against the kernel sources on each run (a few seconds).
Usage: ``python bench/attention.py [--batch 1 16] [--ctx 640] [--repeats 5]``; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fabrik.kernels.native import CFLAGS, SOURCE_DIR  # noqa: E402

_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#include <immintrin.h>
#include "attention.h"
#include "fabrik.h"

enum { L = 28, H = 8, G = 2, D = 128, BS = 64, PREFETCH = 24 };
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

/* The decode kernel's access pattern without its math: K and V rows through the block table, same prefetching. */
static void stream_item(const attn_item *it) {
    __m512i acc = _mm512_setzero_si512();
    long row = it->int8 ? D : 2 * D;
    for (int t0 = 0; t0 < it->n_keys; t0 += BS) {
        const char *K = it->k0 + it->table[t0 / BS] * it->block_stride, *V = K + it->v_offset;
        for (int i = 0; i < BS && t0 + i < it->n_keys; i += 4) {
            int p = t0 + i + PREFETCH;
            if (p < it->n_keys) {
                const char *k = it->k0 + it->table[p / BS] * it->block_stride + (p % BS) * row;
                for (int b = 0; b < 4 * row; b += 64) {
                    __builtin_prefetch(k + b, 0, 2);
                    __builtin_prefetch(k + it->v_offset + b, 0, 2);
                }
            }
            for (int r = 0; r < 4 * row; r += 64) {
                acc = _mm512_add_epi32(acc, _mm512_loadu_si512(K + i * row + r));
                acc = _mm512_add_epi32(acc, _mm512_loadu_si512(V + i * row + r));
            }
        }
    }
    it->out[0] = (uint16_t)_mm512_reduce_add_epi32(acc);
}

/* What a layer's weights do between two attentions in a step: 40 MB streamed through the caches (untimed). Without
 * it the layers' K/V (66 MB at 576 keys) partly hit in the 32 MB L3 from the previous repeat, and the kernel looked
 * ~10-15% faster than inside the engine. */
static char *weights;
static void between_layers(void) {
    const long n = 40L << 20;
    if (!weights) {
        weights = aligned_alloc(64, n);
        memset(weights, 1, n);
    }
#pragma omp parallel num_threads(2)
    {
        int me = omp_get_thread_num();
        __m512i acc = _mm512_setzero_si512();
        for (long i = me * n / 2; i < (me + 1) * n / 2; i += 64) acc = _mm512_add_epi32(acc, _mm512_load_si512(weights + i));
        if (_mm512_reduce_add_epi32(acc) == 1) weights[0] = 2; /* keeps the loads */
    }
}

static uint16_t rnd_bf16(void) { return f32_to_bf16(((float)rand() / RAND_MAX - 0.5f) * 4.0f); }

/* A cache of `regions` (block, head) regions for K and for V: random bf16 rows, or random int8 rows and scales. */
static char *make_cache(long regions, int int8) {
    long rb = attn_region_bytes(int8, BS, D);
    char *c = aligned_alloc(64, 2 * regions * rb);
    for (long r = 0; r < 2 * regions; r++) {
        char *reg = c + r * rb;
        if (!int8) {
            for (int i = 0; i < BS * D; i++) ((uint16_t *)reg)[i] = rnd_bf16();
            continue;
        }
        for (int i = 0; i < BS * D; i++) reg[i] = (char)(rand() % 255 - 127);
        for (int i = 0; i < BS; i++) ((float *)(reg + BS * D))[i] = 0.016f * (float)rand() / RAND_MAX;
    }
    return c;
}

static void decode(int B, int ctx, int repeats, int int8) {
    int nb = (ctx + BS - 1) / BS;
    long blocks = (long)B * nb + 1, region = attn_region_bytes(int8, BS, D), stride = H * region;
    char *cache[L];
    for (int l = 0; l < L; l++) cache[l] = make_cache(blocks * H, int8);
    int64_t *table = malloc(sizeof(int64_t) * blocks);
    for (long i = 0; i < blocks; i++) table[i] = i;
    for (long i = blocks - 1; i > 0; i--) { long j = rand() % (i + 1); int64_t t = table[i]; table[i] = table[j]; table[j] = t; }
    uint16_t *q = malloc((size_t)B * H * G * D * 2), *out = malloc((size_t)B * H * G * D * 2);
    for (long i = 0; i < (long)B * H * G * D; i++) q[i] = rnd_bf16();
    double bytes = (double)L * B * H * ctx * 2 * (int8 ? D + 4 : 2 * D), best[3] = {1e9, 1e9, 1e9};
    for (int r = 0; r < repeats; r++)
        for (int variant = 0; variant < 3; variant++) { /* interleaved: engine's items, one head per item, stream */
            double t = 0;
            for (int l = 0; l < L; l++) {
                between_layers();
                double t0 = now();
                if (variant == 0) { /* as the native forward: the (sequence, head) pairs in two even runs */
#pragma omp parallel num_threads(2)
                    {
                        int me = omp_get_thread_num(), nt = omp_get_num_threads();
                        int lo = B * H * me / nt, hi = B * H * (me + 1) / nt;
                        for (int pair = lo; pair < hi;) {
                            int s = pair / H, h = pair % H, nh = H - h < hi - pair ? H - h : hi - pair;
                            attn_item it = {.q = q + (long)pair * G * D, .out = out + (long)pair * G * D,
                                            .k0 = cache[l] + h * region, .table = table + (long)s * nb,
                                            .block_stride = stride, .v_offset = blocks * stride, .n_keys = ctx,
                                            .G = G, .D = D, .bs = BS, .int8 = int8, .scale = 0.088f, .n_heads = nh};
                            fabrik_attend(&it);
                            pair += nh;
                        }
                    }
                    t += now() - t0;
                    continue;
                }
#pragma omp parallel for num_threads(2) schedule(dynamic, 1)
                for (int item = 0; item < B * H; item++) {
                    int s = item / H, h = item % H;
                    attn_item it = {.q = q + (long)item * G * D, .out = out + (long)item * G * D,
                                    .k0 = cache[l] + h * region, .table = table + (long)s * nb,
                                    .block_stride = stride, .v_offset = blocks * stride, .n_keys = ctx, .G = G,
                                    .D = D, .bs = BS, .int8 = int8, .scale = 0.088f, .n_heads = 1};
                    if (variant == 1) fabrik_attend(&it); else stream_item(&it);
                }
                t += now() - t0;
            }
            if (t < best[variant]) best[variant] = t;
        }
    printf("decode %s B=%-3d ctx=%d: %7.2f ms per step, %5.1f GB/s, %5.1f ns per (key, KV head) per thread | "
           "one head per item: %7.2f ms, %5.1f GB/s | stream only: %7.2f ms, %5.1f GB/s\n", int8 ? "int8" : "bf16", B,
           ctx, best[0] * 1e3, bytes / best[0] / 1e9, best[0] * 1e9 * 2 / ((double)L * B * H * ctx), best[1] * 1e3,
           bytes / best[1] / 1e9, best[2] * 1e3, bytes / best[2] / 1e9);
    for (int l = 0; l < L; l++) free(cache[l]);
    free(table), free(q), free(out);
}

static void tile(int ctx, int repeats, int int8) {
    int nq = fabrik_tile_tokens(G, D), nb = (ctx + nq + BS - 1) / BS + 1;
    if (nq == 0) { printf("tile: no tile kernel on this CPU\n"); return; }
    long region = attn_region_bytes(int8, BS, D);
    char *cache = make_cache(nb, int8);
    uint16_t *q = malloc((size_t)nq * G * D * 2), *o = malloc((size_t)nq * G * D * 2);
    for (long i = 0; i < (long)nq * G * D; i++) q[i] = rnd_bf16();
    int64_t *table = malloc(sizeof(int64_t) * nb);
    for (int i = 0; i < nb; i++) table[i] = i;
    attn_tile tl = {.item = {.q = q, .out = o, .k0 = cache, .table = table, .block_stride = region,
                             .v_offset = nb * region, .n_keys = ctx, .G = G, .D = D, .bs = BS, .int8 = int8,
                             .scale = 0.088f, .n_heads = 1},
                    .q_stride = G * D, .out_stride = G * D, .n_q = nq};
    int calls = 200;
    double best[2] = {1e9, 1e9};
    for (int r = 0; r < repeats; r++) {
        double t = now();
        for (int c = 0; c < calls; c++) fabrik_attend_tile(&tl);
        t = now() - t;
        if (t < best[0]) best[0] = t;
        t = now();
        for (int c = 0; c < calls; c++)
            for (int i = 0; i < nq; i++) {
                attn_item it = tl.item;
                it.q = q + (long)i * G * D, it.out = o + (long)i * G * D, it.n_keys = ctx + i;
                fabrik_attend(&it);
            }
        t = now() - t;
        if (t < best[1]) best[1] = t;
    }
    double kh = (double)calls * nq * (ctx + nq / 2.0);
    printf("tile   %s %d tokens, ctx=%d, L2-resident, 1 thread: tile %.2f ns per (key, KV head), decode kernel per "
           "token %.2f\n", int8 ? "int8" : "bf16", nq, ctx, best[0] / kh * 1e9, best[1] / kh * 1e9);
    free(cache), free(q), free(o), free(table);
}

int main(int argc, char **argv) {
    int ctx = atoi(argv[1]), repeats = atoi(argv[2]);
    for (int i = 3; i < argc; i++)
        for (int int8 = 0; int8 < 2; int8++) decode(atoi(argv[i]), ctx, repeats, int8);
    for (int int8 = 0; int8 < 2; int8++) tile(ctx < 256 ? ctx : 256, repeats, int8);
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="sequences per decode step")
    parser.add_argument("--ctx", type=int, default=640, help="cached keys per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many (interleaved) runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        driver, exe = Path(tmp) / "driver.c", Path(tmp) / "attention_bench"
        driver.write_text(_DRIVER)
        sources = [str(SOURCE_DIR / name) for name in ("attention.c", "attention_int8.c", "attention_prefill.c")]
        flags = [f for f in CFLAGS if f not in ("-shared", "-fPIC")]
        subprocess.run(["gcc", *flags, f"-I{SOURCE_DIR}", "-o", str(exe), str(driver), *sources, "-lm"], check=True)
        subprocess.run([str(exe), str(args.ctx), str(args.repeats), *map(str, args.batch)], check=True)


if __name__ == "__main__":
    main()
