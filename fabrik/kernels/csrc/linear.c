/* Native linear layers (y = x W^T + b) for bf16 weights on x86-64 CPUs (int8 / int4: linear_quant.c).
 *
 * Plain C, no torch headers: Python loads the shared library with ctypes (fabrik/kernels/native.py).
 * Each kernel exists in an AVX-512 (BF16 + VNNI) and an AVX2 + FMA variant, both compiled into the same library
 * with per-function target attributes; Python picks one from the CPU flags.
 *
 * Weight layouts (built by fabrik/kernels/linear.py; N rows padded to a multiple of 16, see docs/kernels.md):
 *
 *   bf16: blocks of 16 rows; inside a block, K pairs:   [p][row 0..15][2 x bf16]   (64 bytes per pair p)
 *         one 64-byte load feeds `vdpbf16ps` for 16 rows; a block is K * 32 bytes, read front to back.
 *
 * Threads split the blocks into contiguous ranges, so each thread reads one sequential stream; each loaded weight
 * block is used for up to MT rows of x before moving on (the block stays in L1/L2 for the next MT rows).
 */
#include "linear_avx2.h"

int fabrik_abi_version(void) { return FABRIK_ABI_VERSION; }

/* ---------------------------------------------------------------------------------------------------------------
 * bf16, AVX-512 BF16
 * ------------------------------------------------------------------------------------------------------------- */
/* MT rows of x (bf16 pairs, stride xs pairs) against one block; fully unrolled over MT by the caller's constant. */
INLINE512 void bf16_tile_avx512(const fabrik_linear *L, const uint16_t *blk, const uint32_t *xp, int xs, int MT,
                                void *out, int flags, int m0, int n0) {
    int P = L->kp / 2;
    __m512 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        /* Batched tiles are compute-heavy per line: the hardware prefetcher alone falls behind (PERF-NOTES). */
        _mm_prefetch((const char *)(blk + (long)(p + PREFETCH_LINES) * 32), _MM_HINT_T0);
        __m512bh w = (__m512bh)_mm512_loadu_si512(blk + (long)p * 32);
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_set1_epi32((int)xp[(long)i * xs + p]));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) store16_avx512(L, acc[i], out, flags, m0 + i, n0);
}

/* Two adjacent blocks (32 rows) against MT rows of x: each broadcast x pair feeds two vdpbf16ps, so a batch reads
 * 10 vectors per 16 products instead of 9 per 8 (the loads, not the multiplies, bound the one-block tile). */
INLINE512 void bf16_tile2_avx512(const fabrik_linear *L, const uint16_t *blk, long block_elems, const uint32_t *xp,
                                 int xs, int MT, void *out, int flags, int m0, int n0, next_prefetch pf) {
    int P = L->kp / 2;
    const uint16_t *blk1 = blk + block_elems;
    __m512 acc0[8], acc1[8];
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        prefetch_step(&pf);
        _mm_prefetch((const char *)(blk + (long)(p + PREFETCH_LINES) * 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk1 + (long)(p + PREFETCH_LINES) * 32), _MM_HINT_T0);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(blk + (long)p * 32);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(blk1 + (long)p * 32);
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) {
            __m512bh x = (__m512bh)_mm512_set1_epi32((int)xp[(long)i * xs + p]);
            acc0[i] = _mm512_dpbf16_ps(acc0[i], w0, x);
            acc1[i] = _mm512_dpbf16_ps(acc1[i], w1, x);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) {
        store16_avx512(L, acc0[i], out, flags, m0 + i, n0);
        store16_avx512(L, acc1[i], out, flags, m0 + i, n0 + ROWS);
    }
}

/* M = 1: four accumulators over p so that the vdpbf16ps latency chain does not bound the rate. */
INLINE512 void bf16_gemv_avx512(const fabrik_linear *L, const uint16_t *blk, const uint32_t *xp, void *out, int flags,
                                int n0) {
    int P = L->kp / 2, p = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; p + 4 <= P; p += 4) {
        const uint16_t *w = blk + (long)p * 32;
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_set1_epi32((int)xp[p]));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + 32), (__m512bh)_mm512_set1_epi32((int)xp[p + 1]));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + 64), (__m512bh)_mm512_set1_epi32((int)xp[p + 2]));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + 96), (__m512bh)_mm512_set1_epi32((int)xp[p + 3]));
    }
    for (; p < P; p++)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(blk + (long)p * 32),
                              (__m512bh)_mm512_set1_epi32((int)xp[p]));
    store16_avx512(L, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), out, flags, 0, n0);
}

