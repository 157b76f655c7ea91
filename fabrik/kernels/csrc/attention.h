/* Paged attention of one work item (attention.c), called by the native forward (forward.c): a token and some of its
 * KV heads (decode), or a tile of tokens and one KV head (prefill). */
#ifndef FABRIK_ATTENTION_H
#define FABRIK_ATTENTION_H

#include <stdint.h>

#define MAX_GROUP 16     /* query heads per KV head */
#define MAX_HEAD_DIM 512
#define ATTN_MAX_HEADS 8 /* KV heads of one decode work item */

/* Where one attention work item reads: the G query heads of each of n_heads consecutive KV heads kvh.. for batch
 * token t of sequence s, over the sequence's cached positions 0..pos(t) through its block table. The cache holds,
 * per (K | V, block, KV head), one region of bs rows: bf16 rows of D values, or (int8) rows of D int8 values
 * followed by bs float32 scales, one per row (fabrik/models/kv_int8.py); the regions of a block's heads follow each
 * other, so a decode item reads each block's n_heads regions as one run (see fabrik_attend). */
typedef struct {
    const uint16_t *q;     /* (n_heads * G, D) bf16 queries */
    uint16_t *out;         /* (n_heads * G, D) bf16 output */
    const char *k0;        /* the first KV head's K region in cache block 0; block b's is at k0 + b * block_stride,
                              the next head's right after it */
    const int64_t *table;  /* the sequence's block ids */
    long block_stride;     /* bytes of one cache block (all heads) */
    long v_offset;         /* bytes from a K region to its V region */
    int n_keys, G, D, bs;
    int int8;              /* 1: int8 rows with scales, 0: bf16 rows */
    float scale;
    int n_heads;           /* 1..ATTN_MAX_HEADS for fabrik_attend; the prefill tile reads one head (ignored) */
} attn_item;

/* Bytes of one (block, KV head) region. */
static inline long attn_region_bytes(int int8, int bs, int D) { return int8 ? (long)bs * (D + 4) : 2L * bs * D; }

/* out = softmax(q K^T * scale) V for the item's n_heads x G query heads, over its n_keys cached positions (causal:
 * the caller sets n_keys to the query's position + 1). Blocks outer, heads inner: each block's K (and V) regions of
 * the item's heads are read as one run of n_heads x 16 KB (bf16, 64 x 128), which the hardware prefetcher follows
 * better than one head's 16 KB at a time (reads of a decode step's K/V: ~20% faster in a microbenchmark). Each
 * head's result is the same as an item of that head alone, bit for bit. */
void fabrik_attend(const attn_item *it);

/* Starts loading K and V rows [q, q + 4) of block blk's run (the item's heads' regions one after another, row q
 * of the run being row q % bs of head q / bs) into L2, and an int8 cache's scales of them; q past the run continues
 * in the next block. The decode kernels issue it every 4 keys, 24-32 keys ahead of use: spread out, the loads stay in
 * flight beside the compute (a whole block's worth at once stalls on the core's miss buffers): -20% time at batch 1
 * and -28% at batch 8 (640 cached keys, 28 layers, in a microbenchmark).
 * always_inline: GCC 12 deemed a helper made only of prefetches "pure" and dropped its calls when not inlined. */
static inline __attribute__((always_inline)) void attn_prefetch_rows(const attn_item *it, int blk, int q) {
    int bs = it->bs, pow2 = !(bs & (bs - 1)), span = it->n_heads * bs;
    if (q >= span) {
        blk++;
        q -= span;
    }
    int n = it->n_keys - blk * bs; /* keys in block blk */
    int h = pow2 ? q >> __builtin_ctz(bs) : q / bs, off = q - h * bs;
    if (off >= n) return;
    long row = it->int8 ? it->D : 2L * it->D;
    const char *region = it->k0 + it->table[blk] * it->block_stride + h * attn_region_bytes(it->int8, bs, it->D);
    const char *k = region + off * row, *v = k + it->v_offset;
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
