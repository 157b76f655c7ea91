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
 * Attention (attention.c) accumulates in fp32 with an online softmax over the block table.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <time.h>

#include "attention.h"
#include "fabrik.h"
#include "rowops.h"

#define FMT_BF16 0
#define FMT_INT8 1
#define FMT_INT4 2

typedef struct {
    const fabrik_linear *qkv;     /* q, k, v projections side by side: output row = [q | k | v] */
    const fabrik_linear *o;
    const fabrik_linear *gate_up; /* output row = [gate | up] */
    const fabrik_linear *down;
    const uint16_t *input_norm, *post_norm; /* (hidden,) bf16 */
    const uint16_t *q_norm, *k_norm;        /* (head_dim,) bf16, NULL without per-head norms */
    char *kv_cache; /* (2, num_blocks, n_kv_heads, block_size, head_dim) bf16, or the int8 layout (attention.h) */
} fabrik_layer;

/* Where the native forward's time went, in seconds summed over its calls while the model's `timings` is set
 * (`fabrik bench latency --split`); clock reads cost ~10 us per 28-layer step. */
typedef struct {
    double linears;   /* the projections: [q | k | v], o, [gate | up], down */
    double attention; /* per-head norms, rotary, K/V stores and paged attention */
    double head;      /* the LM head (with the gather of its rows) */
    double total;     /* whole calls: the above, the RMSNorms, SiLU-and-multiply, embedding rows, buffers */
    int64_t calls;
} fabrik_timings;

static inline double clock_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct {
    const fabrik_layer *layers;
    const uint16_t *embed;      /* (vocab, hidden) bf16 */
    const uint16_t *final_norm; /* (hidden,) bf16 */
    int32_t n_layers, vocab, hidden, n_heads, n_kv_heads, head_dim, intermediate;
    int32_t num_blocks, block_size, fmt, nthreads, kv_int8;
    float eps, scale;
    fabrik_timings *timings; /* NULL: not timed */
} fabrik_model;

typedef struct {
    const int64_t *tokens;       /* (T,) */
    const int64_t *positions;    /* (T,) each token's position in its sequence */
    const uint16_t *rope_cos, *rope_sin; /* (rope_rows, head_dim) bf16: the rotary tables, one row per position */
    const int64_t *slots;        /* (T,) cache slot of each token's K/V */
    const int32_t *query_start;  /* (S + 1,) offsets of each sequence's tokens in the batch */
    const int32_t *seq_lens;     /* (S,) KV length after this step */
    const int64_t *block_tables; /* (S, max_blocks) */
    /* The LM head on rows logit_rows of the output, in the same call (NULL head: none): the Python between two calls
     * that each stream the weights starts with cold caches, ~0.2 ms a step. */
    const fabrik_linear *head;
    const int32_t *logit_rows; /* (n_logits,) rows of the output, in order */
    float *logits;             /* (n_logits, vocab) float32 */
    int64_t *argmax;           /* (n_logits,) each row's argmax (fabrik_linear_bf16), or NULL */
    int32_t T, S, max_blocks, rope_rows, n_logits, head_fmt;
} fabrik_batch;

static void rmsnorm_rows(const fabrik_model *M, uint16_t *x, const uint16_t *y, const uint16_t *w, int T,
                         uint16_t *out) {
    int H = M->hidden;
#pragma omp parallel for num_threads(M->nthreads) if (T >= 8) schedule(static)
    for (int t = 0; t < T; t++)
        fabrik_rmsnorm_row(x + (long)t * H, y ? y + (long)t * H : NULL, w, H, M->eps, out + (long)t * H);
}

/* Cached positions batch token t of sequence s attends to (causal: its own position + 1). */
static inline int keys_seen(const fabrik_batch *B, int s, int t) {
    return B->seq_lens[s] - (B->query_start[s + 1] - B->query_start[s]) + (t - B->query_start[s]) + 1;
}

/* Attention of n_q consecutive new tokens from t (one sequence s) for KV heads kvh..kvh + nh - 1: one prefill tile
 * (nh = 1) when n_q > 1, else the decode kernel over the nh heads. */