/* lanes: NULL, or the argmax lanes (linear.h) of nthreads x M rows, folded as each thread stores its blocks. */
T512 static void bf16_run_avx512(const fabrik_linear *L, const uint32_t *xp, int M, void *out, int flags,
                                 lane_max *lanes) {
    const uint16_t *W = (const uint16_t *)L->weight;
    long block_elems = (long)ROWS * L->kp;
    int xs = L->kp / 2;
#pragma omp parallel num_threads(L->nthreads)
    {
        int b0, b1;
        thread_blocks(L->nblocks, &b0, &b1);
        lane_max *mine = lanes ? lanes + (long)omp_get_thread_num() * M : NULL;
        int folded = b0;
        for (int b = b0; b < b1; b++) {
            const uint16_t *blk = W + b * block_elems;
            if (M == 1) {
                bf16_gemv_avx512(L, blk, xp, out, flags, b * ROWS);
                fold_due_avx512(mine, (const float *)out, 1, L->n, &folded, b + 1, b1);
                continue;
            }
            if (M >= 4 && b + 1 < b1) { /* two blocks at a time: ~10% more GFLOP/s from M = 8 up */
                int tiles = (M + 7) / 8, ahead = b1 - (b + 2) < 2 ? b1 - (b + 2) : 2; /* the next pair of blocks */
                const char *next = ahead > 0 ? (const char *)(blk + 2 * block_elems) : NULL;
                for (int m = 0; m < M; m += 8) {
                    const uint32_t *x = xp + (long)m * xs;
                    next_prefetch pf = next_slice(next, ahead * block_elems * 2, tiles, m / 8, L->kp / 2);
                    switch (M - m < 8 ? M - m : 8) {
                    case 1: bf16_tile2_avx512(L, blk, block_elems, x, xs, 1, out, flags, m, b * ROWS, pf); break;
                    case 2: bf16_tile2_avx512(L, blk, block_elems, x, xs, 2, out, flags, m, b * ROWS, pf); break;
                    case 3: bf16_tile2_avx512(L, blk, block_elems, x, xs, 3, out, flags, m, b * ROWS, pf); break;
                    case 4: bf16_tile2_avx512(L, blk, block_elems, x, xs, 4, out, flags, m, b * ROWS, pf); break;
                    case 5: bf16_tile2_avx512(L, blk, block_elems, x, xs, 5, out, flags, m, b * ROWS, pf); break;
                    case 6: bf16_tile2_avx512(L, blk, block_elems, x, xs, 6, out, flags, m, b * ROWS, pf); break;
                    case 7: bf16_tile2_avx512(L, blk, block_elems, x, xs, 7, out, flags, m, b * ROWS, pf); break;
                    default: bf16_tile2_avx512(L, blk, block_elems, x, xs, 8, out, flags, m, b * ROWS, pf); break;
                    }
                }
                fold_due_avx512(mine, (const float *)out, M, L->n, &folded, b + 2, b1);
                b++;
                continue;
            }
            for (int m = 0; m < M; m += 8) {
                const uint32_t *x = xp + (long)m * xs;
                switch (M - m < 8 ? M - m : 8) {
                case 1: bf16_tile_avx512(L, blk, x, xs, 1, out, flags, m, b * ROWS); break;
                case 2: bf16_tile_avx512(L, blk, x, xs, 2, out, flags, m, b * ROWS); break;
                case 3: bf16_tile_avx512(L, blk, x, xs, 3, out, flags, m, b * ROWS); break;
                case 4: bf16_tile_avx512(L, blk, x, xs, 4, out, flags, m, b * ROWS); break;
                case 5: bf16_tile_avx512(L, blk, x, xs, 5, out, flags, m, b * ROWS); break;
                case 6: bf16_tile_avx512(L, blk, x, xs, 6, out, flags, m, b * ROWS); break;
                case 7: bf16_tile_avx512(L, blk, x, xs, 7, out, flags, m, b * ROWS); break;
                default: bf16_tile_avx512(L, blk, x, xs, 8, out, flags, m, b * ROWS); break;
                }
            }
            fold_due_avx512(mine, (const float *)out, M, L->n, &folded, b + 1, b1);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * bf16, AVX2 + FMA: the same layout; each 32-bit pair is split into its even (<< 16) and odd (& 0xffff0000) fp32.
 * ------------------------------------------------------------------------------------------------------------- */
INLINE256 void bf16_tile_avx2(const fabrik_linear *L, const uint16_t *blk, const float *xf, int xs, int MT, void *out,
                              int flags, int m0, int n0) {
    int P = L->kp / 2;
    __m256 lo[4], hi[4];
    const __m256i odd_mask = _mm256_set1_epi32((int)0xffff0000u);
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) lo[i] = hi[i] = _mm256_setzero_ps();
    for (int p = 0; p < P; p++) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(blk + (long)p * 32));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(blk + (long)p * 32 + 16));
        __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd_mask));
        __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd_mask));
#pragma GCC unroll 4
        for (int i = 0; i < MT; i++) {
            __m256 xe = _mm256_broadcast_ss(xf + (long)i * xs + 2 * p);
            __m256 xo = _mm256_broadcast_ss(xf + (long)i * xs + 2 * p + 1);
            lo[i] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, lo[i]));
            hi[i] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, hi[i]));
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) store16_avx2(L, lo[i], hi[i], out, flags, m0 + i, n0);
}

