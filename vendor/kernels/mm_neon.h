/* mm_neon.h - the vector operations of mm_simd.h for aarch64 NEON (4 rows per
 * 128-bit vector, four vectors per tile), and the vectorized activation
 * quantizer. The including file defines MM_DOTPROD: 1 to multiply with SDOT
 * (ARMv8.2 dot product, compiled with -march=armv8.2-a+dotprod), 0 for plain
 * ARMv8.0 NEON (smull + pairwise adds). */
#include <arm_neon.h>

#include "mm_internal.h"

typedef int8x16_t mm_vb;
typedef int32x4_t mm_vi;
typedef float32x4_t mm_vf;
#define MM_LANES 4
#ifndef MM_GROUP
#define MM_GROUP 4
#endif

#define MM_LOAD(p) vld1q_s8((const int8_t *)(const void *)(p))
#define MM_LO4(v) vandq_s8(v, vdupq_n_s8(0x0f))
#define MM_HI4(v) vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(v), 4))
#define MM_OR(a, b) vorrq_s8(a, b)
#define MM_IZERO vdupq_n_s32(0)
#define MM_ISUB(v, x) vsubq_s32(v, vdupq_n_s32(x))

static inline int32_t mm_ld32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}
#define MM_BCAST4(p) vreinterpretq_s8_s32(vdupq_n_s32(mm_ld32(p)))

/* Bits 2c..2c+1 of each byte at bits 4..5. */
MM_INLINE mm_vb mm_h6(mm_vb h, int c)
{
    const uint8x16_t u = vreinterpretq_u8_s8(h), m = vdupq_n_u8(0x30);
    switch (c) {
    case 0:
        return vreinterpretq_s8_u8(vandq_u8(vshlq_n_u8(u, 4), m));
    case 1:
        return vreinterpretq_s8_u8(vandq_u8(vshlq_n_u8(u, 2), m));
    case 2:
        return vreinterpretq_s8_u8(vandq_u8(u, m));
    default:
        return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(u, 2), m));
    }
}
#define MM_H6(h, c) mm_h6(h, c)

#if MM_DOTPROD
#define MM_DOT(acc, u, a) vdotq_s32(acc, u, a)
#define MM_DOT2(acc, u1, a1, u2, a2) vdotq_s32(vdotq_s32(acc, u1, a1), u2, a2)
#else
/* Lanes hold rows: products of rows 0-1 (low half) and 2-3 (high half) as
 * int16, pairs added (vpaddq: [row0 k0+k1, row0 k2+k3, row1 ..]), then
 * pairwise added into the row's int32 lane (vpadalq). |u*a| <= 128*127, so a
 * pair fits int16. */
MM_INLINE mm_vi mm_dot_plain(mm_vi acc, mm_vb u, mm_vb a)
{
    const int16x8_t lo = vmull_s8(vget_low_s8(u), vget_low_s8(a));
    const int16x8_t hi = vmull_high_s8(u, a);
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));
}
#define MM_DOT(acc, u, a) mm_dot_plain(acc, u, a)
/* For values u <= 63 (4- and 6-bit weights): two products per int16 lane
 * before the pairwise add (4 * 63 * 127 < 32768). */
MM_INLINE mm_vi mm_dot2_plain(mm_vi acc, mm_vb u1, mm_vb a1, mm_vb u2, mm_vb a2)
{
    int16x8_t lo = vmull_s8(vget_low_s8(u1), vget_low_s8(a1));
    lo = vmlal_s8(lo, vget_low_s8(u2), vget_low_s8(a2));
    int16x8_t hi = vmull_high_s8(u1, a1);
    hi = vmlal_high_s8(hi, u2, a2);
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));
}
#define MM_DOT2(acc, u1, a1, u2, a2) mm_dot2_plain(acc, u1, a1, u2, a2)
#endif
/* int8 weights are signed x signed on both variants: no offset. */
#define MM_Q8_PREP(w) (w)
#define MM_Q8_DOT(acc, w, a) MM_DOT(acc, w, a)
#define MM_Q8_OFS 0

#define MM_FZERO vdupq_n_f32(0.0f)
#define MM_FCVT(v) vcvtq_f32_s32(v)
#define MM_FMUL(a, b) vmulq_f32(a, b)
#define MM_FFMA(a, b, c) vfmaq_f32(c, a, b)
#define MM_FNMA(a, b, c) vfmsq_f32(c, a, b)
#define MM_FSET1(x) vdupq_n_f32(x)
#define MM_FLOADH(p) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)(p))))
#define MM_FLOADU8(p)                                                                                        \
    vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_s32(vdup_n_s32(mm_ld32(p)))))))
#define MM_FLOADS8(p)                                                                                        \
    vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(mm_ld32(p)))))))
#define MM_FSTORE(p, v) vst1q_f32(p, v)

/* The activation quantizer, vectorized; the same results as mm_quantize_scalar
 * (vcvtnq rounds half to even like lrintf in the default mode). */
static void mm_quantize_neon(const float *x, int64_t x_stride, int nr, int64_t K, void *xq)
{
    struct mm_act a;
    mm_act_view(&a, xq, nr, K);
    for (int r = 0; r < nr; r++) {
        const float *xr = x + (size_t)r * (size_t)x_stride;
        int8_t *qr = (int8_t *)a.q + (size_t)r * (size_t)K;
        for (int64_t b = 0; b < a.nb; b++) {
            const float *xb = xr + 32 * b;
            int8_t *qb = qr + 32 * b;
            float32x4_t v[8];
            for (int i = 0; i < 8; i++)
                v[i] = vld1q_f32(xb + 4 * i);
            float32x4_t mx = vabsq_f32(v[0]);
            for (int i = 1; i < 8; i++)
                mx = vmaxq_f32(mx, vabsq_f32(v[i]));
            float d, id;
            mm_block_scale(vmaxvq_f32(mx), &d, &id);
            int32x4_t iv[8];
            for (int i = 0; i < 8; i++)
                iv[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id));
            for (int h = 0; h < 2; h++) {
                const int16x8_t a01 = vcombine_s16(vqmovn_s32(iv[4 * h]), vqmovn_s32(iv[4 * h + 1]));
                const int16x8_t a23 = vcombine_s16(vqmovn_s32(iv[4 * h + 2]), vqmovn_s32(iv[4 * h + 3]));
                vst1q_s8(qb + 16 * h, vcombine_s8(vqmovn_s16(a01), vqmovn_s16(a23)));
            }
            int32_t s[2];
            for (int h = 0; h < 2; h++)
                s[h] = vaddvq_s32(vaddq_s32(vaddq_s32(iv[4 * h], iv[4 * h + 1]), vaddq_s32(iv[4 * h + 2], iv[4 * h + 3])));
            const size_t at = (size_t)r * (size_t)a.nb + (size_t)b;
            ((float *)a.d)[at] = d;
            ((float *)a.ds)[at] = d * (float)(s[0] + s[1]);
            ((int32_t *)a.s)[2 * at] = s[0];
            ((int32_t *)a.s)[2 * at + 1] = s[1];
        }
    }
}
#define MM_QUANTIZE mm_quantize_neon

#include "mm_simd.h"
