/* attn_neon_common.h - NEON row primitives shared by attn_neon.c (ARMv8.0
 * NEON) and attn_neon_dotprod.c (ARMv8.2 dot product). aarch64 only. */
#include <arm_neon.h>

#include "mk_internal.h"

static inline float mk_h2f_native(const unsigned char *p)
{
    __fp16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* exp(x) for x <= 0, 4 lanes: x = n*ln2 + r, exp(r) by a polynomial (Cephes
 * expf coefficients), 2^n built in the exponent bits. Relative error ~2e-7;
 * x below -87 is clamped (negligible next to the tile's largest term, 1). */
static inline float32x4_t mk_exp4(float32x4_t x)
{
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    float32x4_t fx = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

#define MK_HAVE_EXP_SUM 1
static inline float mk_exp_sum(float *s, int n, float m)
{
    float32x4_t vm = vdupq_n_f32(m);
    float32x4_t acc = vdupq_n_f32(0.0f);
    int r = 0;
    for (; r + 4 <= n; r += 4) {
        float32x4_t e = mk_exp4(vsubq_f32(vld1q_f32(s + r), vm));
        vst1q_f32(s + r, e);
        acc = vaddq_f32(acc, e);
    }
    float sum = vaddvq_f32(acc);
    for (; r < n; r++) {
        s[r] = expf(s[r] - m);
        sum += s[r];
    }
    return sum;
}

/* 16 elements of a row starting at element d (d % 16 == 0), as 4 x f32x4. */
static inline __attribute__((always_inline)) void mk_load16(const void *row, int type, int d, float32x4_t v[4])
{
    const unsigned char *r = (const unsigned char *)row;
    if (type == MK_KV_F32) {
        const float *f = (const float *)row + d;
        v[0] = vld1q_f32(f);
        v[1] = vld1q_f32(f + 4);
        v[2] = vld1q_f32(f + 8);
        v[3] = vld1q_f32(f + 12);
    } else if (type == MK_KV_F16) {
        const __fp16 *h = (const __fp16 *)(r + 2 * (size_t)d);
        float16x8_t h0 = vld1q_f16(h);
        float16x8_t h1 = vld1q_f16(h + 8);
        v[0] = vcvt_f32_f16(vget_low_f16(h0));
        v[1] = vcvt_high_f32_f16(h0);
        v[2] = vcvt_f32_f16(vget_low_f16(h1));
        v[3] = vcvt_high_f32_f16(h1);
    } else {
        const unsigned char *blk = r + (size_t)(d / 32) * sizeof(struct mk_block_q8_0);
        float sc = mk_h2f_native(blk);
        int8x16_t q = vld1q_s8((const int8_t *)(blk + 2 + (d % 32)));
        int16x8_t lo = vmovl_s8(vget_low_s8(q));
        int16x8_t hi = vmovl_high_s8(q);
        v[0] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), sc);
        v[1] = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(lo)), sc);
        v[2] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), sc);
        v[3] = vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(hi)), sc);
    }
}

/* Scores up to 4 heads (NG) against one row in f32 (row chunk converted once). */
static inline __attribute__((always_inline)) void mk_kscore4_f(const float *q, int D, int NG, const void *row,
                                                               int type, float *s)
{
    float32x4_t acc[4][2];
    for (int g = 0; g < 4; g++)
        acc[g][0] = acc[g][1] = vdupq_n_f32(0.0f);
    for (int d = 0; d < D; d += 16) {
        float32x4_t k[4];
        mk_load16(row, type, d, k);
        for (int g = 0; g < NG; g++) {
            const float *qg = q + (size_t)g * D + d;
            acc[g][0] = vfmaq_f32(acc[g][0], vld1q_f32(qg), k[0]);
            acc[g][1] = vfmaq_f32(acc[g][1], vld1q_f32(qg + 4), k[1]);
            acc[g][0] = vfmaq_f32(acc[g][0], vld1q_f32(qg + 8), k[2]);
            acc[g][1] = vfmaq_f32(acc[g][1], vld1q_f32(qg + 12), k[3]);
        }
    }
    for (int g = 0; g < NG; g++)
        s[g] = vaddvq_f32(vaddq_f32(acc[g][0], acc[g][1]));
}

static inline __attribute__((always_inline)) void mk_kscore_f_t(const struct mk_qctx *qc, int ng, const void *row,
                                                                int type, float *s)
{
    const int D = qc->D;
    for (int g0 = 0; g0 < ng; g0 += 4) {
        const float *q = qc->q + (size_t)g0 * D;
        switch (ng - g0) {
        case 1: mk_kscore4_f(q, D, 1, row, type, s + g0); break;
        case 2: mk_kscore4_f(q, D, 2, row, type, s + g0); break;
        case 3: mk_kscore4_f(q, D, 3, row, type, s + g0); break;
        default: mk_kscore4_f(q, D, 4, row, type, s + g0); break;
        }
    }
}

/* acc[g][d..d+16) for NG heads kept in registers over the tile's rows. */
static inline __attribute__((always_inline)) void mk_vacc4(float *acc, int D, int NG, const float *c, int n,
                                                           const void *const *rows, int type, const float *pr)
{
    for (int d = 0; d < D; d += 16) {
        float32x4_t a[4][4];
        for (int g = 0; g < NG; g++)
            for (int j = 0; j < 4; j++)
                a[g][j] = vmulq_n_f32(vld1q_f32(acc + (size_t)g * D + d + 4 * j), c[g]);
        for (int r = 0; r < n; r++) {
            float32x4_t v[4];
            mk_load16(rows[r], type, d, v);
            for (int g = 0; g < NG; g++) {
                float w = pr[g * MK_TILE + r];
                for (int j = 0; j < 4; j++)
                    a[g][j] = vfmaq_n_f32(a[g][j], v[j], w);
            }
        }
        for (int g = 0; g < NG; g++)
            for (int j = 0; j < 4; j++)
                vst1q_f32(acc + (size_t)g * D + d + 4 * j, a[g][j]);
    }
}

static inline __attribute__((always_inline)) void mk_vacc_t(float *acc, int ng, int D, const float *c, int n,
                                                            const void *const *rows, int type, const float *pr)
{
    for (int g0 = 0; g0 < ng; g0 += 4) {
        float *a = acc + (size_t)g0 * D;
        const float *p = pr + g0 * MK_TILE;
        switch (ng - g0) {
        case 1: mk_vacc4(a, D, 1, c + g0, n, rows, type, p); break;
        case 2: mk_vacc4(a, D, 2, c + g0, n, rows, type, p); break;
        case 3: mk_vacc4(a, D, 3, c + g0, n, rows, type, p); break;
        default: mk_vacc4(a, D, 4, c + g0, n, rows, type, p); break;
        }
    }
}
