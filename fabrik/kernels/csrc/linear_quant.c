/* Native linear layers (y = x W^T + b) for int8 and int4 weights: activation quantization, the AVX-512 VNNI kernels
 * and the entry points (linear.c has bf16; linear_quant_avx2.c the AVX2 kernels; linear.h the shared parts).
 *
 * Weight layouts (built by fabrik/kernels/linear.py; N rows padded to a multiple of 16, see docs/kernels.md):
 *
 *   int8: blocks of 16 rows; inside a block, units of 64 K values (two groups of 32), each 1088 bytes:
 *         8 x ([group 0: row 0..15 x 4 uint8] [group 1: same]) [fp16 scale of rows 0..15 for group 0, then group 1]
 *         (the two groups interleave line by line so that the kernel's two accumulator chains read one stream)
 *         weights are stored as q + 128 (uint8) so that `vpdpbusd` (unsigned x signed) takes them as its unsigned
 *         side; the +128 is removed with 128 * sum(x_q) of the group, which depends on x only.
 *
 *   int4: the int8 layout with two nibbles per byte, units of 576 bytes: 8 lines of 64 bytes whose low nibbles are
 *         the int8 layout's group-0 line c and high nibbles its group-1 line c, then the same 64 bytes of scales.
 *         Stored as q + 8 (q in [-8, 7]); one load and two masks give the two lines the int8 kernel reads.
 *         With groups of 64 one fp16 scale per row covers the unit (544 bytes); with groups of 128 two units' data
 *         share one (1056 bytes per 128 K): [512 bytes of data][512 bytes of data][fp16 scale of rows 0..15].
 */
#include "linear_quant.h"

/* Quantizes group g (of xg values) of row m of x: scale = absmax / 127, q = round-half-even(x * (127 / absmax)).
 * zp: the weights' zero point, premultiplied into corr so that the kernels subtract it as a broadcast operand. */
void quantize_group(const void *x, int flags, int m, int g, int xg, int K, int Kp, int zp, quant_x *qx) {
    float v[128], amax = 0.0f; /* xg <= 128: the largest int4 group */
    for (int j = 0; j < xg; j++) {
        int k = g * xg + j;
        v[j] = k < K ? load_x(x, flags, (long)m * K + k) : 0.0f;
        float a = fabsf(v[j]);
        amax = a > amax ? a : amax;
    }
    int8_t *q = qx->q + (long)m * Kp + g * xg;
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int s = 0; s < xg / GROUP; s++) { /* per 32: the kernels' scale and correction entries */
        int32_t sum = 0;
        for (int j = s * GROUP; j < (s + 1) * GROUP; j++) {
            int qi = (int)nearbyintf(v[j] * inv);
            q[j] = (int8_t)qi;
            sum += qi;
        }
        long e = (long)m * (Kp / GROUP) + g * (xg / GROUP) + s;
        qx->scale[e] = amax / 127.0f;
        qx->corr[e] = zp * sum;
    }
}

/* The same on 16 lanes for the whole groups of a bf16 row (the native forward's activations), the scalar code for
 * the rest: the same float operations, so the same results. */
T512 static inline __m512 bf16x16_avx512(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

T512 static void quantize_row_avx512(const void *x, int flags, int m, int xg, int K, int Kp, int zp, quant_x *qx) {
    int G = Kp / GROUP, whole = (flags & X_BF16) ? K / xg : 0;
    const uint16_t *xr = (const uint16_t *)x + (long)m * K;
    for (int g = 0; g < whole; g++) {
        const uint16_t *xs = xr + (long)g * xg;
        __m512 mx = _mm512_setzero_ps();
        for (int j = 0; j < xg; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(bf16x16_avx512(xs + j)));
        float amax = _mm512_reduce_max_ps(mx);
        __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int s = 0; s < xg / GROUP; s++) { /* per 32: the kernels' scale and correction entries */
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16_avx512(xs + s * GROUP), inv));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16_avx512(xs + s * GROUP + 16), inv));
            int8_t *q = qx->q + (long)m * Kp + (long)g * xg + s * GROUP;
            _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
            long e = (long)m * G + (long)g * (xg / GROUP) + s;
            qx->scale[e] = amax / 127.0f;
            qx->corr[e] = zp * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    }
    for (int g = whole; g < Kp / xg; g++) quantize_group(x, flags, m, g, xg, K, Kp, zp, qx);
}

