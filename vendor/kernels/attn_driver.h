/*
 * attn_driver.h - the attention algorithm shared by every path, written once
 * and included by each path's source file (compiled with that path's flags),
 * so the path's row primitives are inlined into it.
 *
 * Before including it, the path file defines:
 *   MK_ENTRY        name of the exported entry point
 *   MK_QUANT_Q      1 if mk_kscore uses the Q8_0-quantized query for Q8_0 rows
 *   static inline void mk_kscore(const struct mk_qctx *qc, int ng, const void *row, int type, float *s);
 *       s[g] = q_g . row (unscaled) for the ng query heads of qc; row has head_dim
 *       elements of `type` (MK_KV_F32 / MK_KV_F16 / MK_KV_Q8_0).
 *   static inline void mk_vacc(float *acc, int ng, int D, const float *c, int n,
 *                              const void *const *rows, int type, const float *pr);
 *       acc[g][:] = c[g] * acc[g][:] + sum_r pr[g*MK_TILE + r] * rows[r][:]   (acc stride D)
 * and optionally (defining MK_KSCORE_BLOCK_ROWS to R), a block scorer
 *   static inline void mk_kscore_block(const float *q, int D, const void *const *rows, int type,
 *                                      float scale, float *s);
 *       s[g*MK_TILE + r] = scale * (q_g . rows[r]) for 4 heads g and R rows r
 *   (R rows at once keep 4*R independent FMA chains in flight; without it
 *   rows are scored one at a time), and optionally (defining MK_HAVE_EXP_SUM), a vectorized
 *   static inline float mk_exp_sum(float *s, int n, float m);
 *       s[r] = exp(s[r] - m) for r < n (all s[r] <= m); returns the sum.
 *
 * Algorithm for one work unit (query position t, a block of kv heads with
 * their query heads, part of the key range; see struct mk_plan): keys are
 * walked in tiles of MK_TILE positions; for each tile, every kv head of the
 * block has its MK_TILE rows scored against all its query heads (each row read
 * once, whatever the group size), then per query head the running max m,
 * running sum l and accumulator acc are updated (online softmax: acc and l
 * are rescaled by exp(m_old - m_new) only when the max grows, so no exp() ever
 * overflows). Walking tile-major over all heads reads a slot-major cache in
 * address order, so the hardware prefetchers stream it from memory; the next
 * tile's rows are also prefetched while the current one is computed. Cached
 * rows come straight from the ring (slot = position % n_slots), the query
 * positions' own keys from k_new/v_new.
 */
#include <stdatomic.h>

#include "mk_internal.h"

/* The query context of heads [g0, ...) of qc. */
static inline struct mk_qctx mk_sub_qctx(const struct mk_qctx *qc, int g0)
{
    struct mk_qctx sub = *qc;
    sub.q += (size_t)g0 * qc->D;
    if (qc->has_q8) {
        sub.q8 += (size_t)g0 * MK_MAX_HEAD_DIM;
        sub.q8d += (size_t)g0 * (MK_MAX_HEAD_DIM / 32);
    }
    return sub;
}

