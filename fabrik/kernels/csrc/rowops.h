/* The native forward's per-row operations (rowops.c): RMSNorm (with the residual add), per-head norm + rotary,
 * SiLU-and-multiply, in bf16 with every rounding where the torch modules round; KV cache row writes. */
#ifndef FABRIK_ROWOPS_H
#define FABRIK_ROWOPS_H

#include <stdint.h>

/* out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w) over one row of n; with y, first x = bf16(x + y) in place.
 * out may be y (y is read in full before out is written) or x. */
void fabrik_rmsnorm_row(uint16_t *x, const uint16_t *y, const uint16_t *w, int n, float eps, uint16_t *out);

/* One head of D values in place: RMSNorm with w (when not NULL), then rotate-half RoPE as torch computes it in
 * bf16: x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16. */
void fabrik_norm_rope_head(uint16_t *h, const uint16_t *w, float eps, const uint16_t *cos, const uint16_t *sin,
                           int D);

/* out[i] = bf16(bf16(silu(g[i])) * u[i]) for i < n, silu in fp32 as torch computes it before rounding. */
void fabrik_silu_mul_row(const uint16_t *g, const uint16_t *u, int n, uint16_t *out);

/* Row `offset` of a KV cache (block, head) region := x (D bf16 values): copied for the bf16 cache; for the int8
 * cache (int8 = 1) quantized as fabrik/models/kv_int8.py does it, bit for bit: s = max|x| / 127, round(x / s) with
 * ties to even, the row's scale after the region's bs rows. */
void fabrik_store_kv_row(char *region, const uint16_t *x, long offset, int bs, int D, int int8);

#endif
