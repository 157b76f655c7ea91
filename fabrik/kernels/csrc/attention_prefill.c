/* Paged attention of a prefill tile (attention.h): up to TILE_ROWS rows (tokens x query heads) of one sequence and
 * KV head against its cached positions, so that each 16-key chunk of K and V is read and rearranged once for all of
 * them instead of once per token (the decode kernel, attention.c, scores one row at a time with horizontal sums).
 *
 *   per 16-key chunk:  K (16 keys x D)  --transpose-->  kt[D/2]: lane j of kt[p] = key j's dims (2p, 2p + 1)
 *                      V (16 keys x D)  --interleave--> vi[8][D/16]: keys (2i, 2i + 1) as bf16 pairs
 *   per row:           s = sum_p vdpbf16ps(kt[p], q pair p)      (16 scores in one vector, no horizontal sums)
 *                      online softmax on s, then acc += vdpbf16ps(vi, weight pairs)   (as the decode kernel)
 */
#include <math.h>

#include "attention.h"
#include "fabrik.h"

#define TILE_ROWS 32 /* rows of one tile: their running outputs (TILE_ROWS * D floats) stay in L1 / L2 */
#define RB 4         /* rows scored and summed together */

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "attention_avx512.h"

int fabrik_tile_tokens(int G, int D) {
    if (G < 1 || G > TILE_ROWS || (D != 64 && D != 128 && D != 256)) return 0;
    return TILE_ROWS / G;
}

/* acc += k . broadcast(*q) (a bf16 pair) with the broadcast folded into the instruction ({1to16}): GCC emits a
 * separate vpbroadcastd for _mm512_set1_epi32, one extra uop per vdpbf16ps. */
static inline __attribute__((always_inline)) __m512 dpbf16_bcast(__m512 acc, __m512i k, const uint32_t *q) {
    __asm__("vdpbf16ps %[q]%{1to16%}, %[k], %[acc]" : [acc] "+v"(acc) : [k] "v"(k), [q] "m"(*q));
    return acc;
}

/* r[j] = 16 dwords of row j; afterwards r[p] = dword p of rows 0..15 (a 16 x 16 transpose in 64 shuffles). */
static inline __attribute__((always_inline)) void transpose16(__m512i *r) {
    __m512i a[16], b[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: x0 y0 x1 y1 | x2 y2 x3 y3 */
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) { /* b[4i + e], lane L: dword 4L + e of rows 4i .. 4i + 3 */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
#pragma GCC unroll 4
    for (int e = 0; e < 4; e++) { /* dword 4L + e of all rows: lane L of b[e], b[4 + e], b[8 + e], b[12 + e] */
        __m512i s0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44), s1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xEE);
        __m512i s2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
        __m512i s3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xEE);
        r[e] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        r[8 + e] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
}

/* Rows [c0, c0 + cn) of an int8 region (values, then bs float32 scales) as bf16 rows of D: round(v * scale). */
static inline void dequantize_rows(const char *region, int bs, int c0, int cn, int D, uint16_t *out) {
    const float *scales = (const float *)(region + (long)bs * D);
    for (int j = 0; j < cn; j++) {
        const int8_t *r = (const int8_t *)region + (long)(c0 + j) * D;
        __m512 s = _mm512_set1_ps(scales[c0 + j]);
        for (int d = 0; d < D; d += 32) {
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r + d))));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r + d + 16))));
            _mm512_storeu_si512(out + (long)j * D + d,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s)));
        }
    }
}

