/* The decoder stack of a Llama / Qwen2 / Qwen3 model in one native call per step (bf16 activations).
 *
 * fabrik/kernels/forward.py fills the descriptors once; each step passes the batch (new tokens, rotary tables, KV
 * slots, block tables) and gets the final-normed hidden states back. Per layer:
 *
 *     h = rmsnorm(x [+ residual])          [q | k | v] = h [Wq | Wk | Wv]   (native linears, bf16 out)
 *     q, k = rope(qk_norm(q, k))           K/V cache[slot] = k, v
 *     a = paged_attention(q)                x = x + a Wo;  h = rmsnorm(x)
 *     m = silu(h Wgate) * (h Wup)          residual = m Wdown              (added by the next layer's norm)
 *
 * Numerics follow the torch modules of fabrik/models (themselves Hugging Face's): every op rounds to bf16 where the
 * torch op would, so the two paths agree to the last bit except in reduction order (norm sums, attention).
 * Attention accumulates in fp32 with an online softmax over the block table: no gathered copy of K/V, no mask.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "fabrik.h"

#define FMT_BF16 0
#define FMT_INT8 1
#define FMT_INT4 2
#define LANES 16       /* fp32 partial sums: one AVX-512 register (two AVX2 ones) */
#define KEY_CHUNK 32   /* keys scored at a time between softmax rescales */
#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_HEAD_DIM 512

typedef struct {
    const fabrik_linear *qkv;     /* q, k, v projections side by side: output row = [q | k | v] */
    const fabrik_linear *o;
    const fabrik_linear *gate_up; /* output row = [gate | up] */
    const fabrik_linear *down;
    const uint16_t *input_norm, *post_norm; /* (hidden,) bf16 */
    const uint16_t *q_norm, *k_norm;        /* (head_dim,) bf16, NULL without per-head norms */
    uint16_t *kv_cache;                     /* (2, num_blocks, n_kv_heads, block_size, head_dim) bf16 */
} fabrik_layer;

typedef struct {
    const fabrik_layer *layers;
    const uint16_t *embed;      /* (vocab, hidden) bf16 */
    const uint16_t *final_norm; /* (hidden,) bf16 */
    int32_t n_layers, vocab, hidden, n_heads, n_kv_heads, head_dim, intermediate;
    int32_t num_blocks, block_size, fmt, nthreads;
    float eps, scale;
} fabrik_model;

typedef struct {
    const int64_t *tokens;       /* (T,) */
    const uint16_t *cos, *sin;   /* (T, head_dim) bf16 */
    const int64_t *slots;        /* (T,) cache slot of each token's K/V */
    const int32_t *query_start;  /* (S + 1,) offsets of each sequence's tokens in the batch */
    const int32_t *seq_lens;     /* (S,) KV length after this step */
    const int64_t *block_tables; /* (S, max_blocks) */
    int32_t T, S, max_blocks;
} fabrik_batch;

static inline float bmul(float a, float b) { return bf16_to_f32(f32_to_bf16(a * b)); }

/* e^x to ~1 ulp for x in [-87, 88] (Cephes' polynomial); plain C so that loops over it vectorize. */
static inline float fexp(float x) {
    x = x > 88.3f ? 88.3f : (x < -87.3f ? -87.3f : x);
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

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)) over one row of n; with y, first x = bf16(x + y) in place.
 * out may be y (y is read in full before out is written). */
static void rmsnorm_row(uint16_t *x, const uint16_t *y, const uint16_t *w, int n, float eps, uint16_t *out) {
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

static void rmsnorm_rows(const fabrik_model *M, uint16_t *x, const uint16_t *y, const uint16_t *w, int T,
                         uint16_t *out) {
    int H = M->hidden;
#pragma omp parallel for num_threads(M->nthreads) if (T >= 8) schedule(static)
    for (int t = 0; t < T; t++)
        rmsnorm_row(x + (long)t * H, y ? y + (long)t * H : NULL, w, H, M->eps, out + (long)t * H);
}

/* One head in place: optional per-head RMSNorm, then rotate-half RoPE as torch computes it in bf16:
 * x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16. */
static void norm_rope_head(uint16_t *h, const uint16_t *w, float eps, const uint16_t *cos, const uint16_t *sin,
                           int D) {
    if (w) rmsnorm_row(h, NULL, w, D, eps, h);
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float x1 = bf16_to_f32(h[i]), x2 = bf16_to_f32(h[i + half]);
        float c1 = bf16_to_f32(cos[i]), c2 = bf16_to_f32(cos[i + half]);
        float s1 = bf16_to_f32(sin[i]), s2 = bf16_to_f32(sin[i + half]);
        h[i] = f32_to_bf16(bmul(x1, c1) - bmul(x2, s1));
        h[i + half] = f32_to_bf16(bmul(x2, c2) + bmul(x1, s2));
    }
}

