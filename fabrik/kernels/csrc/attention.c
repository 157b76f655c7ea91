/* Paged attention of one work item: for one new token, the G query heads that share a KV head, for each of the
 * item's KV heads, over the sequence's cached positions read through its block table with an online softmax (running
 * max and sum per head): no gathered copy of K/V, no mask. An AVX-512 path instantiated per (G, head_dim) and a
 * portable C path.
 *
 * Cache layout (fabrik/models/attention.py): (2, num_blocks, n_kv_heads, block_size, head_dim) bf16, so one head's
 * rows of a block are contiguous; the int8 cache (fabrik/models/kv_int8.py) keeps that order, each (block, head)
 * region ending with its rows' float32 scales.
 */
#include <math.h>
#include <stdlib.h>

#include "attention.h"
#include "fabrik.h"

#define LANES 16     /* fp32 partial sums of the portable path */
/* Keys scored at a time between softmax rescales: one vector of scores, and the prefill tiles' chunk, so that a token
 * attended here or in a tile meets the same rescales (chunked prefill == one shot, token for token). */
#define KEY_CHUNK 16

/* Row `off` of a region as floats: bf16 values, or int8 values times the row's scale. */
static inline void row_to_f32(const attn_item *it, const char *region, int off, float *dst) {
    int D = it->D;
    if (it->int8) {
        const int8_t *r = (const int8_t *)region + (long)off * D;
        float s = ((const float *)(region + (long)it->bs * D))[off];
        for (int d = 0; d < D; d++) dst[d] = (float)r[d] * s;
    } else {
        const uint16_t *r = (const uint16_t *)region + (long)off * D;
        for (int d = 0; d < D; d++) dst[d] = bf16_to_f32(r[d]);
    }
}

static inline float dot_f32(const float *q, const float *k, int D) {
    float part[LANES] = {0}, sum = 0.0f;
    int d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += q[d + l] * k[d + l];
    for (; d < D; d++) sum += q[d] * k[d];
    for (int l = 0; l < LANES; l++) sum += part[l];
    return sum;
}

#define PREFETCH_KEYS 24

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "attention_avx512.h"
#define HAVE_AVX512_ATTENTION 1

/* AVX-512 path, instantiated for constant G (query heads per KV head) and D (head_dim) so that every accumulator
 * indexes with constants and stays in a register:
 *   scores: vdpbf16ps, 4 keys at a time (independent chains), exact bf16 products summed in fp32;
 *   softmax: 16 keys per chunk, running max and sum per head, exp on 16 lanes;
 *   P V:    vdpbf16ps over pairs of keys: the two V rows are interleaved (unpack lo/hi) and the softmax weights
 *           enter as bf16 pairs, as torch's flash attention feeds them to its bf16 GEMM; sums stay fp32.
 * The running outputs are kept in the unpacked order (per 32 d: lanes of d 0-3, 8-11, 16-19, 24-27, then 4-7, ...),
 * undone when they are written. */
