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
 * and optionally (defining MK_HAVE_EXP_SUM), a vectorized
 *   static inline float mk_exp_sum(float *s, int n, float m);
 *       s[r] = exp(s[r] - m) for r < n (all s[r] <= m); returns the sum.
 *
 * Algorithm for one work unit (query position t, kv head h, sub-group of the
 * query heads sharing h, part of the key range): keys are walked in tiles of
 * MK_TILE rows; each row is read once and scored against all heads of the
 * sub-group; per head the running max m, running sum l and accumulator acc
 * are updated (online softmax: acc and l are rescaled by exp(m_old - m_new)
 * only when the max grows, so no exp() ever overflows). Cached rows come
 * straight from the ring (slot = position % n_slots), the query positions'
 * own keys from k_new/v_new.
 */
#include <stdatomic.h>

#include "mk_internal.h"

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

struct mk_state {
    float m[MK_MAX_G];
    float l[MK_MAX_G];
    float acc[MK_MAX_G * MK_MAX_HEAD_DIM];
};

static void mk_tile(const struct mk_attn_params *p, const struct mk_qctx *qc, int ng, struct mk_state *st,
                    const void *const *krows, const void *const *vrows, int n, int type)
{
    float s[MK_MAX_G * MK_TILE];
    float c[MK_MAX_G];
    float tmp[MK_MAX_G];
    for (int r = 0; r < n; r++) {
        mk_kscore(qc, ng, krows[r], type, tmp);
        for (int g = 0; g < ng; g++)
            s[g * MK_TILE + r] = tmp[g] * p->scale;
    }
    for (int g = 0; g < ng; g++) {
        float *sg = s + g * MK_TILE;
        float mx = sg[0];
        for (int r = 1; r < n; r++)
            mx = sg[r] > mx ? sg[r] : mx;
        float mnew = mx > st->m[g] ? mx : st->m[g];
        /* st->m[g] == -inf on the first tile: expf(-inf) == 0, acc and l are 0 anyway. */
        c[g] = expf(st->m[g] - mnew);
        float sum = mk_exp_sum(sg, n, mnew);
        st->l[g] = st->l[g] * c[g] + sum;
        st->m[g] = mnew;
    }
    mk_vacc(st->acc, ng, p->head_dim, c, n, vrows, type, s);
}

/* Runs one unit (or part `part` of its key range) and writes either the final
 * output or the partial state (m, l, acc) to `partial`. */