static void attend(const fabrik_model *M, const fabrik_layer *Ly, const fabrik_batch *B, const uint16_t *qkv,
                   long qkv_row, uint16_t *out, int t, int n_q, int s, int kvh, int nh) {
    int D = M->head_dim, G = M->n_heads / M->n_kv_heads;
    long region = attn_region_bytes(M->kv_int8, M->block_size, D);
    attn_tile tile = {
        .item = {
            .q = qkv + t * qkv_row + (long)kvh * G * D,
            .out = out + ((long)t * M->n_heads + (long)kvh * G) * D,
            .k0 = Ly->kv_cache + kvh * region,
            .table = B->block_tables + (long)s * B->max_blocks,
            .block_stride = M->n_kv_heads * region,
            .v_offset = (long)M->num_blocks * M->n_kv_heads * region,
            .n_keys = keys_seen(B, s, t),
            .G = G, .D = D, .bs = M->block_size, .int8 = M->kv_int8, .scale = M->scale, .n_heads = nh,
        },
        .q_stride = qkv_row, .out_stride = (long)M->n_heads * D, .n_q = n_q,
    };
    if (n_q > 1) fabrik_attend_tile(&tile);
    else fabrik_attend(&tile.item);
}

/* A step's attention work, the same for every layer: prefill tiles (runs of up to a tile's worth of new tokens of one
 * sequence, each paired with every KV head) and single tokens (decode, or a chunk's last odd token) with the running
 * count of the keys they see. */
typedef struct {
    const int32_t *seq_of;   /* (T,) sequence of each token */
    const int32_t *tiles;    /* (n_tiles, 2) first token, count (> 1) */
    const int32_t *singles;  /* (n_singles,) token */
    const int64_t *keys_cum; /* (n_singles + 1,) keys seen by the singles before each */
    int n_tiles, n_singles;
} attn_work;

/* Splits the batch's tokens into runs of up to `per_tile` tokens of one sequence (1 when there is no tile kernel):
 * runs of one token go to w->singles, the others to w->tiles (buffers the caller sized for T entries each). */
static void plan_attention(const fabrik_batch *B, int per_tile, attn_work *w, int32_t *tiles, int32_t *singles,
                           int64_t *keys_cum) {
    w->n_tiles = w->n_singles = 0;
    keys_cum[0] = 0;
    if (per_tile < 1) per_tile = 1;
    for (int s = 0; s < B->S; s++) {
        int first = B->query_start[s], q_len = B->query_start[s + 1] - first;
        for (int t = first; t < first + q_len; t += per_tile) {
            int left = first + q_len - t, n = left < per_tile ? left : per_tile;
            if (n > 1) {
                tiles[2 * w->n_tiles] = t;
                tiles[2 * w->n_tiles + 1] = n;
                w->n_tiles++;
            } else {
                singles[w->n_singles] = t;
                keys_cum[w->n_singles + 1] = keys_cum[w->n_singles] + keys_seen(B, s, t);
                w->n_singles++;
            }
        }
    }
    w->tiles = tiles;
    w->singles = singles;
    w->keys_cum = keys_cum;
}

/* Thread `me` of `nt`'s share of the single tokens' attention: the (token, KV head) pairs in token order, cut into nt
 * runs of about equal key counts; the run's heads of one token go to the kernel together (up to ATTN_MAX_HEADS), so
 * that each block's regions of those heads are read as one run. Static: a batch-1 step is one item per thread. */
static void attend_singles(const fabrik_model *M, const fabrik_layer *Ly, const fabrik_batch *B, const attn_work *w,
                           const uint16_t *qkv, long qkv_row, uint16_t *out, int me, int nt) {
    int Hkv = M->n_kv_heads;
    long total = w->keys_cum[w->n_singles] * Hkv;
    for (int k = 0; k < w->n_singles && total > 0; k++) {
        long keys = w->keys_cum[k + 1] - w->keys_cum[k];
        int h0 = -1, h1 = -1;
        for (int h = 0; h < Hkv; h++) { /* the pair's owner: where the middle of its keys falls */
            long mid2 = 2 * (w->keys_cum[k] * Hkv + h * keys) + keys;
            long owner = mid2 * nt / (2 * total);
            if ((owner < nt ? owner : nt - 1) == me) {
                if (h0 < 0) h0 = h;
                h1 = h + 1;
            }
        }
        int t = w->singles[k];
        for (int h = h0; h0 >= 0 && h < h1; h += ATTN_MAX_HEADS)
            attend(M, Ly, B, qkv, qkv_row, out, t, 1, w->seq_of[t], h, h1 - h < ATTN_MAX_HEADS ? h1 - h : ATTN_MAX_HEADS);
    }
}

