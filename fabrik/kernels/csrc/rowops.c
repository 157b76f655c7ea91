/* Per-row operations of the native forward (rowops.h): a portable path and, for lengths that are multiples of 16,
 * an AVX-512 one doing the same operations with the same roundings on 16 lanes (only the order of the RMSNorm sum
 * differs), and the KV cache's row writes (int8: quantized). In a 512-token prefill the portable loops were ~7% of
 * the forward. */
#include <math.h>

#include "fabrik.h"
#include "rowops.h"

#define LANES 16 /* fp32 partial sums of the portable RMSNorm */

static inline float bmul(float a, float b) { return bf16_to_f32(f32_to_bf16(a * b)); }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "attention_avx512.h"
#define HAVE_ROWOPS_AVX512 1

static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); } /* round to nearest even */
static inline __m512 round16(__m512 v) { /* v rounded to bf16, as a float */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, to_bf16(v)); }

static void rmsnorm_avx512(uint16_t *x, const uint16_t *y, const uint16_t *w, int n, float eps, uint16_t *out) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = y ? round16(_mm512_add_ps(load16(x + i), load16(y + i))) : load16(x + i);
        if (y) store16(x + i, v);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps));
    for (int i = 0; i < n; i += 16) store16(out + i, _mm512_mul_ps(round16(_mm512_mul_ps(load16(x + i), r)), load16(w + i)));
}
#endif

void fabrik_rmsnorm_row(uint16_t *x, const uint16_t *y, const uint16_t *w, int n, float eps, uint16_t *out) {
#ifdef HAVE_ROWOPS_AVX512
    if (n % 16 == 0) {
        rmsnorm_avx512(x, y, w, n, eps, out);
        return;
    }
#endif
    if (y)
        for (int i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
    float part[LANES] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float v = bf16_to_f32(x[i + l]);
            part[l] += v * v;
        }
    for (; i < n; i++) sum += bf16_to_f32(x[i]) * bf16_to_f32(x[i]);
    for (int l = 0; l < LANES; l++) sum += part[l];
    float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = f32_to_bf16(bmul(bf16_to_f32(x[i]), r) * bf16_to_f32(w[i]));
}

void fabrik_norm_rope_head(uint16_t *h, const uint16_t *w, float eps, const uint16_t *cos, const uint16_t *sin,
                           int D) {
    if (w) fabrik_rmsnorm_row(h, NULL, w, D, eps, h);
    int half = D / 2, i = 0;
#ifdef HAVE_ROWOPS_AVX512
    for (; half % 16 == 0 && i < half; i += 16) {
        __m512 x1 = load16(h + i), x2 = load16(h + i + half);
        __m512 c1 = load16(cos + i), c2 = load16(cos + i + half), s1 = load16(sin + i), s2 = load16(sin + i + half);
        store16(h + i, _mm512_sub_ps(round16(_mm512_mul_ps(x1, c1)), round16(_mm512_mul_ps(x2, s1))));
        store16(h + i + half, _mm512_add_ps(round16(_mm512_mul_ps(x2, c2)), round16(_mm512_mul_ps(x1, s2))));
    }
#endif
    for (; i < half; i++) {
        float x1 = bf16_to_f32(h[i]), x2 = bf16_to_f32(h[i + half]);
        float c1 = bf16_to_f32(cos[i]), c2 = bf16_to_f32(cos[i + half]);
        float s1 = bf16_to_f32(sin[i]), s2 = bf16_to_f32(sin[i + half]);
        h[i] = f32_to_bf16(bmul(x1, c1) - bmul(x2, s1));
        h[i + half] = f32_to_bf16(bmul(x2, c2) + bmul(x1, s2));
    }
}

void fabrik_silu_mul_row(const uint16_t *g, const uint16_t *u, int n, uint16_t *out) {
    int i = 0;
#ifdef HAVE_ROWOPS_AVX512
    for (; i + 16 <= n; i += 16) {
        __m512 gf = load16(g + i), t = _mm512_sub_ps(_mm512_setzero_ps(), gf), e = exp512(t);
        __mmask16 big = _mm512_cmp_ps_mask(t, _mm512_set1_ps(EXP_CLAMP), _CMP_GT_OQ);
        if (big) { /* rare: e^t past exp512's clamp, as (e^(t/2))^2 (inf beyond FLT_MAX, so silu = -0 as torch's) */
            __m512 half = exp512(_mm512_mul_ps(t, _mm512_set1_ps(0.5f)));
            e = _mm512_mask_mul_ps(e, big, half, half);
        }
        __m512 s = _mm512_div_ps(gf, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        store16(out + i, _mm512_mul_ps(round16(s), load16(u + i)));
    }
#endif
    for (; i < n; i++) { /* torch: silu in fp32 rounded to bf16, then the product rounded */
        float gf = bf16_to_f32(g[i]), e = fexp(-gf);
        if (-gf > EXP_CLAMP) { /* as above */
            e = fexp(-gf * 0.5f);
            e *= e;
        }
        out[i] = f32_to_bf16(bmul(gf / (1.0f + e), 1.0f) * bf16_to_f32(u[i]));
    }
}

void fabrik_store_kv_row(char *region, const uint16_t *x, long offset, int bs, int D, int int8) {
    if (!int8) {
        memcpy((uint16_t *)region + offset * D, x, (size_t)D * 2);
        return;
    }
    int8_t *r = (int8_t *)region + offset * D;
    float scale;
#ifdef HAVE_ROWOPS_AVX512
    if (D % 16 == 0) { /* the same IEEE division and ties-to-even rounding on 16 lanes (the scalar loop added
                        * 0.1-0.5 ms to a batch-1 step of the bench model, noisy timers) */
        __m512 amax = _mm512_setzero_ps(), absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
        for (int d = 0; d < D; d += 16)
            amax = _mm512_max_ps(amax, _mm512_and_ps(load16(x + d), absmask));
        scale = _mm512_reduce_max_ps(amax) / 127.0f;
        __m512 safe = _mm512_set1_ps(scale > 0.0f ? scale : 1.0f);
        for (int d = 0; d < D; d += 16) {
            __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x + d), safe),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)),
                                                         _mm512_set1_ps(127.0f)));
            _mm_storeu_si128((__m128i *)(r + d), _mm512_cvtepi32_epi8(v));
        }
        memcpy(region + (long)bs * D + offset * 4, &scale, 4);
        return;
    }
#endif
    float amax = 0.0f;
    for (int d = 0; d < D; d++) {
        float a = fabsf(bf16_to_f32(x[d]));
        amax = a > amax ? a : amax;
    }
    scale = amax / 127.0f;
    float safe = scale > 0.0f ? scale : 1.0f;
    for (int d = 0; d < D; d++) {
        float q = rintf(bf16_to_f32(x[d]) / safe);
        r[d] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
    }
    memcpy(region + (long)bs * D + offset * 4, &scale, 4);
}