/* Quantizes every row of x in groups of xg values, over the threads when there are enough rows. */
static void quantize_x(const fabrik_linear *L, const void *x, int flags, int M, int xg, int zp, quant_x *qx) {
#pragma omp parallel for num_threads(L->nthreads) if (M >= 8) schedule(static)
    for (int m = 0; m < M; m++) {
        if (L->isa == ISA_AVX512)
            quantize_row_avx512(x, flags, m, xg, L->k, L->kp, zp, qx);
        else
            quantize_row_avx2(x, flags, m, xg, L->k, L->kp, zp, qx);
    }
}

/* acc += w (unsigned bytes) . broadcast(*x) (4 signed bytes) with the broadcast folded into the instruction
 * ({1to16}): GCC emits a separate vpbroadcastd for _mm512_set1_epi32 here, one extra uop per vpdpbusd. */
INLINE512 __m512i dpbusd_bcast(__m512i acc, __m512i w, const i32_alias *x) {
    __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*x));
    return acc;
}

/* pf: the share of the thread's next block this tile pulls into L2 (linear.h, next_slice). */
INLINE512 void quant_tile_avx512(const fabrik_linear *L, const uint8_t *blk, const quant_x *qx, int m0, int MT,
                                 void *out, int flags, int n0, int BITS, int GS, next_prefetch pf) {
    int S = L->kp / UNIT_K, G = L->kp / GROUP;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512 facc[6];
#pragma GCC unroll 6
    for (int i = 0; i < MT; i++) facc[i] = _mm512_setzero_ps();
    __m512i a0[6], a1[6];
    for (int s = 0; s < S; s++) {
        const uint8_t *u = unit_data(blk, s, BITS, GS), *sc = unit_scales(blk, s, BITS, GS);
        if (GS != 128 || !(s & 1))
#pragma GCC unroll 6
            for (int i = 0; i < MT; i++) a0[i] = a1[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            prefetch_step(&pf);
            __m512i w0, w1;
            if (BITS == 8) {
                if (MT > 1) {
                    _mm_prefetch((const char *)(u + c * 128 + PREFETCH_LINES * 64), _MM_HINT_T0);
                    _mm_prefetch((const char *)(u + c * 128 + PREFETCH_LINES * 64 + 64), _MM_HINT_T0);
                }
                w0 = _mm512_loadu_si512(u + c * 128);
                w1 = _mm512_loadu_si512(u + c * 128 + 64);
            } else {
                if (MT > 1) _mm_prefetch((const char *)(u + c * 64 + PREFETCH_LINES * 64), _MM_HINT_T0);
                __m512i raw = _mm512_loadu_si512(u + c * 64);
                w0 = _mm512_and_si512(raw, nibble);
                w1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
            }
#pragma GCC unroll 6
            for (int i = 0; i < MT; i++) {
                const i32_alias *xq = (const i32_alias *)(qx->q + (long)(m0 + i) * L->kp + s * UNIT_K);
                a0[i] = dpbusd_bcast(a0[i], w0, xq + c);
                a1[i] = dpbusd_bcast(a1[i], w1, xq + 8 + c);
            }
        }
        if (GS == 128 && !(s & 1)) continue; /* a group of 128 spans two units: its sums go on in int32 */
        __m512 sc0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        __m512 sc1 = GS == 32 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32))) : sc0;
#pragma GCC unroll 6
        for (int i = 0; i < MT; i++) {
            long gi = (long)(m0 + i) * G + 2 * s;
            if (GS == 32) {
                __m512 d0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(a0[i], _mm512_set1_epi32(qx->corr[gi])));
                __m512 d1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(a1[i], _mm512_set1_epi32(qx->corr[gi + 1])));
                facc[i] = _mm512_fmadd_ps(d0, _mm512_mul_ps(sc0, _mm512_set1_ps(qx->scale[gi])), facc[i]);
                facc[i] = _mm512_fmadd_ps(d1, _mm512_mul_ps(sc1, _mm512_set1_ps(qx->scale[gi + 1])), facc[i]);
            } else { /* one weight scale and one x scale over the group (int4 only): its sums add exactly first */
                int corr = 0;
                for (long e = gi + 2 - GS / GROUP; e < gi + 2; e++) corr += qx->corr[e];
                __m512i a = _mm512_sub_epi32(_mm512_add_epi32(a0[i], a1[i]), _mm512_set1_epi32(corr));
                facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sc0, _mm512_set1_ps(qx->scale[gi])),
                                          facc[i]);
            }
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MT; i++) store16_avx512(L, facc[i], out, flags, m0 + i, n0);
}

/* One run function per format, so that BITS is a literal inside the OpenMP region (an outlined region would
 * otherwise receive it as a runtime value and keep both formats' branches in the inner loop). */