/* s[g*MK_TILE + r] = scale * (q_g . rows[r]) for g < ng, r < n. */
static inline __attribute__((always_inline)) void mk_kscore_tile_t(const struct mk_qctx *qc, int ng,
                                                                   const void *const *rows, int n, int type,
                                                                   float scale, float *s)
{
    float t[MK_MAX_G];
    int g0 = 0;
#ifdef MK_KSCORE_BLOCK_ROWS
    /* (a path scoring Q8_0 rows against the quantized query keeps its integer dot products) */
    for (; g0 + 4 <= ng && !(MK_QUANT_Q && qc->has_q8 && type == MK_KV_Q8_0); g0 += 4) {
        int r = 0;
        for (; r + MK_KSCORE_BLOCK_ROWS <= n; r += MK_KSCORE_BLOCK_ROWS)
            mk_kscore_block(qc->q + (size_t)g0 * qc->D, qc->D, rows + r, type, scale, s + g0 * MK_TILE + r);
        if (r < n) {
            struct mk_qctx sub = mk_sub_qctx(qc, g0);
            for (; r < n; r++) {
                mk_kscore(&sub, 4, rows[r], type, t);
                for (int g = 0; g < 4; g++)
                    s[(g0 + g) * MK_TILE + r] = t[g] * scale;
            }
        }
    }
#endif
    if (g0 < ng) {
        struct mk_qctx sub = mk_sub_qctx(qc, g0);
        for (int r = 0; r < n; r++) {
            mk_kscore(&sub, ng - g0, rows[r], type, t);
            for (int g = 0; g < ng - g0; g++)
                s[(g0 + g) * MK_TILE + r] = t[g] * scale;
        }
    }
}

static inline void mk_kscore_tile(const struct mk_qctx *qc, int ng, const void *const *rows, int n, int type,
                                  float scale, float *s)
{
    switch (type) {
    case MK_KV_F32: mk_kscore_tile_t(qc, ng, rows, n, MK_KV_F32, scale, s); break;
    case MK_KV_F16: mk_kscore_tile_t(qc, ng, rows, n, MK_KV_F16, scale, s); break;
    default: mk_kscore_tile_t(qc, ng, rows, n, MK_KV_Q8_0, scale, s); break;
    }
}

#ifndef MK_HAVE_EXP_SUM
static inline float mk_exp_sum(float *s, int n, float m)
{
    float sum = 0.0f;
    for (int r = 0; r < n; r++) {
        s[r] = expf(s[r] - m);
        sum += s[r];
    }
    return sum;
}
#endif

/* Online-softmax state of one sub-group (ng heads): m[g], l[g], acc[g][D]. */
struct mk_state {
    float *m;
    float *l;
    float *acc;
};

static void mk_tile(const struct mk_attn_params *p, const struct mk_qctx *qc, int ng, struct mk_state st,
                    const void *const *krows, const void *const *vrows, int n, int type)
{
    float s[MK_MAX_G * MK_TILE];
    float c[MK_MAX_G];
    mk_kscore_tile(qc, ng, krows, n, type, p->scale, s);
    for (int g = 0; g < ng; g++) {
        float *sg = s + g * MK_TILE;
        float mx = sg[0];
        for (int r = 1; r < n; r++)
            mx = sg[r] > mx ? sg[r] : mx;
        float mnew = mx > st.m[g] ? mx : st.m[g];
        /* st.m[g] == -inf on the first tile: expf(-inf) == 0, acc and l are 0 anyway. */
        c[g] = expf(st.m[g] - mnew);
        float sum = mk_exp_sum(sg, n, mnew);
        st.l[g] = st.l[g] * c[g] + sum;
        st.m[g] = mnew;
    }
    mk_vacc(st.acc, ng, p->head_dim, c, n, vrows, type, s);
}

/* The pairs of block `blk`: [*first, *first + *count). */
static inline void mk_block_pairs(const struct mk_plan *pl, int blk, int *first, int *count)
{
    *first = blk * pl->bpairs;
    *count = *first + pl->bpairs <= pl->npairs ? pl->bpairs : pl->npairs - *first;
}

/* kv head, first query head of the group, and head count of pair `pair`. */
static inline void mk_pair(const struct mk_plan *pl, int pair, int *h, int *g0, int *ng)
{
    *h = pair / pl->nsub;
    *g0 = (pair % pl->nsub) * pl->gsub;
    *ng = (*g0 + pl->gsub <= pl->G) ? pl->gsub : pl->G - *g0;
}

static inline size_t mk_row_bytes(int type, int D)
{
    return type == MK_KV_F32   ? (size_t)D * 4
           : type == MK_KV_F16 ? (size_t)D * 2
                               : (size_t)D / 32 * sizeof(struct mk_block_q8_0);
}

