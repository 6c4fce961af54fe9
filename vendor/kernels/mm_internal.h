/* mm_internal.h - helpers shared by the matrix-product paths (not part of the
 * public interface): packed-layout geometry, the quantized-activation view,
 * the reference activation quantizer, prefetch addressing. The layouts are
 * described in mistrald_kernels.h. */
#ifndef MM_INTERNAL_H
#define MM_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "mistrald_kernels.h"

#define MM_TILE MK_MM_TILE_ROWS
/* Blocks whose largest magnitude is below this (or not a number) quantize to
 * zeros: 127/amax would overflow for tiny amax. */
#define MM_TINY 1e-30f

#if defined(__GNUC__)
#define MM_INLINE static inline __attribute__((always_inline))
#else
#define MM_INLINE static inline
#endif

static inline size_t mm_round64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

/* Values per block of the GGUF format, and bytes per block. */
static inline int mm_block_values(int wtype)
{
    switch (wtype) {
    case MK_W_Q4_0:
    case MK_W_Q8_0:
        return 32;
    case MK_W_Q4_K:
    case MK_W_Q6_K:
        return 256;
    default:
        return 0;
    }
}

static inline size_t mm_gguf_block_bytes(int wtype)
{
    switch (wtype) {
    case MK_W_Q4_0:
        return 18;
    case MK_W_Q8_0:
        return 34;
    case MK_W_Q4_K:
        return 144;
    case MK_W_Q6_K:
        return 210;
    default:
        return 0;
    }
}

/* Geometry of one tile: meta section bytes, quant section bytes, and the
 * bytes each advances per unit (a block of 32 for Q4_0/Q8_0, a super-block of
 * 256 for the k-quants). */
struct mm_geom {
    size_t meta, quant, meta_unit, quant_unit;
};

static inline int mm_geom(int wtype, int64_t n_cols, struct mm_geom *g)
{
    const int bv = mm_block_values(wtype);
    if (bv == 0 || n_cols <= 0 || n_cols % bv != 0 || n_cols > ((int64_t)1 << 40))
        return -1;
    const size_t units = (size_t)(n_cols / bv);
    switch (wtype) {
    case MK_W_Q4_0:
        g->meta_unit = 32, g->quant_unit = 256;
        break;
    case MK_W_Q8_0:
        g->meta_unit = 32, g->quant_unit = 512;
        break;
    case MK_W_Q4_K:
        g->meta_unit = 320, g->quant_unit = 2048;
        break;
    default: /* Q6_K */
        g->meta_unit = 320, g->quant_unit = 3072;
        break;
    }
    g->meta = mm_round64(units * g->meta_unit);
    g->quant = units * g->quant_unit;
    return 0;
}

/* Quantized activations (layout: mk_mm_act_size). */
struct mm_act {
    const int8_t *q;   /* row r at q + r * K */
    const float *d;    /* row r at d + r * nb */
    const float *ds;   /* d * (sum of the block's q) */
    const int32_t *s;  /* row r, block b: s[2*(r*nb + b)] (values 0..15), [..+1] (16..31) */
    int64_t K, nb;
};

static inline size_t mm_act_q_bytes(int64_t K, int nr)
{
    return mm_round64((size_t)K * (size_t)nr);
}

static inline size_t mm_act_f_bytes(int64_t K, int nr)
{
    return mm_round64((size_t)(K / 32) * (size_t)nr * 4);
}

/* Bytes of one chunk of nr <= 8 rows. */
static inline size_t mm_act_bytes(int64_t K, int nr)
{
    return mm_act_q_bytes(K, nr) + 2 * mm_act_f_bytes(K, nr) + mm_round64((size_t)(K / 32) * (size_t)nr * 8);
}

/* Bytes of a batch of nr rows: chunks of 8, the last with nr % 8. */
static inline size_t mm_act_batch_bytes(int64_t K, int nr)
{
    return (size_t)(nr / MK_MM_MAX_NR) * mm_act_bytes(K, MK_MM_MAX_NR) +
           (nr % MK_MM_MAX_NR ? mm_act_bytes(K, nr % MK_MM_MAX_NR) : 0);
}

