/* What the int8 / int4 linear kernels share (linear_quant.c: quantization, AVX-512 kernels, entry points;
 * linear_quant_avx2.c: AVX2 kernels): the quantized activations and where a block keeps a unit's data and scales. */
#ifndef FABRIK_LINEAR_QUANT_H
#define FABRIK_LINEAR_QUANT_H

#include "linear.h"

/* Activations quantized per group of the weights' size (32, or 64 / 128 for int4-g64 / -g128; symmetric absmax, like
 * the weights); the integer dot product of a group of 32 is exact, then scaled by w_scale * x_scale in fp32. The
 * scale and correction arrays keep one entry per 32 values, repeated across a larger group. */
typedef struct {
    int8_t *q;     /* (M, Kp) quantized x */
    float *scale;  /* (M, Kp / 32) */
    int32_t *corr; /* (M, Kp / 32): zero point (128 or 8) * sum of q over the 32: removes the weights' + zero */
} quant_x;

/* Where a block's 64-K unit s keeps its data and its scales, for BITS and GS (weights per scale) constants:
 * units of GS = 128 pair up behind one line of 16 scales; GS = 64 has one line per unit; GS = 32 two lines. */
#define UNIT_DATA(BITS) ((BITS) == 8 ? UNIT_BYTES - 64 : UNIT_BYTES4 - 64)
#define SUPER_UNITS(GS) ((GS) == 128 ? 2 : 1)
#define SUPER_BYTES(BITS, GS) (SUPER_UNITS(GS) * UNIT_DATA(BITS) + ((GS) == 32 ? 64 : 32))
static inline const uint8_t *unit_data(const uint8_t *blk, int s, int BITS, int GS) {
    return blk + (long)(s / SUPER_UNITS(GS)) * SUPER_BYTES(BITS, GS) + (long)(s % SUPER_UNITS(GS)) * UNIT_DATA(BITS);
}
static inline const uint8_t *unit_scales(const uint8_t *blk, int s, int BITS, int GS) {
    return blk + (long)(s / SUPER_UNITS(GS)) * SUPER_BYTES(BITS, GS) + SUPER_UNITS(GS) * UNIT_DATA(BITS);
}
static inline long block_bytes(const fabrik_linear *L, int BITS, int GS) {
    return (long)(L->kp / UNIT_K / SUPER_UNITS(GS)) * SUPER_BYTES(BITS, GS);
}

/* Quantizes group g (of xg values) of row m of x (linear_quant.c): the reference every vector path matches. */
void quantize_group(const void *x, int flags, int m, int g, int xg, int K, int Kp, int zp, quant_x *qx);

/* The same for a whole row, 8 lanes at a time (linear_quant_avx2.c). */
void quantize_row_avx2(const void *x, int flags, int m, int xg, int K, int Kp, int zp, quant_x *qx);

/* The AVX2 kernels: out (M, N) from qx and the layer's blocks, with the argmax lanes when `lanes` is not NULL. */
typedef void (*quant_run)(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes);
void int8_run_avx2(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes);
void int4_run_avx2(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes);
void int4g64_run_avx2(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes);
void int4g128_run_avx2(const fabrik_linear *L, const quant_x *qx, int M, void *out, int flags, lane_max *lanes);

#endif