/* Runs one unit (or part `part` of its key range) and writes either the final
 * output or the partial state (m, l, acc of every pair) to `partial`. */
static void mk_run_unit(const struct mk_attn_params *p, const struct mk_plan *pl, int64_t unit, int part,
                        float *partial)
{
    const int D = p->head_dim;
    const int t = (int)(unit / pl->nblk);
    int first, npair;
    mk_block_pairs(pl, (int)(unit % pl->nblk), &first, &npair);

    const int64_t i = p->pos0 + t;
    int64_t lo = p->pos0 - p->n_hist;
    if (p->window > 0 && i - p->window + 1 > lo)
        lo = i - p->window + 1;
    const int64_t n_old = lo < p->pos0 ? p->pos0 - lo : 0;    /* keys from the ring */
    const int64_t new_lo = lo > p->pos0 ? lo : p->pos0;
    const int64_t n_total = n_old + (i - new_lo + 1);         /* >= 1: key i itself */
    const int64_t a = n_total * part / pl->nsplit;
    const int64_t b = n_total * (part + 1) / pl->nsplit;

    /* Per pair: query context and state (pair k's heads at k*gsub). */
    struct mk_qctx qc[MK_BLOCK_HEADS];
    float m[MK_BLOCK_HEADS], l[MK_BLOCK_HEADS];
    float acc[MK_STATE_FLOATS];
#if MK_QUANT_Q
    int8_t q8[MK_BLOCK_HEADS * MK_MAX_HEAD_DIM];
    float q8d[MK_BLOCK_HEADS * (MK_MAX_HEAD_DIM / 32)];
#endif
    for (int k = 0; k < npair; k++) {
        int h, g0, ng;
        mk_pair(pl, first + k, &h, &g0, &ng);
        qc[k].D = D;
        qc[k].q = p->q + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
        qc[k].has_q8 = 0;
#if MK_QUANT_Q
        qc[k].has_q8 = p->kv_type == MK_KV_Q8_0;
        qc[k].q8 = q8 + (size_t)k * pl->gsub * MK_MAX_HEAD_DIM;
        qc[k].q8d = q8d + (size_t)k * pl->gsub * (MK_MAX_HEAD_DIM / 32);
        if (qc[k].has_q8)
            for (int g = 0; g < ng; g++)
                mk_quantize_q8(qc[k].q + (size_t)g * D, D, q8 + ((size_t)k * pl->gsub + g) * MK_MAX_HEAD_DIM,
                               q8d + ((size_t)k * pl->gsub + g) * (MK_MAX_HEAD_DIM / 32));
#endif
        for (int g = 0; g < ng; g++) {
            m[k * pl->gsub + g] = -INFINITY;
            l[k * pl->gsub + g] = 0.0f;
        }
    }
    memset(acc, 0, sizeof(float) * (size_t)npair * pl->gsub * D);

    /* Row pointers of the tile: slot (or new-key) bases; per kv head add h * head_bytes. */
    const char *kb[MK_TILE];
    const char *vb[MK_TILE];
    const void *kr[MK_TILE];
    const void *vr[MK_TILE];
    const size_t row_bytes = mk_row_bytes(p->kv_type, D);
    const int h_first = first / pl->nsub;
    const int nh = (first + npair - 1) / pl->nsub - h_first + 1; /* kv heads of the block */

    int64_t idx = a;
    while (idx < b) {
        const int ring = idx < n_old; /* tiles never straddle the ring/new boundary */
        int64_t end = ring ? (b < n_old ? b : n_old) : b;
        int n = end - idx > MK_TILE ? MK_TILE : (int)(end - idx);
        size_t hstride;
        int type;
        if (ring) {
            /* Keys from the ring: indices [a, min(b, n_old)), positions lo + index. */
            int64_t slot = (lo + idx) % p->n_slots;
            for (int r = 0; r < n; r++) {
                kb[r] = (const char *)p->k_cache + (size_t)slot * p->slot_bytes;
                vb[r] = (const char *)p->v_cache + (size_t)slot * p->slot_bytes;
                if (++slot == p->n_slots)
                    slot = 0;
            }
            hstride = p->head_bytes;
            type = p->kv_type;
        } else {
            /* The query positions' own keys: indices [n_old, n_total), positions new_lo + (index - n_old). */
            for (int r = 0; r < n; r++) {
                int64_t tk = new_lo + (idx + r - n_old) - p->pos0;
                kb[r] = (const char *)(p->k_new + (size_t)tk * p->n_head_kv * D);
                vb[r] = (const char *)(p->v_new + (size_t)tk * p->n_head_kv * D);
            }
            hstride = (size_t)D * sizeof(float);
            type = MK_KV_F32;
        }
        /* Ring rows MK_PF_TILES tiles ahead, prefetched in address order (slot, then kv
         * head) and spread evenly over this tile's pairs, so the loads from memory
         * overlap the computation without bursts of prefetches. */
        int64_t pf_lo = 0, pf_items = 0;
        if (ring) {
            int64_t ring_end = b < n_old ? b : n_old;
            pf_lo = idx + n + (int64_t)(MK_PF_TILES - 1) * MK_TILE;
            int64_t pf_n = ring_end - pf_lo;
            if (pf_n > MK_TILE)
                pf_n = MK_TILE;
            if (pf_n > 0)
                pf_items = pf_n * nh;
        }
        int prev_h = -1;
        for (int k = 0; k < npair; k++) {
            int h, g0, ng;
            mk_pair(pl, first + k, &h, &g0, &ng);
            if (h != prev_h) {
                for (int r = 0; r < n; r++) {
                    kr[r] = kb[r] + (size_t)h * hstride;
                    vr[r] = vb[r] + (size_t)h * hstride;
                }
                prev_h = h;
            }
            /* This pair's share of the items, walked as (slot, kv head) without a division per item. */
            const int64_t it0 = pf_items * k / npair, it1 = pf_items * (k + 1) / npair;
            int64_t pf_slot = (lo + pf_lo + it0 / nh) % p->n_slots;
            int pf_h = (int)(it0 % nh);
            for (int64_t it = it0; it < it1; it++) {
                size_t off0 = (size_t)pf_slot * p->slot_bytes + (size_t)(h_first + pf_h) * p->head_bytes;
                const char *kp = (const char *)p->k_cache + off0;
                const char *vp = (const char *)p->v_cache + off0;
                if (++pf_h == nh) {
                    pf_h = 0;
                    if (++pf_slot == p->n_slots)
                        pf_slot = 0;
                }
                for (size_t off = 0; off < row_bytes; off += 64) {
                    /* into L2 (prefetcht2): into L1 it evicts the rows in use and
                     * ran about 1.6x slower (vendor/kernels/README.md) */
                    __builtin_prefetch(kp + off, 0, 1);
                    __builtin_prefetch(vp + off, 0, 1);
                }
            }
            struct mk_state st = {m + k * pl->gsub, l + k * pl->gsub, acc + (size_t)k * pl->gsub * D};
            mk_tile(p, &qc[k], ng, st, kr, vr, n, type);
        }
        idx += n;
    }

    for (int k = 0; k < npair; k++) {
        int h, g0, ng;
        mk_pair(pl, first + k, &h, &g0, &ng);
        const float *ak = acc + (size_t)k * pl->gsub * D;
        if (partial) {
            const size_t hb = (size_t)pl->bpairs * pl->gsub;
            for (int g = 0; g < ng; g++) {
                partial[k * pl->gsub + g] = m[k * pl->gsub + g];
                partial[hb + k * pl->gsub + g] = l[k * pl->gsub + g];
            }
            memcpy(partial + 2 * hb + (size_t)k * pl->gsub * D, ak, sizeof(float) * (size_t)ng * D);
        } else {
            float *o = p->out + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
            for (int g = 0; g < ng; g++) {
                float il = 1.0f / l[k * pl->gsub + g];
                for (int d = 0; d < D; d++)
                    o[(size_t)g * D + d] = ak[(size_t)g * D + d] * il;
            }
        }
    }
}

