/* Greedy sampling's argmax over rows of float32 logits: torch's max over a 151,936-wide row took ~140 us (one
 * thread, ~4 GB/s), 1.4 ms for a batch of 16, per decode step. */
#include <math.h>
#include <stdint.h>

#include "fabrik.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Index of the largest value of x[0..n) (the lowest one on ties), or -1 when the row holds a NaN. */
static int64_t argmax_row(const float *x, int n) {
    int i = 0;
    float best = -INFINITY;
    int64_t at = 0;
    int nan = 0;
#ifdef __AVX512F__
    if (n >= 16) {
        __m512 bv = _mm512_set1_ps(-INFINITY);
        __m512i bi = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nans = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ); /* strictly greater: each lane keeps its first */
            bv = _mm512_mask_mov_ps(bv, gt, v);
            bi = _mm512_mask_mov_epi32(bi, gt, idx);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
        nan = nans != 0;
        best = _mm512_reduce_max_ps(bv);
        /* the lowest index among the lanes holding the maximum (a row of -inf: 0) */
        __mmask16 at_max = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(best), _CMP_EQ_OQ);
        at = _mm512_mask_reduce_min_epi32(at_max, bi);
    }
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) nan = 1;
        if (x[i] > best) best = x[i], at = i;
    }
    return nan ? -1 : at;
}

/* idx[r] = argmax of row r of the (rows, n) logits, -1 for a row with NaN; rows over the threads. */
void fabrik_argmax_rows(const float *x, int rows, int n, int nthreads, int64_t *idx) {
#pragma omp parallel for num_threads(nthreads) if (rows > 1) schedule(static)
    for (int r = 0; r < rows; r++) idx[r] = argmax_row(x + (long)r * n, n);
}
