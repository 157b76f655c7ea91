/* int8 and int4 linear kernels for AVX2 (+ FMA, F16C), on the layouts of linear_quant.c, and the activation
 * quantization on 8 lanes.
 *
 * There is no vpdpbusd without VNNI: `vpmaddubsw` multiplies unsigned by signed bytes and adds adjacent pairs into
 * int16 (saturating), `vpmaddwd` by ones adds the pairs of int16 into int32. So a 32-byte half line (8 rows x 4 K)
 * times a broadcast of 4 x bytes gives each row's 4 products in its 32-bit lane, as vpdpbusd does.
 *   int4: weights q + 8 in [0, 15], so a pair is at most 2 * 15 * 127 = 3810: the int16 sums of a group's 8 lines
 *         (<= 30480) neither saturate nor wrap, and one vpmaddwd per group and half line widens them to int32.
 *   int8: q + 128 would saturate vpmaddubsw (2 * 255 * 127 > 32767), so the weights are taken back to q (xor 0x80),
 *         the unsigned side is |q| and the signed side x with q's sign (vpsignb): 2 * 127 * 127 fits, and the sum
 *         is q . x directly (no zero-point correction); each vpmaddubsw is widened to int32 at once.
 * A tile computes one group (32 K) of one block for MT rows of x at a time: 2 accumulators per row, so 4 rows fit
 * the 16 ymm registers with the two weight vectors, and every weight load and unpack serves MT rows.
 */
#include "linear_avx2.h"
#include "linear_quant.h"

#define MT_MAX 4 /* rows of x per tile */

typedef int32_t __attribute__((may_alias)) i32_alias;

/* 8 values of x (bf16 or float32) as floats. */
INLINE256 __m256 load8_avx2(const void *x, int flags, long i) {
    if (flags & X_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    return _mm256_loadu_ps((const float *)x + i);
}

INLINE256 float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

INLINE256 int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

/* quantize_group's operations on 8 lanes (the same float products, rounded to nearest even by vcvtps2dq), for the
 * whole groups of the row; the scalar code takes the group that K cuts. */
T256 void quantize_row_avx2(const void *x, int flags, int m, int xg, int K, int Kp, int zp, quant_x *qx) {
    int G = Kp / GROUP, whole = K / xg;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int g = 0; g < whole; g++) {
        long at = (long)m * K + (long)g * xg;
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < xg; j += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8_avx2(x, flags, at + j), absmask));
        float amax = hmax8(mx);
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int s = 0; s < xg / GROUP; s++) { /* per 32: the kernels' scale and correction entries */
            __m256i q[4];
            for (int j = 0; j < 4; j++)
                q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(load8_avx2(x, flags, at + s * GROUP + 8 * j), inv));
            /* packs work per 128-bit lane: bytes come out as dwords 0, 2, 4, 6 | 1, 3, 5, 7 of the 8 groups of 4 */
            __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(qx->q + (long)m * Kp + (long)g * xg + s * GROUP), b);
            long e = (long)m * G + (long)g * (xg / GROUP) + s;
            qx->scale[e] = amax / 127.0f;
            qx->corr[e] = zp * hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        }
    }
    for (int g = whole; g < Kp / xg; g++) quantize_group(x, flags, m, g, xg, K, Kp, zp, qx);
}

/* MT rows of x (m0..) against one block: out rows m0.., outputs n0..n0+15. BITS, GS and MT are constants. */
INLINE256 void quant_tile_avx2(const fabrik_linear *L, const uint8_t *blk, const quant_x *qx, int m0, int MT,
                               void *out, int flags, int n0, int BITS, int GS) {
    int S = L->kp / UNIT_K, G = L->kp / GROUP;
    const __m256i nibble = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 f[MT_MAX][2];
    __m256i wide[MT_MAX][2]; /* int32 sums of a group of 64 or 128 (int4) */
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) f[i][0] = f[i][1] = _mm256_setzero_ps();
    for (int s = 0; s < S; s++) {
        const uint8_t *u = unit_data(blk, s, BITS, GS), *sc = unit_scales(blk, s, BITS, GS);
        if (GS == 64 || (GS == 128 && !(s & 1)))
#pragma GCC unroll 4
            for (int i = 0; i < MT; i++) wide[i][0] = wide[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int g = 0; g < 2; g++) {
            __m256i acc[MT_MAX][2];
#pragma GCC unroll 4
            for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m256i w0, w1;
                if (BITS == 4) {
                    __m256i r0 = _mm256_loadu_si256((const __m256i *)(u + c * 64));
                    __m256i r1 = _mm256_loadu_si256((const __m256i *)(u + c * 64 + 32));
                    w0 = _mm256_and_si256(g ? _mm256_srli_epi16(r0, 4) : r0, nibble);
                    w1 = _mm256_and_si256(g ? _mm256_srli_epi16(r1, 4) : r1, nibble);
                } else {
                    w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(u + c * 128 + g * 64)), flip);
                    w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(u + c * 128 + g * 64 + 32)), flip);
                }
                __m256i a0 = BITS == 4 ? w0 : _mm256_abs_epi8(w0), a1 = BITS == 4 ? w1 : _mm256_abs_epi8(w1);
