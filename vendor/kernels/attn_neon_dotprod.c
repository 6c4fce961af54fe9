/* attn_neon_dotprod.c - aarch64 NEON path with the ARMv8.2 dot-product
 * extension (compiled with -march=armv8.2-a+dotprod; only called when
 * getauxval(AT_HWCAP) has HWCAP_ASIMDDP). Q8_0 keys are scored with SDOT
 * against the query quantized to Q8_0 blocks once per work unit (d = amax/127
 * kept in f32); everything else is the f32 NEON code of attn_neon_common.h. */
#include "attn_neon_common.h"

/* Scores up to 4 heads (NG) against one Q8_0 row with integer dot products. */
static inline __attribute__((always_inline)) void mk_kscore4_q8dot(const struct mk_qctx *qc, int g0, int NG,
                                                                   const void *row, float *s)
{
    const unsigned char *r = (const unsigned char *)row;
    float32x4_t acc[4];
    for (int g = 0; g < 4; g++)
        acc[g] = vdupq_n_f32(0.0f);
    for (int b = 0; b < qc->D / 32; b++) {
        const unsigned char *blk = r + (size_t)b * sizeof(struct mk_block_q8_0);
        float dk = mk_h2f_native(blk);
        int8x16_t k0 = vld1q_s8((const int8_t *)(blk + 2));
        int8x16_t k1 = vld1q_s8((const int8_t *)(blk + 18));
        for (int g = 0; g < NG; g++) {
            const int8_t *qs = qc->q8 + (g0 + g) * MK_MAX_HEAD_DIM + b * 32;
            int32x4_t isum = vdotq_s32(vdotq_s32(vdupq_n_s32(0), k0, vld1q_s8(qs)), k1, vld1q_s8(qs + 16));
            acc[g] = vfmaq_n_f32(acc[g], vcvtq_f32_s32(isum), dk * qc->q8d[(g0 + g) * (MK_MAX_HEAD_DIM / 32) + b]);
        }
    }
    for (int g = 0; g < NG; g++)
        s[g] = vaddvq_f32(acc[g]);
}

static inline __attribute__((always_inline)) void mk_kscore_t(const struct mk_qctx *qc, int ng, const void *row,
                                                              int type, float *s)
{
    if (type != MK_KV_Q8_0 || !qc->has_q8) {
        mk_kscore_f_t(qc, ng, row, type, s);
        return;
    }
    for (int g0 = 0; g0 < ng; g0 += 4) {
        switch (ng - g0) {
        case 1: mk_kscore4_q8dot(qc, g0, 1, row, s + g0); break;
        case 2: mk_kscore4_q8dot(qc, g0, 2, row, s + g0); break;
        case 3: mk_kscore4_q8dot(qc, g0, 3, row, s + g0); break;
        default: mk_kscore4_q8dot(qc, g0, 4, row, s + g0); break;
        }
    }
}

MK_TYPE_DISPATCH

#define MK_ENTRY mk_attention_neon_dotprod
#define MK_QUANT_Q 1
#include "attn_driver.h"