static inline int mm_chunk_rows(int nr, int c)
{
    const int left = nr - c * MK_MM_MAX_NR;
    return left < MK_MM_MAX_NR ? left : MK_MM_MAX_NR;
}

static inline void mm_act_view(struct mm_act *a, const void *xq, int nr, int64_t K)
{
    const uint8_t *base = (const uint8_t *)xq;
    a->K = K;
    a->nb = K / 32;
    a->q = (const int8_t *)base;
    a->d = (const float *)(base + mm_act_q_bytes(K, nr));
    a->ds = (const float *)(base + mm_act_q_bytes(K, nr) + mm_act_f_bytes(K, nr));
    a->s = (const int32_t *)(base + mm_act_q_bytes(K, nr) + 2 * mm_act_f_bytes(K, nr));
}

/* The block scale and the multiplier that maps a value to q, exactly as every
 * path computes them (so all paths produce the same q). */
static inline void mm_block_scale(float amax, float *d, float *id)
{
    if (amax >= MM_TINY) { /* false for NaN too */
        *d = amax / 127.0f;
        *id = 127.0f / amax;
    } else {
        *d = 0.0f;
        *id = 0.0f;
    }
}

/* Writes the block's d, ds and half sums from its quantized values. */
static inline void mm_block_sums(const int8_t *q, float d, float *d_out, float *ds_out, int32_t *s_out)
{
    int32_t s0 = 0, s1 = 0;
    for (int i = 0; i < 16; i++) {
        s0 += q[i];
        s1 += q[16 + i];
    }
    *d_out = d;
    *ds_out = d * (float)(s0 + s1);
    s_out[0] = s0;
    s_out[1] = s1;
}

/* Reference quantizer (portable; lrintf rounds half to even in the default
 * rounding mode, like the vector conversions of the SIMD paths). */
static inline void mm_quantize_scalar(const float *x, int64_t x_stride, int nr, int64_t K, void *xq)
{
    struct mm_act a;
    mm_act_view(&a, xq, nr, K);
    for (int r = 0; r < nr; r++) {
        const float *xr = x + (size_t)r * (size_t)x_stride;
        int8_t *qr = (int8_t *)a.q + (size_t)r * (size_t)K;
        for (int64_t b = 0; b < a.nb; b++) {
            const float *xb = xr + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) {
                float v = fabsf(xb[i]);
                if (v > amax)
                    amax = v;
            }
            float d, id;
            mm_block_scale(amax, &d, &id);
            int8_t *qb = qr + 32 * b;
            for (int i = 0; i < 32; i++)
                qb[i] = (int8_t)lrintf(xb[i] * id);
            const size_t at = (size_t)r * (size_t)a.nb + (size_t)b;
            mm_block_sums(qb, d, (float *)a.d + at, (float *)a.ds + at, (int32_t *)a.s + 2 * at);
        }
    }
}

/* Checks the parameters of one call; returns the tile bytes, or 0 if invalid. */
static inline size_t mm_check_params(const struct mk_mm_params *p, int ith, int nth)
{
    struct mm_geom g;
    if (!p || nth <= 0 || ith < 0 || ith >= nth || p->nr < 1 || p->nr > MK_MM_MAX_BATCH || p->n_rows < 1 ||
        mm_geom(p->wtype, p->n_cols, &g) != 0 || !p->w || !p->y || p->y_stride < p->n_rows)
        return 0;
    if (!p->xq) {
        if (!p->x || p->x_stride < p->n_cols || !p->scratch ||
            p->scratch_bytes / (size_t)nth < mm_act_batch_bytes(p->n_cols, p->nr))
            return 0;
    }
    return g.meta + g.quant;
}

