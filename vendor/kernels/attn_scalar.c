/* attn_scalar.c - portable C path: the reference the SIMD paths are tested
 * against. Each row is dequantized once into a float buffer, then used for
 * every head of the group. Built without any target flags. */
#include "mk_internal.h"

static inline void mk_row_to_f32(const void *row, int type, int D, float *out)
{
    if (type == MK_KV_F32) {
        memcpy(out, row, sizeof(float) * (size_t)D);
    } else if (type == MK_KV_F16) {
        const unsigned char *r = (const unsigned char *)row;
        for (int i = 0; i < D; i++)
            out[i] = mk_h2f(mk_load_u16(r + 2 * i));
    } else {
        const unsigned char *r = (const unsigned char *)row;
        for (int b = 0; b < D / 32; b++) {
            const unsigned char *blk = r + (size_t)b * sizeof(struct mk_block_q8_0);
            float d = mk_h2f(mk_load_u16(blk));
            const int8_t *qs = (const int8_t *)(blk + 2);
            for (int i = 0; i < 32; i++)
                out[b * 32 + i] = d * (float)qs[i];
        }
    }
}

static inline void mk_kscore(const struct mk_qctx *qc, int ng, const void *row, int type, float *s)
{
    float k[MK_MAX_HEAD_DIM];
    const int D = qc->D;
    mk_row_to_f32(row, type, D, k);
    for (int g = 0; g < ng; g++) {
        const float *q = qc->q + (size_t)g * D;
        float sum = 0.0f;
        for (int d = 0; d < D; d++)
            sum += q[d] * k[d];
        s[g] = sum;
    }
}

static inline void mk_vacc(float *acc, int ng, int D, const float *c, int n, const void *const *rows, int type,
                           const float *pr)
{
    float v[MK_MAX_HEAD_DIM];
    for (int g = 0; g < ng; g++)
        if (c[g] != 1.0f)
            for (int d = 0; d < D; d++)
                acc[(size_t)g * D + d] *= c[g];
    for (int r = 0; r < n; r++) {
        mk_row_to_f32(rows[r], type, D, v);
        for (int g = 0; g < ng; g++) {
            float w = pr[g * MK_TILE + r];
            float *a = acc + (size_t)g * D;
            for (int d = 0; d < D; d++)
                a[d] += w * v[d];
        }
    }
}

#define MK_ENTRY mk_attention_scalar
#define MK_QUANT_Q 0
#include "attn_driver.h"
