/* Declarations shared by the linear kernels (linear.c: bf16, linear_quant.c: int8 / int4): block and unit sizes,
 * per-function ISA targets, output stores, the split of weight blocks over threads. */
#ifndef FABRIK_LINEAR_H
#define FABRIK_LINEAR_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fabrik.h"

#define ROWS 16         /* rows per weight block */
#define GROUP 32        /* int8 quantization group along K */
#define UNIT_K 64       /* K values per int8 unit (two groups) */
#define UNIT_BYTES 1088 /* int8: 64 K x 16 rows + 2 x 16 fp16 scales */
#define UNIT_BYTES4 576 /* int4: 64 K x 16 rows / 2 + 2 x 16 fp16 scales */

#define PREFETCH_LINES 16 /* software prefetch distance of the batched tiles, in 64-byte lines */

typedef int32_t __attribute__((may_alias)) i32_alias; /* 4 quantized x bytes read as one broadcast value */

static inline float load_x(const void *x, int flags, long i) {
    return (flags & X_BF16) ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* Stores 16 results of one block row range [n0, n0 + valid) of output row m, adding the bias. */
static inline void store_scalar(const fabrik_linear *L, const float *res, void *out, int flags, int m, int n0) {
    int valid = L->n - n0 < ROWS ? L->n - n0 : ROWS;
    for (int r = 0; r < valid; r++) {
        float v = res[r] + (L->bias ? L->bias[n0 + r] : 0.0f);
        long idx = (long)m * L->n + n0 + r;
        if (flags & OUT_BF16)
            ((uint16_t *)out)[idx] = f32_to_bf16(v);
        else
            ((float *)out)[idx] = v;
    }
}

static inline void thread_blocks(int nblocks, int *b0, int *b1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *b0 = (int)((long)nblocks * t / nt);
    *b1 = (int)((long)nblocks * (t + 1) / nt);
}

#define ISA512 "avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,fma,f16c"
#define T512 __attribute__((target(ISA512)))
#define INLINE512 static inline __attribute__((always_inline, target(ISA512)))

/* Several tiles of rows per weight block: the first streams the block from DRAM and the others run from cache while
 * the DRAM idles, so tile t of `tiles` also pulls its share of the thread's next block(s) (`next`, `bytes` long; NULL
 * when there are none) into L2, spread evenly over the tile's `steps` by prefetch_step (once per step, no division). */
typedef struct {
    const char *at; /* next line to prefetch, NULL: none */
    long lines, steps, due;
} next_prefetch;

static inline next_prefetch next_slice(const char *next, long bytes, int tiles, int t, long steps) {
    next_prefetch p = {NULL, 0, steps, 0};
    if (next && tiles > 1) {
        long lines = bytes / 64, first = t * lines / tiles;
        p.at = next + first * 64;
        p.lines = (t + 1) * lines / tiles - first;
    }
    return p;
}

static inline void prefetch_step(next_prefetch *p) {
    if (p->at)
        for (p->due += p->lines; p->due >= p->steps; p->due -= p->steps, p->at += 64) _mm_prefetch(p->at, _MM_HINT_T1);
}

/* Greedy sampling's argmax, folded into a float32 layer's output while each thread stores it: read back afterwards,
 * the logits come from DRAM (the weight stream evicted them), ~100 us per 151,936-wide row. Per thread and row of x,
 * lane j holds the largest output seen at n = j (mod 16), the first such n (strictly greater wins), and whether a NaN
 * was seen; lanes_argmax merges the threads' lanes in block order: the lowest index of the maximum, -1 with a NaN,
 * 0 for a row of -inf (the sampler's contract, as torch's max). */
typedef struct {
    float best[ROWS];
    int32_t at[ROWS];
    int32_t nan;
    int32_t pad[15]; /* 192 bytes: the threads' lanes never share a cache line */
} lane_max;

/* Folds outputs [n0, n1) of rows 0..M-1 of out (float32, N wide) into lanes[0..M), scalar (the partial last block
 * of the AVX2 fold). */
static inline void fold_outputs(lane_max *lanes, const float *out, int M, int N, int n0, int n1) {
    n1 = n1 < N ? n1 : N;
    for (int m = 0; m < M; m++)
        for (int n = n0; n < n1; n++) {
            float v = out[(long)m * N + n];
            lane_max *s = lanes + m;
            if (v != v) s->nan = 1;
            if (v > s->best[n % ROWS]) s->best[n % ROWS] = v, s->at[n % ROWS] = n;
        }
}

#define T256 __attribute__((target("avx2,fma,f16c")))
#define INLINE256 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

INLINE512 void store16_avx512(const fabrik_linear *L, __m512 acc, void *out, int flags, int m, int n0) {
    int valid = L->n - n0 < ROWS ? L->n - n0 : ROWS;
    __mmask16 mask = (__mmask16)((1u << valid) - 1u);
    if (L->bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, L->bias + n0));
    long idx = (long)m * L->n + n0;
    if (flags & OUT_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)out + idx, mask, (__m256i)_mm512_cvtneps_pbh(acc));
    else
        _mm512_mask_storeu_ps((float *)out + idx, mask, acc);
}

/* The same with AVX-512, 16 outputs per step; n0 is a multiple of 16. */
INLINE512 void fold_outputs_avx512(lane_max *lanes, const float *out, int M, int N, int n0, int n1) {
    n1 = n1 < N ? n1 : N;
    for (int m = 0; m < M; m++) {
        lane_max *s = lanes + m;
        __m512 bv = _mm512_loadu_ps(s->best);
        __m512i bi = _mm512_loadu_si512(s->at);
        __mmask16 nans = 0;
        for (int n = n0; n < n1; n += ROWS) {
            __mmask16 valid = (__mmask16)(n1 - n >= ROWS ? 0xffffu : (1u << (n1 - n)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(valid, out + (long)m * N + n);
            nans |= _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
            __mmask16 gt = _mm512_mask_cmp_ps_mask(valid, v, bv, _CMP_GT_OQ);
            bv = _mm512_mask_mov_ps(bv, gt, v);
            bi = _mm512_mask_mov_epi32(bi, gt, _mm512_add_epi32(_mm512_set1_epi32(n),
                                                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                  11, 12, 13, 14, 15)));
        }
        _mm512_storeu_ps(s->best, bv);
        _mm512_storeu_si512(s->at, bi);
        if (nans) s->nan = 1;
    }
}

/* After block b_end - 1 of a thread's blocks [.., b1): folds the blocks stored since *from once 8 of them (128
 * outputs a row, still in L1/L2) are waiting or the range ends; one fold per block cost int8's 16-row tiles ~4%. */
INLINE512 void fold_due_avx512(lane_max *mine, const float *out, int M, int N, int *from, int b_end, int b1) {
    if (mine && (b_end - *from >= 8 || b_end >= b1)) {
        fold_outputs_avx512(mine, out, M, N, *from * ROWS, b_end * ROWS);
        *from = b_end;
    }
}

lane_max *lanes_new(const fabrik_linear *L, int M);
void lanes_argmax(const fabrik_linear *L, lane_max *lanes, int M, int64_t *argmax);

#endif
