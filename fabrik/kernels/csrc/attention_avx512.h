/* What the AVX-512 attention kernels (attention.c, attention_prefill.c) share: e^x on 16 lanes, and the write-out of
 * a running output kept in the P x V kernels' unpacked lane order. */
#ifndef FABRIK_ATTENTION_AVX512_H
#define FABRIK_ATTENTION_AVX512_H

#include <immintrin.h>

#include "fabrik.h"

static inline __attribute__((always_inline)) __m512 exp512(__m512 x) { /* fexp on 16 lanes */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(EXP_CLAMP));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p * 2^n in one instruction: the same bits as fexp's multiply by 2^n */
}

/* o[0..D) = bf16(acc * inv) for one head's running output acc[2 * D / 32], whose lanes are in the unpacked order of
 * the P x V products: per 32 d, lane q of the lo vector holds d = 32c + 8q + 0..3, of the hi vector d = 32c + 8q + 4..7. */
static inline void store_output(uint16_t *o, const __m512 *acc, int D, float inv) {
    for (int c = 0; c < D / 32; c++) {
        float lanes[2][16];
        _mm512_storeu_ps(lanes[0], acc[2 * c]);
        _mm512_storeu_ps(lanes[1], acc[2 * c + 1]);
        for (int q = 0; q < 4; q++)
            for (int e = 0; e < 4; e++) {
                o[32 * c + 8 * q + e] = f32_to_bf16(lanes[0][4 * q + e] * inv);
                o[32 * c + 8 * q + 4 + e] = f32_to_bf16(lanes[1][4 * q + e] * inv);
            }
    }
}

#endif