static void mk_run_unit(const struct mk_attn_params *p, const struct mk_plan *pl, int64_t unit, int part,
                        float *partial)
{
    const int D = p->head_dim;
    const int64_t per_t = (int64_t)p->n_head_kv * pl->nsub;
    const int t = (int)(unit / per_t);
    const int h = (int)((unit % per_t) / pl->nsub);
    const int sub = (int)(unit % pl->nsub);
    const int g0 = sub * pl->gsub;
    const int ng = (g0 + pl->gsub <= pl->G) ? pl->gsub : pl->G - g0;

    const int64_t i = p->pos0 + t;
    int64_t lo = p->pos0 - p->n_hist;
    if (p->window > 0 && i - p->window + 1 > lo)
        lo = i - p->window + 1;
    const int64_t n_old = lo < p->pos0 ? p->pos0 - lo : 0;    /* keys from the ring */
    const int64_t new_lo = lo > p->pos0 ? lo : p->pos0;
    const int64_t n_total = n_old + (i - new_lo + 1);         /* >= 1: key i itself */
    const int64_t a = n_total * part / pl->nsplit;
    const int64_t b = n_total * (part + 1) / pl->nsplit;

    struct mk_qctx qc;
    qc.D = D;
    qc.q = p->q + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
#if MK_QUANT_Q
    qc.has_q8 = p->kv_type == MK_KV_Q8_0;
    if (qc.has_q8)
        for (int g = 0; g < ng; g++)
            mk_quantize_q8(qc.q + (size_t)g * D, D, qc.q8 + g * MK_MAX_HEAD_DIM, qc.q8d + g * (MK_MAX_HEAD_DIM / 32));
#endif

    struct mk_state st;
    for (int g = 0; g < ng; g++) {
        st.m[g] = -INFINITY;
        st.l[g] = 0.0f;
    }
    memset(st.acc, 0, sizeof(float) * (size_t)ng * D);

    const void *kr[MK_TILE];
    const void *vr[MK_TILE];
    const size_t row_bytes = p->kv_type == MK_KV_F32   ? (size_t)D * 4
                             : p->kv_type == MK_KV_F16 ? (size_t)D * 2
                                                       : (size_t)D / 32 * sizeof(struct mk_block_q8_0);
    const char *kc = (const char *)p->k_cache + (size_t)h * p->head_bytes;
    const char *vc = (const char *)p->v_cache + (size_t)h * p->head_bytes;

    /* Keys from the ring: indices [a, min(b, n_old)), positions lo + index. */
    int64_t idx = a;
    while (idx < b && idx < n_old) {
        int64_t end = b < n_old ? b : n_old;
        int n = end - idx > MK_TILE ? MK_TILE : (int)(end - idx);
        int64_t slot = (lo + idx) % p->n_slots;
        for (int r = 0; r < n; r++) {
            kr[r] = kc + (size_t)slot * p->slot_bytes;
            vr[r] = vc + (size_t)slot * p->slot_bytes;
            if (++slot == p->n_slots)
                slot = 0;
        }
        /* Prefetch the next tile's rows: with a slot-major ring, one head's
         * consecutive rows are slot_bytes apart, too far apart for the
         * hardware prefetchers to follow well. */
        int64_t n_next = (b < n_old ? b : n_old) - (idx + n);
        if (n_next > MK_TILE)
            n_next = MK_TILE;
        for (int64_t r = 0, s2 = slot; r < n_next; r++) {
            const char *kp = kc + (size_t)s2 * p->slot_bytes;
            const char *vp = vc + (size_t)s2 * p->slot_bytes;
            for (size_t off = 0; off < row_bytes; off += 64) {
                __builtin_prefetch(kp + off, 0, 3);
                __builtin_prefetch(vp + off, 0, 3);
            }
            if (++s2 == p->n_slots)
                s2 = 0;
        }
        mk_tile(p, &qc, ng, &st, kr, vr, n, p->kv_type);
        idx += n;
    }
    /* The query positions' own keys: indices [n_old, n_total), positions new_lo + (index - n_old). */
    while (idx < b) {
        int n = b - idx > MK_TILE ? MK_TILE : (int)(b - idx);
        for (int r = 0; r < n; r++) {
            int64_t tk = new_lo + (idx + r - n_old) - p->pos0;
            size_t off = ((size_t)tk * p->n_head_kv + h) * D;
            kr[r] = p->k_new + off;
            vr[r] = p->v_new + off;
        }
        mk_tile(p, &qc, ng, &st, kr, vr, n, MK_KV_F32);
        idx += n;
    }

    if (partial) {
        for (int g = 0; g < ng; g++) {
            partial[g] = st.m[g];
            partial[pl->gsub + g] = st.l[g];
        }
        memcpy(partial + 2 * pl->gsub, st.acc, sizeof(float) * (size_t)ng * D);
    } else {
        float *o = p->out + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
        for (int g = 0; g < ng; g++) {
            float il = 1.0f / st.l[g];
            for (int d = 0; d < D; d++)
                o[(size_t)g * D + d] = st.acc[(size_t)g * D + d] * il;
        }
    }
}

/* Combines the nsplit partial states of a unit into the final output. */
static void mk_merge_unit(const struct mk_attn_params *p, const struct mk_plan *pl, int64_t unit, const float *parts)
{
    const int D = p->head_dim;
    const size_t pf = mk_partial_floats(p, pl);
    const int64_t per_t = (int64_t)p->n_head_kv * pl->nsub;
    const int t = (int)(unit / per_t);
    const int h = (int)((unit % per_t) / pl->nsub);
    const int g0 = (int)(unit % pl->nsub) * pl->gsub;
    const int ng = (g0 + pl->gsub <= pl->G) ? pl->gsub : pl->G - g0;
    float *o = p->out + ((size_t)t * p->n_head + (size_t)h * pl->G + g0) * D;
    for (int g = 0; g < ng; g++) {
        float M = -INFINITY;
        for (int k = 0; k < pl->nsplit; k++) {
            float m = parts[k * pf + g];
            M = m > M ? m : M;
        }
        float L = 0.0f;
        float w[MK_MAX_SPLIT];
        for (int k = 0; k < pl->nsplit; k++) {
            const float *pk = parts + k * pf;
            /* an empty part has m == -inf and l == 0: weight 0 */
            w[k] = pk[g] == -INFINITY ? 0.0f : expf(pk[g] - M);
            L += pk[pl->gsub + g] * w[k];
        }
        float il = 1.0f / L;
        for (int d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int k = 0; k < pl->nsplit; k++)
                acc += w[k] * parts[k * pf + 2 * pl->gsub + (size_t)g * D + d];
            o[(size_t)g * D + d] = acc * il;
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
