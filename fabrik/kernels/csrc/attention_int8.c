/* Decode attention over the int8 KV cache (fabrik/models/kv_int8.py): the decode kernel of attention.c with integer
 * dot products, so that reading half the bytes does not cost more instructions per key than bf16 does.
 *
 *   q K^T: the item's queries quantized once to int16 (one scale per head, ~15 bits: far finer than the keys), each
 *          key row sign-extended to int16 and multiplied with vpdpwssd (int32 sums, exact), then
 *          score = sum * q_scale * k_scale[row] * scale.
 *   P V:   the softmax weights times each row's V scale, quantized to int16 per 16-key chunk (scale = max / 32767),
 *          V rows sign-extended and paired (unpack lo / hi, as the bf16 kernel pairs bf16 rows), vpdpwssd into int32
 *          sums that are scaled into the fp32 running output once per chunk.
 * Bounds: |k| <= 127, |q| <= 32767 over D <= 256 values and |v| <= 127, |w| <= 32767 over 16 keys stay inside
 * int32. The running output keeps the bf16 kernel's unpacked lane order (store_output undoes it).
 */
#include <math.h>

#include "attention.h"
#include "fabrik.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#include "attention_avx512.h"

#define KEY_CHUNK 16 /* keys between softmax rescales: one vector of scores */

/* 32 bf16 values -> 32 int16 rounded from v * inv. */
static inline __m512i bf16_to_i16(const uint16_t *v, __m512 inv) {
    __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)v)), 16));
    __m512 hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 16))), 16));
    __m256i a = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)));
    __m256i b = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* Sign-extended int8 row slice: 32 values -> 32 int16. */
static inline __m512i load_i8(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }

#define PREFETCH_KEYS 32

static inline __attribute__((always_inline)) void attend_int8_fixed(const attn_item *it, const int G, const int D) {
    const int NC = D / 32, bs = it->bs, NH = it->n_heads;
    const long region_bytes = attn_region_bytes(1, bs, D);
    __m512i qs[ATTN_MAX_HEADS][G][NC]; /* each head's int16 queries, and its running state between blocks */
    float qscales[ATTN_MAX_HEADS][G], ms[ATTN_MAX_HEADS][G];
    __m512 ls[ATTN_MAX_HEADS][G], state[ATTN_MAX_HEADS][G][2 * NC];
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const uint16_t *q = it->q + (h * G + g) * D;
            __m512i bits = _mm512_setzero_si512(); /* max |q| as the largest bf16 magnitude (fmaxf was a libm call) */
            for (int d = 0; d < D; d += 32)
                bits = _mm512_max_epu16(bits, _mm512_and_si512(_mm512_loadu_si512(q + d), _mm512_set1_epi16(0x7fff)));
            float amax = bf16_to_f32((uint16_t)_mm512_reduce_max_epu32(_mm512_max_epu32(
                _mm512_and_si512(bits, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(bits, 16))));
            qscales[h][g] = amax > 0.0f ? amax / 32767.0f : 1.0f;
            __m512 inv = _mm512_set1_ps(1.0f / qscales[h][g]);
#pragma GCC unroll 8
            for (int c = 0; c < NC; c++) qs[h][g][c] = bf16_to_i16(q + c * 32, inv);
#pragma GCC unroll 16
            for (int c = 0; c < 2 * NC; c++) state[h][g][c] = _mm512_setzero_ps();
            ms[h][g] = -INFINITY;
            ls[h][g] = _mm512_setzero_ps();
        }
    for (int p = 0; p < PREFETCH_KEYS; p += 4) attn_prefetch_rows(it, 0, p);
    for (int t0 = 0; t0 < it->n_keys; t0 += bs) {
        const int blk = t0 / bs, n = it->n_keys - t0 < bs ? it->n_keys - t0 : bs;
        const char *block = it->k0 + it->table[blk] * it->block_stride;
        for (int h = 0; h < NH; h++) {
            const char *region = block + h * region_bytes;
            const int8_t *K = (const int8_t *)region, *V = (const int8_t *)(region + it->v_offset);
            const float *ks = (const float *)(region + (long)bs * D), *vs = (const float *)(region + it->v_offset + (long)bs * D);
            __m512i qv[G][NC];
            float qscale[G], m[G];
            __m512 l[G]; /* running sums of the weights, per lane: reduced once at the end */
            __m512 acc[G][2 * NC];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
#pragma GCC unroll 8
                for (int c = 0; c < NC; c++) qv[g][c] = qs[h][g][c];
#pragma GCC unroll 16
                for (int c = 0; c < 2 * NC; c++) acc[g][c] = state[h][g][c];
                qscale[g] = qscales[h][g];
                m[g] = ms[h][g];
                l[g] = ls[h][g];
            }
            for (int c0 = 0; c0 < n; c0 += KEY_CHUNK) {
                int cn = n - c0 < KEY_CHUNK ? n - c0 : KEY_CHUNK;
                float sc[G][KEY_CHUNK] __attribute__((aligned(64)));
                for (int i = 0; i < cn; i += 4) {
                    attn_prefetch_rows(it, blk, h * bs + c0 + i + PREFETCH_KEYS);
                    __m512i a[4][G];
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++)
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++) a[j][g] = _mm512_setzero_si512();
#pragma GCC unroll 8
                    for (int c = 0; c < NC; c++)
#pragma GCC unroll 4
                        for (int j = 0; j < 4; j++) {
                            int row = i + j < cn ? i + j : cn - 1; /* past the end: recompute a valid row, unused */
                            __m512i kv = load_i8(K + (long)(c0 + row) * D + c * 32);
#pragma GCC unroll 8
                            for (int g = 0; g < G; g++) a[j][g] = _mm512_dpwssd_epi32(a[j][g], kv, qv[g][c]);
                        }
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        int row = i + j < cn ? i + j : cn - 1;
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++)
                            sc[g][(i + j) & (KEY_CHUNK - 1)] = (float)_mm512_reduce_add_epi32(a[j][g]) * ks[c0 + row];
                    }
                }
                const __mmask16 k0 = (__mmask16)((1u << cn) - 1u);
                __m512 vs0 = _mm512_maskz_loadu_ps(k0, vs + c0); /* masked: past the chunk may be past the cache */
                uint32_t pp[G][KEY_CHUNK / 2] __attribute__((aligned(32)));
                float wscale[G];
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    __m512 scale = _mm512_set1_ps(it->scale * qscale[g]), ninf = _mm512_set1_ps(-INFINITY);
                    __m512 s0 = _mm512_mask_mul_ps(ninf, k0, _mm512_load_ps(sc[g]), scale);
                    float mx = _mm512_reduce_max_ps(s0);
                    if (mx > m[g]) { /* a new maximum: rescale what was summed so far */
                        float r = fexp(m[g] - mx);
                        __m512 rv = _mm512_set1_ps(r);
                        l[g] = _mm512_mul_ps(l[g], rv);
#pragma GCC unroll 16
                        for (int c = 0; c < 2 * NC; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], rv);
                        m[g] = mx;
                    }
                    __m512 p0 = _mm512_maskz_mov_ps(k0, exp512(_mm512_sub_ps(s0, _mm512_set1_ps(m[g]))));
                    l[g] = _mm512_add_ps(l[g], p0);
                    __m512 w0 = _mm512_mul_ps(p0, vs0);
                    float wmax = _mm512_reduce_max_ps(w0);
                    wscale[g] = wmax > 0.0f ? wmax / 32767.0f : 1.0f;
                    __m512 inv = _mm512_set1_ps(1.0f / wscale[g]);
                    _mm256_store_si256((__m256i *)pp[g], _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w0, inv))));
                }
                __m512i sum[G][2 * NC];