static inline float dot_bf16(const float *q, const uint16_t *k, int D) {
    float part[LANES] = {0}, sum = 0.0f;
    int d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += q[d + l] * bf16_to_f32(k[d + l]);
    for (; d < D; d++) sum += q[d] * bf16_to_f32(k[d]);
    for (int l = 0; l < LANES; l++) sum += part[l];
    return sum;
}

/* Where one attention work item reads: the G query heads of KV head `kvh` for batch token t of sequence s, over
 * the sequence's cached positions 0..pos(t) through its block table. */
typedef struct {
    const uint16_t *q;     /* (G, D) bf16 queries */
    uint16_t *out;         /* (G, D) bf16 output */
    const uint16_t *k0;    /* this KV head's K rows in cache block 0; block b is at k0 + b * block_stride */
    const int64_t *table;  /* the sequence's block ids */
    long block_stride;     /* elements of one cache block (all heads) */
    long v_offset;         /* V half of the cache */
    int n_keys, G, D, bs;
    float scale;
} attn_item;

/* Pulls the next block's K and V rows of this head toward the cache while the current one is computed: blocks sit
 * anywhere in the cache, so the hardware prefetcher cannot guess the jump. */
static inline void prefetch_block(const attn_item *it, int t0) {
    if (t0 + it->bs >= it->n_keys) return;
    const char *K = (const char *)(it->k0 + it->table[t0 / it->bs + 1] * it->block_stride);
    long bytes = (long)it->bs * it->D * 2;
    for (long b = 0; b < bytes; b += 64) {
        __builtin_prefetch(K + b, 0, 2); /* into L2: T0 prefetches of a whole block stall on L1 miss slots */
        __builtin_prefetch(K + it->v_offset * 2 + b, 0, 2);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_ATTENTION 1

static inline __attribute__((always_inline)) __m512 exp512(__m512 x) { /* fexp on 16 lanes */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
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
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* AVX-512 path, instantiated for constant G (query heads per KV head) and D (head_dim) so that every accumulator
 * indexes with constants and stays in a register:
 *   scores: vdpbf16ps, 4 keys at a time (independent chains), exact bf16 products summed in fp32;
 *   softmax: 32 keys per chunk, running max and sum per head, exp on 16 lanes;
 *   P V:    vdpbf16ps over pairs of keys: the two V rows are interleaved (unpack lo/hi) and the softmax weights
 *           enter as bf16 pairs, as torch's flash attention feeds them to its bf16 GEMM; sums stay fp32.
 * The running outputs are kept in the unpacked order (per 32 d: lanes of d 0-3, 8-11, 16-19, 24-27, then 4-7, ...),
 * undone when they are written. */
static inline __attribute__((always_inline)) void attend_avx512_fixed(const attn_item *it, const int G, const int D) {
    const int NC = D / 32, bs = it->bs;
    __m512bh qv[G][NC];
    __m512 acc[G][2 * NC];
    float m[G], l[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(it->q + g * D + c * 32);
#pragma GCC unroll 16
        for (int c = 0; c < 2 * NC; c++) acc[g][c] = _mm512_setzero_ps();
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int t0 = 0; t0 < it->n_keys; t0 += bs) {
        const uint16_t *K = it->k0 + it->table[t0 / bs] * it->block_stride;
        const uint16_t *V = K + it->v_offset;
        int n = it->n_keys - t0 < bs ? it->n_keys - t0 : bs;
        prefetch_block(it, t0);
        for (int c0 = 0; c0 < n; c0 += KEY_CHUNK) {
            int cn = n - c0 < KEY_CHUNK ? n - c0 : KEY_CHUNK;
            float sc[G][KEY_CHUNK] __attribute__((aligned(64)));
            for (int i = 0; i < cn; i += 4) {
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
            __mmask16 k1 = cn <= 16 ? 0 : cn >= 32 ? 0xffff : (__mmask16)((1u << (cn - 16)) - 1u);
            uint32_t pp[G][KEY_CHUNK / 2] __attribute__((aligned(64)));
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                __m512 scale = _mm512_set1_ps(it->scale), ninf = _mm512_set1_ps(-INFINITY);
                __m512 s0 = _mm512_mask_mul_ps(ninf, k0, _mm512_load_ps(sc[g]), scale);
                __m512 s1 = _mm512_mask_mul_ps(ninf, k1, _mm512_load_ps(sc[g] + 16), scale);
                float mx = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
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
                __m512 p1 = _mm512_maskz_mov_ps(k1, exp512(_mm512_sub_ps(s1, mv)));
                l[g] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                _mm512_store_si512(pp[g], (__m512i)_mm512_cvtne2ps_pbh(p1, p0)); /* bf16 of keys 0..31 in order */
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
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
        float inv = 1.0f / l[g], lanes[2][16];
        uint16_t *o = it->out + (long)g * D;
        for (int c = 0; c < NC; c++) { /* lane q of lo holds d = 32c + 8q + 0..3, of hi d = 32c + 8q + 4..7 */
            _mm512_storeu_ps(lanes[0], acc[g][2 * c]);
            _mm512_storeu_ps(lanes[1], acc[g][2 * c + 1]);
            for (int q = 0; q < 4; q++)
                for (int e = 0; e < 4; e++) {
                    o[32 * c + 8 * q + e] = f32_to_bf16(lanes[0][4 * q + e] * inv);
                    o[32 * c + 8 * q + 4 + e] = f32_to_bf16(lanes[1][4 * q + e] * inv);
                }
        }
    }
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

/* Portable path: the same online softmax in plain C (vectorized by the compiler where it can). */
static void attend_generic(const attn_item *it) {
    int G = it->G, D = it->D, bs = it->bs;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], m[MAX_GROUP], l[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        for (int d = 0; d < D; d++) {
            qf[g][d] = bf16_to_f32(it->q[(long)g * D + d]);
            acc[g][d] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int t0 = 0; t0 < it->n_keys; t0 += bs) {
        const uint16_t *K = it->k0 + it->table[t0 / bs] * it->block_stride;
        const uint16_t *V = K + it->v_offset;
        int n = it->n_keys - t0 < bs ? it->n_keys - t0 : bs;
        prefetch_block(it, t0);
        for (int c0 = 0; c0 < n; c0 += KEY_CHUNK) {
            int cn = n - c0 < KEY_CHUNK ? n - c0 : KEY_CHUNK;
            for (int g = 0; g < G; g++) {
                float sc[KEY_CHUNK], mx = m[g];
                for (int i = 0; i < cn; i++) {
                    sc[i] = dot_bf16(qf[g], K + (long)(c0 + i) * D, D) * it->scale;
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
                    const uint16_t *vr = V + (long)(c0 + i) * D;
                    l[g] += sc[i];
                    for (int d = 0; d < D; d++) acc[g][d] += sc[i] * bf16_to_f32(vr[d]);
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.0f / l[g];
        for (int d = 0; d < D; d++) it->out[(long)g * D + d] = f32_to_bf16(acc[g][d] * inv);
    }
}

static void attend(const fabrik_model *M, const fabrik_layer *Ly, const fabrik_batch *B, const uint16_t *qkv,
                   long qkv_row, uint16_t *out, int t, int s, int kvh) {
    int D = M->head_dim, G = M->n_heads / M->n_kv_heads;
    int q_len = B->query_start[s + 1] - B->query_start[s];
    attn_item it = {
        .q = qkv + t * qkv_row + (long)kvh * G * D,
        .out = out + ((long)t * M->n_heads + (long)kvh * G) * D,
        .k0 = Ly->kv_cache + (long)kvh * M->block_size * D,
        .table = B->block_tables + (long)s * B->max_blocks,
        .block_stride = (long)M->n_kv_heads * M->block_size * D,
        .v_offset = (long)M->num_blocks * M->block_size * M->n_kv_heads * D,
        .n_keys = B->seq_lens[s] - q_len + (t - B->query_start[s]) + 1,
        .G = G, .D = D, .bs = M->block_size, .scale = M->scale,
    };
#ifdef HAVE_AVX512_ATTENTION
    if (attend_avx512(&it)) return;
#endif
    attend_generic(&it);
}

static int linear(const fabrik_model *M, const fabrik_linear *L, const uint16_t *x, int T, uint16_t *out) {
    int flags = X_BF16 | OUT_BF16;
    return M->fmt == FMT_INT8   ? fabrik_linear_int8(L, x, T, out, flags)
           : M->fmt == FMT_INT4 ? fabrik_linear_int4(L, x, T, out, flags)
                                : fabrik_linear_bf16(L, x, T, out, flags);
}

static int layer_forward(const fabrik_model *M, const fabrik_layer *Ly, const fabrik_batch *B, const int32_t *seq_of,
                         uint16_t *x, uint16_t *h, uint16_t *qkv, uint16_t *a, uint16_t *gu, uint16_t *act,
                         const uint16_t *residual) {
    int T = B->T, D = M->head_dim, Hq = M->n_heads, Hkv = M->n_kv_heads, I = M->intermediate;
    long kv_row = (long)Hkv * D, q_row = (long)Hq * D, qkv_row = q_row + 2 * kv_row;
    rmsnorm_rows(M, x, residual, Ly->input_norm, T, h);
    if (linear(M, Ly->qkv, h, T, qkv)) return -1;
#pragma omp parallel for num_threads(M->nthreads) if (T >= 4) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *cos = B->cos + (long)t * D, *sin = B->sin + (long)t * D;
        uint16_t *q = qkv + t * qkv_row, *k = q + q_row, *v = k + kv_row;
        for (int hh = 0; hh < Hq; hh++) norm_rope_head(q + (long)hh * D, Ly->q_norm, M->eps, cos, sin, D);
        for (int hh = 0; hh < Hkv; hh++) norm_rope_head(k + (long)hh * D, Ly->k_norm, M->eps, cos, sin, D);
        long block = B->slots[t] / M->block_size, offset = B->slots[t] % M->block_size;
        uint16_t *kc = Ly->kv_cache + (block * Hkv * M->block_size + offset) * D;
        uint16_t *vc = kc + (long)M->num_blocks * M->block_size * kv_row;
        for (int hh = 0; hh < Hkv; hh++) { /* head hh's row of this slot: block-major, then head, then offset */
            memcpy(kc + (long)hh * M->block_size * D, k + (long)hh * D, (size_t)D * 2);
            memcpy(vc + (long)hh * M->block_size * D, v + (long)hh * D, (size_t)D * 2);
        }
    }
    /* Work items are (token, KV head); causal prefill items differ in length, hence dynamic scheduling. */
#pragma omp parallel for num_threads(M->nthreads) schedule(dynamic, 1)
    for (long item = 0; item < (long)T * Hkv; item++) {
        int t = (int)(item / Hkv);
        attend(M, Ly, B, qkv, qkv_row, a, t, seq_of[t], (int)(item % Hkv));
    }
    if (linear(M, Ly->o, a, T, h)) return -1;
    rmsnorm_rows(M, x, h, Ly->post_norm, T, h);
    if (linear(M, Ly->gate_up, h, T, gu)) return -1;
#pragma omp parallel for num_threads(M->nthreads) if ((long)T * I >= 32768) schedule(static)
    for (int t = 0; t < T; t++) { /* torch: silu in fp32 rounded to bf16, then the product rounded */
        const uint16_t *g = gu + (long)t * 2 * I, *u = g + I;
        uint16_t *o = act + (long)t * I;
        for (int i = 0; i < I; i++) {
            float gf = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(bmul(gf / (1.0f + fexp(-gf)), 1.0f) * bf16_to_f32(u[i]));
        }
    }
    return linear(M, Ly->down, act, T, h);
}

/* Runs the batch through every layer and the final norm: out (T, hidden) bf16. Returns 0, -1 when out of memory,
 * -2 when the model's shape is beyond the fixed limits (MAX_GROUP query heads per KV head, MAX_HEAD_DIM), -3 when a
 * token id is outside the vocabulary. */
int fabrik_forward(const fabrik_model *M, const fabrik_batch *B, uint16_t *out) {
    int T = B->T, H = M->hidden;
    if (M->n_heads % M->n_kv_heads || M->n_heads / M->n_kv_heads > MAX_GROUP || M->head_dim > MAX_HEAD_DIM)
        return -2;
    for (int t = 0; t < T; t++)
        if (B->tokens[t] < 0 || B->tokens[t] >= M->vocab) return -3;
    long qd = (long)M->n_heads * M->head_dim, kd = (long)M->n_kv_heads * M->head_dim, I = M->intermediate;
    long elems = (long)T * (2 * H + (qd + 2 * kd) + qd + 3 * I);
    uint16_t *work = (uint16_t *)malloc((size_t)elems * 2 + (size_t)T * 4);
    if (!work) return -1;
    uint16_t *x = work, *h = x + (long)T * H, *qkv = h + (long)T * H, *a = qkv + T * (qd + 2 * kd);
    uint16_t *gu = a + T * qd, *act = gu + T * 2 * I;
    int32_t *seq_of = (int32_t *)(act + T * I);
    for (int s = 0; s < B->S; s++)
        for (int t = B->query_start[s]; t < B->query_start[s + 1]; t++) seq_of[t] = s;
    for (int t = 0; t < T; t++) memcpy(x + (long)t * H, M->embed + B->tokens[t] * H, (size_t)H * 2);
    int rc = 0;
    for (int i = 0; i < M->n_layers && rc == 0; i++)
        rc = layer_forward(M, &M->layers[i], B, seq_of, x, h, qkv, a, gu, act, i ? h : NULL);
    if (rc == 0) rmsnorm_rows(M, x, M->n_layers ? h : NULL, M->final_norm, T, out);
    free(work);
    return rc;
}