/* Combines the nsplit partial states of a unit into the final output. */
static void mk_merge_unit(const struct mk_attn_params *p, const struct mk_plan *pl, int64_t unit, const float *parts)
{
    const int D = p->head_dim;
    const size_t pf = mk_partial_floats(p, pl);
    const size_t hb = (size_t)pl->bpairs * pl->gsub;
    const int t = (int)(unit / pl->nblk);
    int first, npair;
    mk_block_pairs(pl, (int)(unit % pl->nblk), &first, &npair);
    for (int k = 0; k < npair; k++) {
        int h, g0, ng;
        mk_pair(pl, first + k, &h, &g0, &ng);
        float *o = p->out + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
        for (int g = 0; g < ng; g++) {
            const size_t j = (size_t)k * pl->gsub + g;
            float M = -INFINITY;
            for (int s = 0; s < pl->nsplit; s++) {
                float mm = parts[s * pf + j];
                M = mm > M ? mm : M;
            }
            float L = 0.0f;
            float w[MK_MAX_SPLIT];
            for (int s = 0; s < pl->nsplit; s++) {
                const float *ps = parts + s * pf;
                /* an empty part has m == -inf and l == 0: weight 0 */
                w[s] = ps[j] == -INFINITY ? 0.0f : expf(ps[j] - M);
                L += ps[hb + j] * w[s];
            }
            float il = 1.0f / L;
            for (int d = 0; d < D; d++) {
                float sum = 0.0f;
                for (int s = 0; s < pl->nsplit; s++)
                    sum += w[s] * parts[s * pf + 2 * hb + j * D + d];
                o[(size_t)g * D + d] = sum * il;
            }
        }
    }
}

