/* What the AVX2 linear kernels share (linear.c: bf16, linear_quant_avx2.c: int8 / int4): the output stores and the
 * argmax fold on 8 lanes, the counterparts of linear.h's AVX-512 ones. */
#ifndef FABRIK_LINEAR_AVX2_H
#define FABRIK_LINEAR_AVX2_H

#include "linear.h"

/* 8 floats rounded to bf16 as f32_to_bf16 rounds them (nearest even, NaN kept quiet), in the low 128 bits. */
INLINE256 __m128i bf16x8_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* packus works per 128-bit lane: words 0-3 and 4-7 land in qwords 0 and 2 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

/* Stores the 16 results (lo: rows 0-7, hi: rows 8-15) of one block [n0, n0 + 16) of output row m, adding the bias. */
INLINE256 void store16_avx2(const fabrik_linear *L, __m256 lo, __m256 hi, void *out, int flags, int m, int n0) {
    if (L->n - n0 < ROWS) { /* the last block of a layer whose N is not a multiple of 16 */
        float res[ROWS];
        _mm256_storeu_ps(res, lo);
        _mm256_storeu_ps(res + 8, hi);
        store_scalar(L, res, out, flags, m, n0);
        return;
    }
    if (L->bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(L->bias + n0));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(L->bias + n0 + 8));
    }
    long idx = (long)m * L->n + n0;
    if (flags & OUT_BF16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + idx), bf16x8_avx2(lo));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + idx + 8), bf16x8_avx2(hi));
    } else {
        _mm256_storeu_ps((float *)out + idx, lo);
        _mm256_storeu_ps((float *)out + idx + 8, hi);
    }
}

/* fold_outputs on 8 lanes: whole blocks of 16 outputs in vectors, a partial last block by the scalar code. */
INLINE256 void fold_outputs_avx2(lane_max *lanes, const float *out, int M, int N, int n0, int n1) {
    n1 = n1 < N ? n1 : N;
    int whole = n0 + (n1 - n0) / ROWS * ROWS;
    for (int m = 0; m < M; m++) {
        lane_max *s = lanes + m;
        __m256 b0 = _mm256_loadu_ps(s->best), b1 = _mm256_loadu_ps(s->best + 8);
        __m256i i0 = _mm256_loadu_si256((const __m256i *)s->at), i1 = _mm256_loadu_si256((const __m256i *)(s->at + 8));
        __m256 nans = _mm256_setzero_ps();
        __m256i at = _mm256_add_epi32(_mm256_set1_epi32(n0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int n = n0; n < whole; n += ROWS, at = _mm256_add_epi32(at, _mm256_set1_epi32(ROWS))) {
            __m256 v0 = _mm256_loadu_ps(out + (long)m * N + n), v1 = _mm256_loadu_ps(out + (long)m * N + n + 8);
            nans = _mm256_or_ps(nans, _mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)));
            __m256 g0 = _mm256_cmp_ps(v0, b0, _CMP_GT_OQ), g1 = _mm256_cmp_ps(v1, b1, _CMP_GT_OQ);
            b0 = _mm256_blendv_ps(b0, v0, g0);
            b1 = _mm256_blendv_ps(b1, v1, g1);
            i0 = _mm256_blendv_epi8(i0, at, _mm256_castps_si256(g0));
            i1 = _mm256_blendv_epi8(i1, _mm256_add_epi32(at, _mm256_set1_epi32(8)), _mm256_castps_si256(g1));
        }
        _mm256_storeu_ps(s->best, b0);
        _mm256_storeu_ps(s->best + 8, b1);
        _mm256_storeu_si256((__m256i *)s->at, i0);
        _mm256_storeu_si256((__m256i *)(s->at + 8), i1);
        if (_mm256_movemask_ps(nans)) s->nan = 1;
    }
    if (whole < n1) fold_outputs(lanes, out, M, N, whole, n1);
}

/* fold_due_avx512's rule (every 8 blocks, while the outputs are still in L1/L2) on the AVX2 fold. */
INLINE256 void fold_due_avx2(lane_max *mine, const float *out, int M, int N, int *from, int b_end, int b1) {
    if (mine && (b_end - *from >= 8 || b_end >= b1)) {
        fold_outputs_avx2(mine, out, M, N, *from * ROWS, b_end * ROWS);
        *from = b_end;
    }
}

#endif