static inline __attribute__((always_inline)) void attend_avx512_fixed(const attn_item *it, const int G, const int D) {
    const int NC = D / 32, bs = it->bs, NH = it->n_heads;
    const long region_bytes = attn_region_bytes(0, bs, D);
    __m512 state[ATTN_MAX_HEADS][G][2 * NC]; /* each head's running output between blocks */
    float ms[ATTN_MAX_HEADS][G], ls[ATTN_MAX_HEADS][G];
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
#pragma GCC unroll 16
            for (int c = 0; c < 2 * NC; c++) state[h][g][c] = _mm512_setzero_ps();
            ms[h][g] = -INFINITY;
            ls[h][g] = 0.0f;
        }
    for (int p = 0; p < PREFETCH_KEYS; p += 4) attn_prefetch_rows(it, 0, p);
    for (int t0 = 0; t0 < it->n_keys; t0 += bs) {
        const int blk = t0 / bs, n = it->n_keys - t0 < bs ? it->n_keys - t0 : bs;
        const char *block = it->k0 + it->table[blk] * it->block_stride;
        for (int h = 0; h < NH; h++) {
            const uint16_t *K = (const uint16_t *)(block + h * region_bytes);
            const uint16_t *V = (const uint16_t *)(block + h * region_bytes + it->v_offset);
            __m512bh qv[G][NC];
            __m512 acc[G][2 * NC];
            float m[G], l[G];
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
#pragma GCC unroll 8
                for (int c = 0; c < NC; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(it->q + (h * G + g) * D + c * 32);
#pragma GCC unroll 16
                for (int c = 0; c < 2 * NC; c++) acc[g][c] = state[h][g][c];
                m[g] = ms[h][g];
                l[g] = ls[h][g];
            }
            for (int c0 = 0; c0 < n; c0 += KEY_CHUNK) {
                int cn = n - c0 < KEY_CHUNK ? n - c0 : KEY_CHUNK;
                float sc[G][KEY_CHUNK] __attribute__((aligned(64)));
                for (int i = 0; i < cn; i += 4) {
                    attn_prefetch_rows(it, blk, h * bs + c0 + i + PREFETCH_KEYS);
                    __m512 a[4][G];
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++)
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++) a[j][g] = _mm512_setzero_ps();
#pragma GCC unroll 8
                    for (int c = 0; c < NC; c++)
#pragma GCC unroll 4
                        for (int j = 0; j < 4; j++) {
                            int row = i + j < cn ? i + j : cn - 1; /* past the end: recompute a valid row, unused */
                            __m512bh kv = (__m512bh)_mm512_loadu_si512(K + (long)(c0 + row) * D + c * 32);
#pragma GCC unroll 8
                            for (int g = 0; g < G; g++) a[j][g] = _mm512_dpbf16_ps(a[j][g], qv[g][c], kv);
                        }
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++)
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++) sc[g][(i + j) & (KEY_CHUNK - 1)] = _mm512_reduce_add_ps(a[j][g]);
                }
                __mmask16 k0 = cn >= 16 ? 0xffff : (__mmask16)((1u << cn) - 1u);
                uint32_t pp[G][KEY_CHUNK / 2] __attribute__((aligned(32)));
#pragma GCC unroll 8
                for (int g = 0; g < G; g++) {
                    __m512 scale = _mm512_set1_ps(it->scale), ninf = _mm512_set1_ps(-INFINITY);
                    __m512 s0 = _mm512_mask_mul_ps(ninf, k0, _mm512_load_ps(sc[g]), scale);
                    float mx = _mm512_reduce_max_ps(s0);
                    if (mx > m[g]) { /* a new maximum: rescale what was summed so far */
                        float r = fexp(m[g] - mx);
                        __m512 rv = _mm512_set1_ps(r);
                        l[g] *= r;
#pragma GCC unroll 16
                        for (int c = 0; c < 2 * NC; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], rv);
                        m[g] = mx;
                    }
                    __m512 mv = _mm512_set1_ps(m[g]);
                    __m512 p0 = _mm512_maskz_mov_ps(k0, exp512(_mm512_sub_ps(s0, mv)));
                    l[g] += _mm512_reduce_add_ps(p0);
                    _mm256_store_si256((__m256i *)pp[g], (__m256i)_mm512_cvtneps_pbh(p0)); /* bf16 of keys 0..15 */
                }
                for (int i = 0; i < cn; i += 2) {
                    const uint16_t *v0 = V + (long)(c0 + i) * D;
                    const uint16_t *v1 = i + 1 < cn ? v0 + D : v0; /* an odd last key's partner has weight 0 */
#pragma GCC unroll 8
                    for (int c = 0; c < NC; c++) {
                        __m512i r0 = _mm512_loadu_si512(v0 + c * 32), r1 = _mm512_loadu_si512(v1 + c * 32);
                        __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
                        __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
#pragma GCC unroll 8
                        for (int g = 0; g < G; g++) {
                            __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[g][i / 2]);
                            acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], lo, w);
                            acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], hi, w);
                        }
                    }
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
        for (int g = 0; g < G; g++) store_output(it->out + (long)(h * G + g) * D, state[h][g], D, 1.0f / ls[h][g]);
}