static int run_linear(int fmt, const fabrik_linear *L, const uint16_t *x, int T, void *out, int flags, int64_t *argmax) {
    return fmt == FMT_INT8   ? fabrik_linear_int8(L, x, T, out, flags, argmax)
           : fmt == FMT_INT4 ? fabrik_linear_int4(L, x, T, out, flags, argmax)
                             : fabrik_linear_bf16(L, x, T, out, flags, argmax);
}

static int linear(const fabrik_model *M, const fabrik_linear *L, const uint16_t *x, int T, uint16_t *out) {
    double start = M->timings ? clock_s() : 0.0;
    int rc = run_linear(M->fmt, L, x, T, out, X_BF16 | OUT_BF16, NULL);
    if (M->timings) M->timings->linears += clock_s() - start;
    return rc;
}

/* logits (n, vocab) float32 = the LM head on rows logit_rows of the final hidden states h (T, hidden) bf16. */
static int lm_head(const fabrik_model *M, const fabrik_batch *B, const uint16_t *h) {
    double start = M->timings ? clock_s() : 0.0;
    int n = B->n_logits, H = M->hidden, all = n == B->T;
    for (int i = 0; all && i < n; i++) all = B->logit_rows[i] == i;
    uint16_t *rows = all ? NULL : (uint16_t *)malloc((size_t)n * H * 2);
    if (!all && !rows) return -1;
    for (int i = 0; !all && i < n; i++) memcpy(rows + (long)i * H, h + (long)B->logit_rows[i] * H, (size_t)H * 2);
    int rc = run_linear(B->head_fmt, B->head, all ? h : rows, n, B->logits, X_BF16, B->argmax);
    free(rows);
    if (M->timings) M->timings->head += clock_s() - start;
    return rc;
}

static int layer_forward(const fabrik_model *M, const fabrik_layer *Ly, const fabrik_batch *B, const attn_work *w, uint16_t *x, uint16_t *h, uint16_t *qkv, uint16_t *a, uint16_t *gu, uint16_t *act,
                         const uint16_t *residual) {
    int T = B->T, D = M->head_dim, Hq = M->n_heads, Hkv = M->n_kv_heads, I = M->intermediate;
    long kv_row = (long)Hkv * D, q_row = (long)Hq * D, qkv_row = q_row + 2 * kv_row;
    rmsnorm_rows(M, x, residual, Ly->input_norm, T, h);
    if (linear(M, Ly->qkv, h, T, qkv)) return -1;
    double start = M->timings ? clock_s() : 0.0;
#pragma omp parallel for num_threads(M->nthreads) if (T >= 4) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *cos = B->rope_cos + B->positions[t] * D, *sin = B->rope_sin + B->positions[t] * D;
        uint16_t *q = qkv + t * qkv_row, *k = q + q_row, *v = k + kv_row;
        for (int hh = 0; hh < Hq; hh++) fabrik_norm_rope_head(q + (long)hh * D, Ly->q_norm, M->eps, cos, sin, D);
        for (int hh = 0; hh < Hkv; hh++) fabrik_norm_rope_head(k + (long)hh * D, Ly->k_norm, M->eps, cos, sin, D);
        long block = B->slots[t] / M->block_size, offset = B->slots[t] % M->block_size;
        long region = attn_region_bytes(M->kv_int8, M->block_size, D);
        char *kc = Ly->kv_cache + block * Hkv * region, *vc = kc + (long)M->num_blocks * Hkv * region;
        for (int hh = 0; hh < Hkv; hh++) { /* head hh's row of this slot: block-major, then head, then offset */
            fabrik_store_kv_row(kc + hh * region, k + (long)hh * D, offset, M->block_size, D, M->kv_int8);
            fabrik_store_kv_row(vc + hh * region, v + (long)hh * D, offset, M->block_size, D, M->kv_int8);
        }
    }
    /* Single tokens first, split evenly by key count; then prefill items (tile, KV head), which differ in length
     * (causal), dynamically scheduled. */