void MK_ENTRY(const struct mk_attn_params *p, int ith, int nth)
{
    struct mk_plan pl;
    mk_make_plan(p, nth, 1, &pl);
    if (pl.nsplit > 1 && (p->scratch == NULL || p->scratch_bytes < mk_plan_scratch_bytes(p, &pl)))
        mk_make_plan(p, nth, 0, &pl);

    if (pl.nsplit == 1) {
        /* Round robin: in a prefill chunk later positions have more keys, so interleave. */
        for (int64_t u = ith; u < pl.units; u += nth)
            mk_run_unit(p, &pl, u, 0, NULL);
        return;
    }

    /* Fewer units than threads: thread k works on part k % nsplit of unit k / nsplit.
     * The last thread to finish a unit (counted with an atomic) merges its parts
     * and resets the counter, so the scratch is zeroed again for the next call. */
    const int64_t tasks = pl.units * pl.nsplit;
    if (ith >= tasks)
        return;
    const int64_t unit = ith / pl.nsplit;
    const int part = ith % pl.nsplit;
    const size_t pf = mk_partial_floats(p, &pl);
    char *base = (char *)p->scratch;
    atomic_int *counter = (atomic_int *)(base + (size_t)unit * MK_COUNTER_BYTES);
    float *parts = (float *)(base + (size_t)pl.units * MK_COUNTER_BYTES) + (size_t)unit * pl.nsplit * pf;
    mk_run_unit(p, &pl, unit, part, parts + (size_t)part * pf);
    if (atomic_fetch_add_explicit(counter, 1, memory_order_acq_rel) == pl.nsplit - 1) {
        mk_merge_unit(p, &pl, unit, parts);
        atomic_store_explicit(counter, 0, memory_order_relaxed);
    }
}
