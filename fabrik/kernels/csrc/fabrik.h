/* Declarations shared by the native kernel sources (linear.c, forward.c). Python mirrors every struct here with a
 * ctypes.Structure (fabrik/kernels/native.py, forward.py); bump FABRIK_ABI_VERSION when one changes. */
#ifndef FABRIK_H
#define FABRIK_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FABRIK_ABI_VERSION 10

#define ISA_AVX512 1
#define ISA_AVX2 2

/* Flags of a linear call. */
#define X_BF16 1   /* x is bf16, else float32 */
#define OUT_BF16 2 /* out is bf16, else float32 */

/* One packed linear layer; Python fills it once (a ctypes Structure) and passes its address on every call. */
typedef struct {
    const void *weight; /* packed blocks */
    const float *bias;  /* (N,) float32 or NULL */
    int32_t n;          /* output features */
    int32_t k;          /* input features */
    int32_t kp;         /* K padded: to 2 (bf16) or 64 (int8) */
    int32_t nblocks;    /* ceil(N / 16) */
    int32_t nthreads;
    int32_t isa;        /* ISA_AVX512 or ISA_AVX2 */
    int32_t group;      /* weights per quantization scale along K: 32 (int8, int4), 64 or 128 (int4) */
} fabrik_linear;

/* argmax: NULL, or (M,) int64 that receives each row's argmax of a float32 out (linear.c, fabrik_linear_bf16). */
int fabrik_linear_bf16(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax);
int fabrik_linear_int8(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax);
int fabrik_linear_int4(const fabrik_linear *L, const void *x, int M, void *out, int flags, int64_t *argmax);

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The largest x whose e^x fexp / exp512 compute: above it they return e^88.3, not e^x (inf past ~88.72). */
#define EXP_CLAMP 88.3f

/* e^x to ~1 ulp for x in [-87, 88] (Cephes' polynomial); plain C so that loops over it vectorize. */
static inline float fexp(float x) {
    x = x > EXP_CLAMP ? EXP_CLAMP : (x < -87.3f ? -87.3f : x);
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

#endif