#pragma GCC unroll 8
                for (int g = 0; g < G; g++)
#pragma GCC unroll 16
                    for (int c = 0; c < 2 * NC; c++) sum[g][c] = _mm512_setzero_si512();
                for (int i = 0; i < cn; i += 2) {
                    const int8_t *v0 = V + (long)(c0 + i) * D;
                    const int8_t *v1 = i + 1 < cn ? v0 + D : v0; /* an odd last key's partner has weight 0 */
#pragma GCC unroll 8
                    for (int c = 0; c < NC; c++) {
                        __m512i r0 = load_i8(v0 + c * 32), r1 = load_i8(v1 + c * 32);
                        __m512i lo = _mm512_unpacklo_epi16(r0, r1), hi = _mm512_unpackhi_epi16(r0, r1);
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++) {
                            __m512i w = _mm512_set1_epi32((int)pp[g][i / 2]);
                            sum[g][2 * c] = _mm512_dpwssd_epi32(sum[g][2 * c], lo, w);
                            sum[g][2 * c + 1] = _mm512_dpwssd_epi32(sum[g][2 * c + 1], hi, w);
                        }
                    }
                }
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    __m512 ws = _mm512_set1_ps(wscale[g]);
#pragma GCC unroll 16
                    for (int c = 0; c < 2 * NC; c++)
                        acc[g][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[g][c]), ws, acc[g][c]);
                }
            }
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
#pragma GCC unroll 16
                for (int c = 0; c < 2 * NC; c++) state[h][g][c] = acc[g][c];
                ms[h][g] = m[g];
                ls[h][g] = l[g];
            }
        }
    }
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
            store_output(it->out + (long)(h * G + g) * D, state[h][g], D, 1.0f / _mm512_reduce_add_ps(ls[h][g]));
}

#define ATTEND_CASE(G_, D_)                                                                                            \
    if (it->G == G_ && it->D == D_) {                                                                                  \
        attend_int8_fixed(it, G_, D_);                                                                                 \
        return 1;                                                                                                      \
    }

int fabrik_attend_int8_avx512(const attn_item *it) {
    ATTEND_CASE(1, 64) ATTEND_CASE(2, 64) ATTEND_CASE(4, 64) ATTEND_CASE(8, 64)
    ATTEND_CASE(1, 128) ATTEND_CASE(2, 128) ATTEND_CASE(4, 128) ATTEND_CASE(8, 128)
    ATTEND_CASE(1, 256) ATTEND_CASE(2, 256) ATTEND_CASE(4, 256) ATTEND_CASE(8, 256)
    return 0;
}

#else

int fabrik_attend_int8_avx512(const attn_item *it) {
    (void)it;
    return 0;
}

#endif