#pragma GCC unroll 4
                for (int i = 0; i < MT; i++) {
                    const int8_t *xq = qx->q + (long)(m0 + i) * L->kp + s * UNIT_K + g * GROUP + c * 4;
                    __m256i xb = _mm256_set1_epi32(*(const i32_alias *)xq);
                    if (BITS == 4) {
                        acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(a0, xb));
                        acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(a1, xb));
                    } else {
                        __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0));
                        __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1));
                        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(p0, ones));
                        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(p1, ones));
                    }
                }
            }
            if (BITS == 4)
#pragma GCC unroll 4
                for (int i = 0; i < MT; i++) {
                    acc[i][0] = _mm256_madd_epi16(acc[i][0], ones);
                    acc[i][1] = _mm256_madd_epi16(acc[i][1], ones);
                }
            if (GS != 32) { /* one scale over the group (int4 only): its sums add exactly first */
#pragma GCC unroll 4
                for (int i = 0; i < MT; i++) {
                    wide[i][0] = _mm256_add_epi32(wide[i][0], acc[i][0]);
                    wide[i][1] = _mm256_add_epi32(wide[i][1], acc[i][1]);
                }
                continue;
            }
            __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * 32)));
            __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * 32 + 16)));
#pragma GCC unroll 4
            for (int i = 0; i < MT; i++) {
                long gi = (long)(m0 + i) * G + 2 * s + g;
                __m256i corr = _mm256_set1_epi32(BITS == 4 ? qx->corr[gi] : 0); /* int8: q . x already */
                __m256 xs = _mm256_set1_ps(qx->scale[gi]);
                f[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][0], corr)), _mm256_mul_ps(s0, xs),
                                          f[i][0]);
                f[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][1], corr)), _mm256_mul_ps(s1, xs),
                                          f[i][1]);
            }
        }
        if (GS == 32 || (GS == 128 && !(s & 1))) continue; /* a group of 128 spans two units */
        __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
        __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16)));
#pragma GCC unroll 4
        for (int i = 0; i < MT; i++) {
            long gi = (long)(m0 + i) * G + 2 * s + 2; /* one past the group's last entry of 32 */
            int corr = 0;
            for (long e = gi - GS / GROUP; e < gi; e++) corr += qx->corr[e];
            __m256 xs = _mm256_set1_ps(qx->scale[gi - 1]);
            f[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(wide[i][0], _mm256_set1_epi32(corr))),
                                      _mm256_mul_ps(s0, xs), f[i][0]);
            f[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(wide[i][1], _mm256_set1_epi32(corr))),
                                      _mm256_mul_ps(s1, xs), f[i][1]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) store16_avx2(L, f[i][0], f[i][1], out, flags, m0 + i, n0);
}

/* One run function per format, so that BITS and GS are literals inside the OpenMP region (as linear_quant.c's). */
#define QUANT_RUN_AVX2(NAME, BITS, GS)                                                                                \
    T256 void NAME(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes) {        \
        const uint8_t *W = (const uint8_t *)L->weight;                                                              \
        long bytes = block_bytes(L, BITS, GS);                                                                      \
        _Pragma("omp parallel num_threads(L->nthreads)") {                                                          \
            int b0, b1;                                                                                             \
            thread_blocks(L->nblocks, &b0, &b1);                                                                    \
            lane_max *mine = lanes ? lanes + (long)omp_get_thread_num() * M : NULL;                                 \
            int folded = b0;                                                                                        \
            for (int b = b0; b < b1; b++) {                                                                         \
                const uint8_t *blk = W + b * bytes;                                                                 \
                for (int m = 0; m < M; m += MT_MAX) {                                                               \
                    switch (M - m < MT_MAX ? M - m : MT_MAX) {                                                      \
                    case 1: quant_tile_avx2(L, blk, qx, m, 1, out, flags, b * ROWS, BITS, GS); break;               \
                    case 2: quant_tile_avx2(L, blk, qx, m, 2, out, flags, b * ROWS, BITS, GS); break;               \
                    case 3: quant_tile_avx2(L, blk, qx, m, 3, out, flags, b * ROWS, BITS, GS); break;               \
                    default: quant_tile_avx2(L, blk, qx, m, 4, out, flags, b * ROWS, BITS, GS); break;              \
                    }                                                                                               \
                }                                                                                                   \
                fold_due_avx2(mine, (const float *)out, M, L->n, &folded, b + 1, b1);                               \
            }                                                                                                       \
        }                                                                                                           \
    }

QUANT_RUN_AVX2(int8_run_avx2, 8, 32)
QUANT_RUN_AVX2(int4_run_avx2, 4, 32)
QUANT_RUN_AVX2(int4g64_run_avx2, 4, 64)
QUANT_RUN_AVX2(int4g128_run_avx2, 4, 128)