#define ATTEND_CASE(G_, D_)                                                                                            \
    if (it->G == G_ && it->D == D_) {                                                                                  \
        attend_avx512_fixed(it, G_, D_);                                                                               \
        return 1;                                                                                                      \
    }

/* Runs the item on an instantiated (G, D); returns 0 when there is none for its shape. */
static int attend_avx512(const attn_item *it) {
    ATTEND_CASE(1, 64) ATTEND_CASE(2, 64) ATTEND_CASE(4, 64) ATTEND_CASE(8, 64)
    ATTEND_CASE(1, 128) ATTEND_CASE(2, 128) ATTEND_CASE(4, 128) ATTEND_CASE(8, 128)
    ATTEND_CASE(1, 256) ATTEND_CASE(2, 256) ATTEND_CASE(4, 256) ATTEND_CASE(8, 256)
    return 0;
}
#endif

/* Portable path: the same online softmax in plain C (vectorized by the compiler where it can), either cache kind;
 * one head (the caller splits a many-head item). */
static void attend_generic(const attn_item *it) {
    int G = it->G, D = it->D, bs = it->bs;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], m[MAX_GROUP], l[MAX_GROUP];
    float kf[KEY_CHUNK][MAX_HEAD_DIM], vf[MAX_HEAD_DIM];
    for (int g = 0; g < G; g++) {
        for (int d = 0; d < D; d++) {
            qf[g][d] = bf16_to_f32(it->q[(long)g * D + d]);
            acc[g][d] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int p = 0; p < PREFETCH_KEYS; p += 4) attn_prefetch_rows(it, 0, p);
    for (int t0 = 0; t0 < it->n_keys; t0 += bs) {
        const char *K = it->k0 + it->table[t0 / bs] * it->block_stride, *V = K + it->v_offset;
        int n = it->n_keys - t0 < bs ? it->n_keys - t0 : bs;
        for (int c0 = 0; c0 < n; c0 += KEY_CHUNK) {
            int cn = n - c0 < KEY_CHUNK ? n - c0 : KEY_CHUNK;
            for (int i = 0; i < cn; i++) {
                if (!(i & 3)) attn_prefetch_rows(it, t0 / bs, c0 + i + PREFETCH_KEYS);
                row_to_f32(it, K, c0 + i, kf[i]);
            }
            for (int g = 0; g < G; g++) {
                float sc[KEY_CHUNK], mx = m[g];
                for (int i = 0; i < cn; i++) {
                    sc[i] = dot_f32(qf[g], kf[i], D) * it->scale;
                    mx = sc[i] > mx ? sc[i] : mx;
                }
                if (mx > m[g]) { /* a new maximum: rescale what was summed so far */
                    float a = fexp(m[g] - mx);
                    l[g] *= a;
                    for (int d = 0; d < D; d++) acc[g][d] *= a;
                    m[g] = mx;
                }
                for (int i = 0; i < cn; i++) sc[i] = fexp(sc[i] - mx);
                for (int i = 0; i < cn; i++) {
                    row_to_f32(it, V, c0 + i, vf);
                    l[g] += sc[i];
                    for (int d = 0; d < D; d++) acc[g][d] += sc[i] * vf[d];
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.0f / l[g];
        for (int d = 0; d < D; d++) it->out[(long)g * D + d] = f32_to_bf16(acc[g][d] * inv);
    }
}

void fabrik_attend(const attn_item *it) {
    if (it->int8) {
        if (fabrik_attend_int8_avx512(it)) return;
    }
#ifdef HAVE_AVX512_ATTENTION
    else if (attend_avx512(it)) return;
#endif
    long region = attn_region_bytes(it->int8, it->bs, it->D), qo = (long)it->G * it->D;
    for (int h = 0; h < it->n_heads; h++) {
        attn_item one = *it;
        one.q += h * qo;
        one.out += h * qo;
        one.k0 += h * region;
        one.n_heads = 1;
        attend_generic(&one);
    }
}