#define QUANT_RUN_AVX512(NAME, BITS, GS)                                                                              \
    T512 static void NAME(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes) { \
        const uint8_t *W = (const uint8_t *)L->weight;                                                              \
        long bytes = block_bytes(L, BITS, GS);                                                                      \
        _Pragma("omp parallel num_threads(L->nthreads)") {                                                          \
            int b0, b1;                                                                                             \
            thread_blocks(L->nblocks, &b0, &b1);                                                                    \
            lane_max *mine = lanes ? lanes + (long)omp_get_thread_num() * M : NULL;                                 \
            int tiles = (M + 5) / 6, folded = b0;                                                                   \
            for (int b = b0; b < b1; b++) {                                                                         \
                const uint8_t *blk = W + b * bytes;                                                                 \
                const char *next = b + 1 < b1 ? (const char *)(blk + bytes) : NULL;                                \
                for (int m = 0; m < M; m += 6) {                                                                    \
                    next_prefetch pf = next_slice(next, bytes, tiles, m / 6, 8L * (L->kp / UNIT_K));               \
                    switch (M - m < 6 ? M - m : 6) {                                                                \
                    case 1: quant_tile_avx512(L, blk, qx, m, 1, out, flags, b * ROWS, BITS, GS, pf); break;     \
                    case 2: quant_tile_avx512(L, blk, qx, m, 2, out, flags, b * ROWS, BITS, GS, pf); break;     \
                    case 3: quant_tile_avx512(L, blk, qx, m, 3, out, flags, b * ROWS, BITS, GS, pf); break;     \
                    case 4: quant_tile_avx512(L, blk, qx, m, 4, out, flags, b * ROWS, BITS, GS, pf); break;     \
                    case 5: quant_tile_avx512(L, blk, qx, m, 5, out, flags, b * ROWS, BITS, GS, pf); break;     \
                    default: quant_tile_avx512(L, blk, qx, m, 6, out, flags, b * ROWS, BITS, GS, pf); break;    \
                    }                                                                                               \
                }                                                                                                   \
                fold_due_avx512(mine, (const float *)out, M, L->n, &folded, b + 1, b1);                             \
            }                                                                                                       \
        }                                                                                                           \
    }

QUANT_RUN_AVX512(int8_run_avx512, 8, 32)
QUANT_RUN_AVX512(int4_run_avx512, 4, 32)
QUANT_RUN_AVX512(int4g64_run_avx512, 4, 64)
QUANT_RUN_AVX512(int4g128_run_avx512, 4, 128)

static int quant_linear(const fabrik_linear *L, const void *x, int M, void *out, int flags, int bits,
                        int64_t *argmax) {
    int Kp = L->kp, G = Kp / GROUP;
    quant_x qx;
    qx.q = (int8_t *)malloc((size_t)M * Kp);
    qx.scale = (float *)malloc((size_t)M * G * 4);
    qx.corr = (int32_t *)malloc((size_t)M * G * 4);
    lane_max *lanes = argmax ? lanes_new(L, M) : NULL;
    int rc = 0;
    if (!qx.q || !qx.scale || !qx.corr || (argmax && !lanes)) {
        rc = -1;
    } else {
        quantize_x(L, x, flags, M, bits == 8 ? GROUP : L->group, bits == 8 ? 128 : 8, &qx); /* the weights' group */
        int avx512 = L->isa == ISA_AVX512;
        quant_run run = bits == 8          ? (avx512 ? int8_run_avx512 : int8_run_avx2)
                        : L->group == 128 ? (avx512 ? int4g128_run_avx512 : int4g128_run_avx2)
                        : L->group == 64  ? (avx512 ? int4g64_run_avx512 : int4g64_run_avx2)
                                          : (avx512 ? int4_run_avx512 : int4_run_avx2);
        run(L, &qx, M, out, flags, lanes);
        if (lanes) lanes_argmax(L, lanes, M, argmax);
    }
    free(lanes);
    free(qx.q);
    free(qx.scale);
    free(qx.corr);
    return rc;
}

/* y (M, N) = quant(x) (M, K) W^T + b for an int8-packed layer, and the argmax as fabrik_linear_bf16's. Returns 0, or
 * -1 if out of memory. */
int fabrik_linear_int8(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax) {
    return quant_linear(L, x, M, out, flags, 8, argmax);
}

/* The same for an int4-packed layer. */
int fabrik_linear_int4(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax) {
    return quant_linear(L, x, M, out, flags, 4, argmax);
}