static inline __attribute__((always_inline)) void tile_fixed(const attn_tile *tile, const int D) {
    const attn_item *it = &tile->item;
    const int G = it->G, NC = D / 32, bs = it->bs, rows = tile->n_q * G;
    const int last_keys = it->n_keys + tile->n_q - 1; /* keys seen by the tile's last token */
    __m512i kt[D / 2];
    __m512bh vi[8][2 * NC];
    __m512 acc[TILE_ROWS][2 * NC];
    float m[TILE_ROWS];
    __m512 l[TILE_ROWS]; /* softmax denominators as 16 lane sums: one add per chunk instead of a horizontal sum */
    for (int r = 0; r < (rows + RB - 1) / RB * RB; r++) {
        for (int c = 0; c < 2 * NC; c++) acc[r][c] = _mm512_setzero_ps();
        m[r] = -INFINITY;
        l[r] = _mm512_setzero_ps();
    }
    const __m512 scale = _mm512_set1_ps(it->scale), ninf = _mm512_set1_ps(-INFINITY);
    const long row_bytes = it->int8 ? D : 2L * D;
    uint16_t kbuf[16 * D], vbuf[16 * D]; /* an int8 chunk dequantized to bf16 */
    for (int t0 = 0; t0 < last_keys; t0 += bs) {
        const char *region = it->k0 + it->table[t0 / bs] * it->block_stride;
        int n = last_keys - t0 < bs ? last_keys - t0 : bs;
        for (int c0 = 0; c0 < n; c0 += 16) {
            const int cn = n - c0 < 16 ? n - c0 : 16, tc = t0 + c0;
            const uint16_t *K = (const uint16_t *)region + (long)c0 * D;
            const uint16_t *V = (const uint16_t *)(region + it->v_offset) + (long)c0 * D;
            if (it->int8) { /* once per chunk for all rows: the same bf16 keys and values torch's reference reads */
                dequantize_rows(region, bs, c0, cn, D, kbuf);
                dequantize_rows(region + it->v_offset, bs, c0, cn, D, vbuf);
                K = kbuf, V = vbuf;
            }
            if (tc + 16 < last_keys) { /* the next chunk's K and V toward L2 while this one is computed */
                int nt = tc + 16, blk = nt / bs, off = nt - blk * bs;
                const char *nr = it->k0 + it->table[blk] * it->block_stride, *nk = nr + off * row_bytes;
                for (long b = 0; b < 16 * row_bytes; b += 64) {
                    __builtin_prefetch(nk + b, 0, 2);
                    __builtin_prefetch(nk + it->v_offset + b, 0, 2);
                }
                if (it->int8) {
                    __builtin_prefetch(nr + bs * row_bytes + off * 4, 0, 2);
                    __builtin_prefetch(nr + it->v_offset + bs * row_bytes + off * 4, 0, 2);
                }
            }
            for (int c = 0; c < NC; c++) { /* rows past cn repeat the last one: their scores are masked */
                __m512i r[16];
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(K + (long)(j < cn ? j : cn - 1) * D + c * 32);
                transpose16(r);
#pragma GCC unroll 16
                for (int p = 0; p < 16; p++) kt[16 * c + p] = r[p];
            }
            for (int i = 0; i < 8; i++) { /* an odd last key's partner repeats it with weight 0 */
                const uint16_t *v0 = V + (long)(2 * i < cn ? 2 * i : cn - 1) * D;
                const uint16_t *v1 = V + (long)(2 * i + 1 < cn ? 2 * i + 1 : cn - 1) * D;
                for (int c = 0; c < NC; c++) {
                    __m512i r0 = _mm512_loadu_si512(v0 + c * 32), r1 = _mm512_loadu_si512(v1 + c * 32);
                    vi[i][2 * c] = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
                    vi[i][2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
                }
            }
            for (int r0 = 0; r0 < rows; r0 += RB) { /* RB rows at a time: each kt / vi load feeds RB of them */
                const uint32_t *q[RB];
                __mmask16 valid[RB];
                int any = 0;
#pragma GCC unroll 4
                for (int k = 0; k < RB; k++) { /* rows past the tile repeat its last one, their results unused */
                    int r = r0 + k < rows ? r0 + k : rows - 1, tok = r / G, seen = it->n_keys + tok - tc;
                    q[k] = (const uint32_t *)(it->q + tok * tile->q_stride + (long)(r % G) * D);
                    valid[k] = seen <= 0 ? 0 : (__mmask16)((1u << (seen < cn ? seen : cn)) - 1u); /* causal */
                    any |= valid[k];
                }
                if (!any) continue;
                __m512 sa[RB], sb[RB]; /* two chains per row: vdpbf16ps latency */
#pragma GCC unroll 4
                for (int k = 0; k < RB; k++) sa[k] = sb[k] = _mm512_setzero_ps();
#pragma GCC unroll 4
                for (int p = 0; p < D / 2; p += 2) {
#pragma GCC unroll 4
                    for (int k = 0; k < RB; k++) {
                        sa[k] = dpbf16_bcast(sa[k], kt[p], q[k] + p);
                        sb[k] = dpbf16_bcast(sb[k], kt[p + 1], q[k] + p + 1);
                    }
                }
                uint32_t pp[RB][8] __attribute__((aligned(32)));
#pragma GCC unroll 4
                for (int k = 0; k < RB; k++) {
                    const int r = r0 + k;
                    __m512 s = _mm512_mask_mul_ps(ninf, valid[k], _mm512_add_ps(sa[k], sb[k]), scale);
                    float mx = valid[k] ? _mm512_reduce_max_ps(s) : -INFINITY;
                    if (mx > m[r]) { /* a new maximum: rescale what was summed so far */
                        float f = fexp(m[r] - mx);
                        __m512 a = _mm512_set1_ps(f);
                        l[r] = _mm512_mul_ps(l[r], a);
                        for (int c = 0; c < 2 * NC; c++) acc[r][c] = _mm512_mul_ps(acc[r][c], a);
                        m[r] = mx;
                    }
                    __m512 pr = _mm512_maskz_mov_ps(valid[k], exp512(_mm512_sub_ps(s, _mm512_set1_ps(m[r]))));
                    l[r] = _mm512_add_ps(l[r], pr);
                    _mm256_store_si256((__m256i *)pp[k], (__m256i)_mm512_cvtneps_pbh(pr)); /* keys 2i, 2i+1 */
                }
                for (int c = 0; c < 2 * NC; c++) {
                    __m512 o[RB];
#pragma GCC unroll 4
                    for (int k = 0; k < RB; k++) o[k] = acc[r0 + k][c];
#pragma GCC unroll 8
                    for (int i = 0; i < 8; i++)
#pragma GCC unroll 4
                        for (int k = 0; k < RB; k++)
                            o[k] = dpbf16_bcast(o[k], (__m512i)vi[i][c], &pp[k][i]);
#pragma GCC unroll 4
                    for (int k = 0; k < RB; k++) acc[r0 + k][c] = o[k];
                }
            }
        }
    }
    for (int r = 0; r < rows; r++)
        store_output(it->out + (r / G) * tile->out_stride + (long)(r % G) * D, acc[r], D,
                     1.0f / _mm512_reduce_add_ps(l[r]));
}

void fabrik_attend_tile(const attn_tile *tile) {
    switch (tile->item.D) {
    case 64: tile_fixed(tile, 64); break;
    case 128: tile_fixed(tile, 128); break;
    default: tile_fixed(tile, 256); break;
    }
}

#else

int fabrik_tile_tokens(int G, int D) {
    (void)G, (void)D;
    return 0;
}

void fabrik_attend_tile(const attn_tile *tile) { (void)tile; }

#endif