T256 static void bf16_run_avx2(const fabrik_linear *L, const float *xf, int M, void *out, int flags,
                               lane_max *lanes) {
    const uint16_t *W = (const uint16_t *)L->weight;
    long block_elems = (long)ROWS * L->kp;
    int xs = L->kp;
#pragma omp parallel num_threads(L->nthreads)
    {
        int b0, b1;
        thread_blocks(L->nblocks, &b0, &b1);
        lane_max *mine = lanes ? lanes + (long)omp_get_thread_num() * M : NULL;
        int folded = b0;
        for (int b = b0; b < b1; b++) {
            const uint16_t *blk = W + b * block_elems;
            for (int m = 0; m < M; m += 4) {
                const float *x = xf + (long)m * xs;
                switch (M - m < 4 ? M - m : 4) {
                case 1: bf16_tile_avx2(L, blk, x, xs, 1, out, flags, m, b * ROWS); break;
                case 2: bf16_tile_avx2(L, blk, x, xs, 2, out, flags, m, b * ROWS); break;
                case 3: bf16_tile_avx2(L, blk, x, xs, 3, out, flags, m, b * ROWS); break;
                default: bf16_tile_avx2(L, blk, x, xs, 4, out, flags, m, b * ROWS); break;
                }
            }
            fold_due_avx2(mine, (const float *)out, M, L->n, &folded, b + 1, b1);
        }
    }
}

lane_max *lanes_new(const fabrik_linear *L, int M) {
    lane_max *lanes = (lane_max *)aligned_alloc(64, sizeof(lane_max) * L->nthreads * M);
    if (lanes)
        for (long i = 0; i < (long)L->nthreads * M; i++) {
            for (int j = 0; j < ROWS; j++) lanes[i].best[j] = -INFINITY, lanes[i].at[j] = 0;
            lanes[i].nan = 0;
        }
    return lanes;
}

/* argmax[m] = the first index of row m's maximum (0 for a row of -inf), or -1 when the row holds a NaN. */
void lanes_argmax(const fabrik_linear *L, lane_max *lanes, int M, int64_t *argmax) {
    for (int m = 0; m < M; m++) {
        float best = -INFINITY;
        int32_t at = 0, nan = 0;
        for (int t = 0; t < L->nthreads; t++) {
            const lane_max *s = lanes + (long)t * M + m;
            nan |= s->nan;
            for (int j = 0; j < ROWS; j++)
                if (s->best[j] > best || (s->best[j] == best && s->at[j] < at)) best = s->best[j], at = s->at[j];
        }
        argmax[m] = nan ? -1 : at;
    }
}

/* y (M, N) = x (M, K) W^T + b for a bf16-packed layer; with argmax (float32 out only), also each row's argmax
 * (lanes_argmax). Returns 0, or -1 if out of memory. */
int fabrik_linear_bf16(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax) {
    int K = L->k, Kp = L->kp;
    lane_max *lanes = NULL;
    if (argmax && !(lanes = lanes_new(L, M))) return -1;
    if (L->isa == ISA_AVX512 && (flags & X_BF16) && K == Kp) {
        bf16_run_avx512(L, (const uint32_t *)x, M, out, flags, lanes); /* already bf16 pairs: no copy */
    } else if (L->isa == ISA_AVX512) {
        uint16_t *xb = (uint16_t *)malloc((size_t)M * Kp * 2);
        if (!xb) return free(lanes), -1;
        for (int m = 0; m < M; m++) {
            uint16_t *row = xb + (long)m * Kp;
            if (flags & X_BF16)
                memcpy(row, (const uint16_t *)x + (long)m * K, (size_t)K * 2);
            else
                for (int k = 0; k < K; k++) row[k] = f32_to_bf16(((const float *)x)[(long)m * K + k]);
            for (int k = K; k < Kp; k++) row[k] = 0;
        }
        bf16_run_avx512(L, (const uint32_t *)xb, M, out, flags, lanes);
        free(xb);
    } else {
        float *xf = (float *)malloc((size_t)M * Kp * 4);
        if (!xf) return free(lanes), -1;
        for (int m = 0; m < M; m++) {
            for (int k = 0; k < K; k++) xf[(long)m * Kp + k] = load_x(x, flags, (long)m * K + k);
            for (int k = K; k < Kp; k++) xf[(long)m * Kp + k] = 0.0f;
        }
        bf16_run_avx2(L, xf, M, out, flags, lanes);
        free(xf);
    }
    if (lanes) lanes_argmax(L, lanes, M, argmax), free(lanes);
    return 0;
}

/* Reads n bytes with `nthreads` threads, each one contiguous range (the bandwidth reference of bench/kernels.py). */
uint64_t fabrik_stream_read(const void *data, long n, int nthreads) {
    uint64_t total = 0;
    const uint64_t *p = (const uint64_t *)data;
    long words = n / 8;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long w0 = words * t / nt, w1 = words * (t + 1) / nt;
        uint64_t sum = 0;
        for (long w = w0; w < w1; w++) sum += p[w];
        total += sum;
    }
    return total;
}