#pragma omp parallel num_threads(M->nthreads)
    {
        attend_singles(M, Ly, B, w, qkv, qkv_row, a, omp_get_thread_num(), omp_get_num_threads());
#pragma omp for schedule(dynamic, 1) nowait
        for (long item = 0; item < (long)w->n_tiles * Hkv; item++) {
            const int32_t *tile = w->tiles + 2 * (item / Hkv);
            attend(M, Ly, B, qkv, qkv_row, a, tile[0], tile[1], w->seq_of[tile[0]], (int)(item % Hkv), 1);
        }
    }
    if (M->timings) M->timings->attention += clock_s() - start;
    if (linear(M, Ly->o, a, T, h)) return -1;
    rmsnorm_rows(M, x, h, Ly->post_norm, T, h);
    if (linear(M, Ly->gate_up, h, T, gu)) return -1;
#pragma omp parallel for num_threads(M->nthreads) if ((long)T * I >= 32768) schedule(static)
    for (int t = 0; t < T; t++) fabrik_silu_mul_row(gu + (long)t * 2 * I, gu + (long)t * 2 * I + I, I, act + (long)t * I);
    return linear(M, Ly->down, act, T, h);
}

static int forward(const fabrik_model *M, const fabrik_batch *B, uint16_t *out) {
    int T = B->T, H = M->hidden;
    if (M->n_heads % M->n_kv_heads || M->n_heads / M->n_kv_heads > MAX_GROUP || M->head_dim > MAX_HEAD_DIM)
        return -2;
    for (int t = 0; t < T; t++)
        if (B->tokens[t] < 0 || B->tokens[t] >= M->vocab) return -3;
    for (int t = 0; t < T; t++)
        if (B->positions[t] < 0 || B->positions[t] >= B->rope_rows) return -4;
    for (int i = 0; B->head && i < B->n_logits; i++)
        if (B->logit_rows[i] < 0 || B->logit_rows[i] >= T) return -5;
    long qd = (long)M->n_heads * M->head_dim, kd = (long)M->n_kv_heads * M->head_dim, I = M->intermediate;
    long elems = (long)T * (2 * H + (qd + 2 * kd) + qd + 3 * I);
    uint16_t *work = (uint16_t *)malloc((size_t)elems * 2 + (size_t)T * 24 + 8);
    if (!work) return -1;
    uint16_t *x = work, *h = x + (long)T * H, *qkv = h + (long)T * H, *a = qkv + T * (qd + 2 * kd);
    uint16_t *gu = a + T * qd, *act = gu + T * 2 * I;
    int64_t *keys_cum = (int64_t *)(((uintptr_t)(act + T * I) + 7) & ~(uintptr_t)7);
    int32_t *seq_of = (int32_t *)(keys_cum + T + 1), *tiles = seq_of + T, *singles = tiles + 2 * T;
    for (int s = 0; s < B->S; s++)
        for (int t = B->query_start[s]; t < B->query_start[s + 1]; t++) seq_of[t] = s;
    attn_work w = {.seq_of = seq_of};
    plan_attention(B, fabrik_tile_tokens(M->n_heads / M->n_kv_heads, M->head_dim), &w, tiles, singles, keys_cum);
    for (int t = 0; t < T; t++) memcpy(x + (long)t * H, M->embed + B->tokens[t] * H, (size_t)H * 2);
    int rc = 0;
    for (int i = 0; i < M->n_layers && rc == 0; i++)
        rc = layer_forward(M, &M->layers[i], B, &w, x, h, qkv, a, gu, act, i ? h : NULL);
    if (rc == 0) rmsnorm_rows(M, x, M->n_layers ? h : NULL, M->final_norm, T, out);
    free(work);
    if (rc == 0 && B->head && B->n_logits > 0) rc = lm_head(M, B, out);
    return rc;
}

/* Runs the batch through every layer and the final norm: out (T, hidden) bf16, then the batch's LM head rows if it
 * has a head. Returns 0, -1 when out of memory, -2 when the model's shape is beyond the fixed limits (MAX_GROUP query
 * heads per KV head, MAX_HEAD_DIM), -3 when a token id is outside the vocabulary, -4 when a position is outside the
 * rotary tables, -5 when a logit row is not a row of the batch. */
int fabrik_forward(const fabrik_model *M, const fabrik_batch *B, uint16_t *out) {
    double start = M->timings ? clock_s() : 0.0;
    int rc = forward(M, B, out);
    if (M->timings) {
        M->timings->total += clock_s() - start;
        M->timings->calls++;
    }
    return rc;
}
