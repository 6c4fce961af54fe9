/* mk_internal.h - helpers shared by the kernel paths (not part of the public interface). */
#ifndef MK_INTERNAL_H
#define MK_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "mistrald_kernels.h"

/* Query heads of one group scored together by the row primitives; larger
 * groups are processed as several sub-groups. */
#define MK_MAX_G 16
/* Keys scored per tile before the softmax state is updated. */
#define MK_TILE 32
/* How many tiles ahead the ring rows are prefetched (1: the next tile). */
#define MK_PF_TILES 1
/* Most query heads, and most accumulator floats, of one work unit (its state
 * lives on the stack: at most 32 KiB of accumulators). */
#define MK_BLOCK_HEADS 64
#define MK_STATE_FLOATS 8192
/* Most parts one unit's key range is split into. */
#define MK_MAX_SPLIT 64
/* Bytes per work-unit counter in the scratch memory (one cache line). */
#define MK_COUNTER_BYTES 64

/* IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN). */
static inline float mk_h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    uint32_t bits;
    float f;
    if (em >= 0x7c00u) {
        bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
    } else if (em >= 0x0400u) {
        bits = sign | ((em + ((127u - 15u) << 10)) << 13);
    } else {
        f = (float)em * 5.9604644775390625e-8f; /* em * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t mk_load_u16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* The query heads of one sub-group, as the row primitives see them. */
struct mk_qctx {
    const float *q;     /* [ng][D] f32 query rows */
    int D;              /* head_dim */
    int has_q8;         /* q8/q8d valid (paths with MK_QUANT_Q, Q8_0 cache) */
    const int8_t *q8;   /* head g's Q8_0 values at g*MK_MAX_HEAD_DIM */
    const float *q8d;   /* head g's block scales at g*(MK_MAX_HEAD_DIM/32) */
};

/* How the work of one call is divided. Every thread computes the same plan.
 *
 * The query heads sharing a kv head form a group; a group of more than
 * MK_MAX_G heads is scored as several sub-groups. (kv head, sub-group) pairs
 * are numbered kv-head-major, and a unit of work is one query position and a
 * block of consecutive pairs (for Mistral 7B shapes: all of them). A unit walks
 * its keys tile by tile and, per tile, runs every pair of its block, so with a
 * slot-major cache it streams each slot's rows (all kv heads together) from
 * memory once, in address order. */
struct mk_plan {
    int G;          /* query heads per kv head */
    int nsub;       /* sub-groups per kv head */
    int gsub;       /* heads per sub-group (the last may have fewer) */
    int npairs;     /* n_head_kv * nsub */
    int bpairs;     /* pairs per block (the last block may have fewer) */
    int nblk;       /* blocks per query position */
    int64_t units;  /* n_q * nblk */
    int nsplit;     /* parts each unit's key range is split into (1 = no split) */
};

static inline void mk_make_plan(const struct mk_attn_params *p, int nth, int allow_split, struct mk_plan *pl)
{
    pl->G = p->n_head / p->n_head_kv;
    pl->nsub = (pl->G + MK_MAX_G - 1) / MK_MAX_G;
    pl->gsub = (pl->G + pl->nsub - 1) / pl->nsub;
    pl->npairs = p->n_head_kv * pl->nsub;
    int by_floats = MK_STATE_FLOATS / (pl->gsub * p->head_dim); /* >= 1: gsub*head_dim <= 16*256 */
    int by_heads = MK_BLOCK_HEADS / pl->gsub;                    /* >= 4 */
    pl->bpairs = by_floats < by_heads ? by_floats : by_heads;
    if (pl->bpairs > pl->npairs)
        pl->bpairs = pl->npairs;
    pl->nblk = (pl->npairs + pl->bpairs - 1) / pl->bpairs;
    pl->units = (int64_t)p->n_q * pl->nblk;
    pl->nsplit = 1;
    if (allow_split && pl->units < nth)
        pl->nsplit = (int)(nth / pl->units);
    if (pl->nsplit > MK_MAX_SPLIT)
        pl->nsplit = MK_MAX_SPLIT;
}

/* Floats per partial result of a unit: m[bpairs*gsub], l[bpairs*gsub],
 * acc[bpairs*gsub][head_dim]. */
static inline size_t mk_partial_floats(const struct mk_attn_params *p, const struct mk_plan *pl)
{
    return (size_t)pl->bpairs * pl->gsub * ((size_t)p->head_dim + 2);
}

static inline size_t mk_plan_scratch_bytes(const struct mk_attn_params *p, const struct mk_plan *pl)
{
    if (pl->nsplit <= 1)
        return 0;
    return (size_t)pl->units * MK_COUNTER_BYTES +
           (size_t)pl->units * (size_t)pl->nsplit * mk_partial_floats(p, pl) * sizeof(float);
}

/* Query quantized to Q8_0 blocks (for integer dot products against Q8_0 keys).
 * Same rounding as ggml's reference quantize_row_q8_0: d = amax/127,
 * q = roundf(x/d) (computed as x * (1/d)). */
static inline void mk_quantize_q8(const float *x, int n, int8_t *qs, float *d_out)
{
    for (int b = 0; b < n / 32; b++) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(x[b * 32 + i]);
            if (a > amax)
                amax = a;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; i++)
            qs[b * 32 + i] = (int8_t)roundf(x[b * 32 + i] * id);
        d_out[b] = d;
    }
}

/* Defines mk_kscore/mk_vacc (the driver's primitives) from a path's
 * always-inline mk_kscore_t/mk_vacc_t, specialized for each row type so the
 * type test is hoisted out of the inner loops. */
#define MK_TYPE_DISPATCH                                                                                         \
    static inline void mk_kscore(const struct mk_qctx *qc, int ng, const void *row, int type, float *s)         \
    {                                                                                                          \
        switch (type) {                                                                                        \
        case MK_KV_F32: mk_kscore_t(qc, ng, row, MK_KV_F32, s); break;                                         \
        case MK_KV_F16: mk_kscore_t(qc, ng, row, MK_KV_F16, s); break;                                         \
        default: mk_kscore_t(qc, ng, row, MK_KV_Q8_0, s); break;                                               \
        }                                                                                                      \
    }                                                                                                          \
    static inline void mk_vacc(float *acc, int ng, int D, const float *c, int n, const void *const *rows,     \
                               int type, const float *pr)                                                      \
    {                                                                                                          \
        switch (type) {                                                                                        \
        case MK_KV_F32: mk_vacc_t(acc, ng, D, c, n, rows, MK_KV_F32, pr); break;                               \
        case MK_KV_F16: mk_vacc_t(acc, ng, D, c, n, rows, MK_KV_F16, pr); break;                               \
        default: mk_vacc_t(acc, ng, D, c, n, rows, MK_KV_Q8_0, pr); break;                                     \
        }                                                                                                      \
    }

#endif /* MK_INTERNAL_H */