/* Each path's share of mk_mm_quantize_part (mm_driver.h), for the dispatcher. */
typedef void (*mm_qpart_fn)(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_scalar(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
#if defined(__x86_64__)
void mm_qpart_avx2(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_avxvnni(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_avx512(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_avx512vnni(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_avxvnni_evex(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
/* The AVX-512 VNNI path's own (512-bit) tiles, for every row count. */
int mm_matmul_avx512vnni_wide(const struct mk_mm_params *p, int ith, int nth);
#endif
#if defined(__aarch64__)
void mm_qpart_neon(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
void mm_qpart_neon_dotprod(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth);
#endif

/* Software prefetch distance in bytes (cpu_features.c). */
extern int mk_mm_pf_distance;

/* The address `dist` bytes ahead of `cur` in a section [start, end) of a tile,
 * continuing in the same section of the next tile (tile_bytes further). */
static inline const uint8_t *mm_pf_addr(const uint8_t *cur, size_t dist, const uint8_t *end, size_t sec_len,
                                        size_t tile_bytes)
{
    const uint8_t *a = cur + dist;
    if (a >= end)
        a += tile_bytes - sec_len;
    return a;
}

/* Into L2 (x86 prefetcht1, aarch64 PLDL2KEEP): measured on Zen 4 from memory,
 * 1024x4096 Q4_0, one thread: no prefetch 12-13 GB/s; into L1 8 KB ahead
 * ~15; into L2 8 KB ahead 21-29 (a plain read of the same buffers: 22-26). */
#define MM_PF(addr) __builtin_prefetch((const void *)(addr), 0, 2)

/* On x86, the 4- and 6-bit weight streams are also prefetched into L1 MM_PF_L1_DISTANCE
 * bytes ahead (lines the L2 prefetch brought in a little earlier), when the L2 prefetch
 * runs at least twice as far ahead (mm_pf_quant_lines in mm_simd.h). Measured on Zen 4
 * (2 threads, a decode-like sequence of the 7B products, one row, alternating with a plain
 * read): Q4_0's 256-bit tiles 88 -> 93 % of the read at ~32 GB/s, 77 -> 82 % at ~54, 70 ->
 * 78 % at ~60 (660 rounds); Q4_K and Q6_K +4 to +5 points, the 512-bit tiles +4 to +12. 0
 * turns it off (the aarch64 paths: not measured there). */
#if defined(__x86_64__) || defined(_M_X64)
#define MM_PF_L1_DISTANCE 2048
#else
#define MM_PF_L1_DISTANCE 0
#endif
#define MM_PF_L1(addr) __builtin_prefetch((const void *)(addr), 0, 3)

/* On x86, the 4- and 6-bit weight streams are prefetched into L2 twice: mk_mm_pf_distance
 * bytes ahead and again MM_PF_L2_AGAIN times as far (mm_pf_quant_lines in mm_simd.h): a
 * prefetch per line more to issue, and the memory stays busier when it is fast. Measured on
 * Zen 4 (the decode-like harness of BENCHMARKS.md §7, 2 threads, one row, Q4_0's 256-bit
 * tiles, 8 KB and 16 KB ahead): 87 -> 96 % of a plain read at ~61 GB/s (151 rounds), 91 ->
 * 100 % at ~56, unchanged at ~35; a single prefetch 16 KB ahead 89 %, a third at 24 KB no
 * further gain. 0 turns it off (the aarch64 paths: not measured there). */
#if defined(__x86_64__) || defined(_M_X64)
#define MM_PF_L2_AGAIN 2
#else
#define MM_PF_L2_AGAIN 0
#endif

/* Quantizes chunks [c0, c1) of a batch of nr rows with `q` (a chunk quantizer). */
static inline void mm_quantize_chunks(void (*q)(const float *, int64_t, int, int64_t, void *), const float *x,
                                      int64_t x_stride, int nr, int64_t K, void *xq, int c0, int c1)
{
    const size_t chunk = mm_act_bytes(K, MK_MM_MAX_NR);
    for (int c = c0; c < c1; c++)
        q(x + (size_t)c * MK_MM_MAX_NR * (size_t)x_stride, x_stride, mm_chunk_rows(nr, c), K,
          (uint8_t *)xq + (size_t)c * chunk);
}

/* Tile function: computes out[r*16 + i] = row i of the tile times activation row r. */
typedef void (*mm_tile_fn)(const uint8_t *tile, size_t tile_bytes, const struct mm_act *a, float *out);

#endif /* MM_INTERNAL_H */
