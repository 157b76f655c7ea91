/* Paged attention of one work item (attention.c), called by the native forward (forward.c) over (token, KV head). */
#ifndef FABRIK_ATTENTION_H
#define FABRIK_ATTENTION_H

#include <stdint.h>

#define MAX_GROUP 16     /* query heads per KV head */
#define MAX_HEAD_DIM 512

/* Where one attention work item reads: the G query heads of KV head `kvh` for batch token t of sequence s, over
 * the sequence's cached positions 0..pos(t) through its block table. The cache holds, per (K | V, block, KV head),
 * one region of bs rows: bf16 rows of D values, or (int8) rows of D int8 values followed by bs float32 scales, one
 * per row (fabrik/models/kv_int8.py). */
typedef struct {
    const uint16_t *q;     /* (G, D) bf16 queries */
    uint16_t *out;         /* (G, D) bf16 output */
    const char *k0;        /* this KV head's K region in cache block 0; block b's is at k0 + b * block_stride */
    const int64_t *table;  /* the sequence's block ids */
    long block_stride;     /* bytes of one cache block (all heads) */
    long v_offset;         /* bytes from a K region to its V region */
    int n_keys, G, D, bs;
    int int8;              /* 1: int8 rows with scales, 0: bf16 rows */
    float scale;
} attn_item;

/* Bytes of one (block, KV head) region. */
static inline long attn_region_bytes(int int8, int bs, int D) { return int8 ? (long)bs * (D + 4) : 2L * bs * D; }

/* out = softmax(q K^T * scale) V for the item's G heads, over its n_keys cached positions (causal: the caller sets
 * n_keys to the query's position + 1). */
void fabrik_attend(const attn_item *it);

/* Starts loading K and V rows [p, p + 4) into L2 (and an int8 cache's scales of them). The decode kernels issue it
 * every 4 keys, 24-32 keys ahead of use: spread out, the loads stay in flight beside the compute (a whole block's
 * worth at once stalls on the core's miss buffers): -20% time at batch 1 and -28% at batch 8 (640 cached keys, 28
 * layers, in a microbenchmark).
 * always_inline: GCC 12 deemed a helper made only of prefetches "pure" and dropped its calls when not inlined. */
static inline __attribute__((always_inline)) void attn_prefetch_rows(const attn_item *it, int p) {
    if (p >= it->n_keys) return;
    int bs = it->bs, blk = (bs & (bs - 1)) ? p / bs : p >> __builtin_ctz(bs), off = p - blk * bs;
    long row = it->int8 ? it->D : 2L * it->D;
    const char *region = it->k0 + it->table[blk] * it->block_stride, *k = region + off * row;
    const char *v = k + it->v_offset;
#pragma GCC unroll 16
    for (long b = 0; b < 4 * row; b += 64) {
        __builtin_prefetch(k + b, 0, 2);
        __builtin_prefetch(v + b, 0, 2);
    }
    if (it->int8) {
        __builtin_prefetch(region + bs * row + off * 4, 0, 2);
        __builtin_prefetch(region + it->v_offset + bs * row + off * 4, 0, 2);
    }
}

/* The int8 cache's AVX-512 decode kernel (attention_int8.c); returns 0 when it has none for the item's shape or the
 * CPU lacks AVX-512 BW / VNNI / BF16. */
int fabrik_attend_int8_avx512(const attn_item *it);

/* A prefill tile: n_q consecutive new tokens of one sequence, the G query heads of one KV head. Token i of the tile
 * reads its queries at item.q + i * q_stride, writes at item.out + i * out_stride and sees item.n_keys + i cached
 * positions (item.n_keys is the first token's). */
typedef struct {
    attn_item item;
    long q_stride, out_stride;
    int n_q;
} attn_tile;

/* How many tokens a tile may hold for this (G, head_dim); 0 when there is no tile kernel for the shape (then attend
 * each token with fabrik_attend). */
int fabrik_tile_tokens(int G, int D);

/* out = softmax(q K^T * scale) V for every row of the tile, causal; K and V are read once per tile. */
void fabrik_attend_tile(const attn_tile *tile);

#endif
