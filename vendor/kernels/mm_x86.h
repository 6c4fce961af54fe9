/* mm_x86.h - the vector operations of mm_simd.h for x86-64, and the
 * vectorized activation quantizer. The including file defines
 *   MM_WIDTH  256 (AVX2: two vectors of 8 rows per tile) or 512 (AVX-512: one of 16)
 *   MM_VNNI   0: u8 x s8 products with vpmaddubsw + vpmaddwd;
 *             1: vpdpbusd (512: AVX512_VNNI; 256: AVX-VNNI, VEX encoding);
 *             2: (256 only) vpdpbusd in its EVEX encoding (AVX512_VNNI + VL), the
 *                AVX-VNNI path's code for testing on AVX-512 machines.
 * and is compiled with the matching -m flags (build.rs). */
#include <immintrin.h>

#include "mm_internal.h"

#if MM_WIDTH == 512
typedef __m512i mm_vb;
typedef __m512i mm_vi;
typedef __m512 mm_vf;
#define MM_LANES 16
#ifndef MM_GROUP
#define MM_GROUP 8
#endif
/* One-row Q8_0 products prefetch every other line (see mm_simd.h). */
#define MM_Q8_N1_PF_STEP 2
#define MM_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define MM_AND(a, b) _mm512_and_si512(a, b)
#define MM_OR(a, b) _mm512_or_si512(a, b)
#define MM_XOR(a, b) _mm512_xor_si512(a, b)
#define MM_SRL16(v, n) _mm512_srli_epi16(v, n)
#define MM_SLL16(v, n) _mm512_slli_epi16(v, n)
#define MM_SET8(c) _mm512_set1_epi8((char)(c))
#define MM_SET16(c) _mm512_set1_epi16(c)
#define MM_SET32(c) _mm512_set1_epi32(c)
#define MM_IZERO _mm512_setzero_si512()
#define MM_ADD16(a, b) _mm512_add_epi16(a, b)
#define MM_ADD32(a, b) _mm512_add_epi32(a, b)
#define MM_SUB32(a, b) _mm512_sub_epi32(a, b)
#define MM_MADDUBS(u, s) _mm512_maddubs_epi16(u, s)
#define MM_MADD(a, b) _mm512_madd_epi16(a, b)
#define MM_FZERO _mm512_setzero_ps()
#define MM_FCVT(v) _mm512_cvtepi32_ps(v)
#define MM_FMUL(a, b) _mm512_mul_ps(a, b)
#define MM_FFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MM_FNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define MM_FSET1(x) _mm512_set1_ps(x)
#define MM_FLOADH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(p)))
#define MM_FLOADU8(p) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(p))))
#define MM_FLOADS8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(p))))
#define MM_FSTORE(p, v) _mm512_storeu_ps(p, v)
#if MM_VNNI
#define MM_DOT(acc, u, a) _mm512_dpbusd_epi32(acc, u, a)
#endif
#else /* 256 */
typedef __m256i mm_vb;
typedef __m256i mm_vi;
typedef __m256 mm_vf;
#define MM_LANES 8
#ifndef MM_GROUP
#define MM_GROUP 4
#endif
#define MM_LOAD(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define MM_AND(a, b) _mm256_and_si256(a, b)
#define MM_OR(a, b) _mm256_or_si256(a, b)
#define MM_XOR(a, b) _mm256_xor_si256(a, b)
#define MM_SRL16(v, n) _mm256_srli_epi16(v, n)
#define MM_SLL16(v, n) _mm256_slli_epi16(v, n)
#define MM_SET8(c) _mm256_set1_epi8((char)(c))
#define MM_SET16(c) _mm256_set1_epi16(c)
#define MM_SET32(c) _mm256_set1_epi32(c)
#define MM_IZERO _mm256_setzero_si256()
#define MM_ADD16(a, b) _mm256_add_epi16(a, b)
#define MM_ADD32(a, b) _mm256_add_epi32(a, b)
#define MM_SUB32(a, b) _mm256_sub_epi32(a, b)
#define MM_MADDUBS(u, s) _mm256_maddubs_epi16(u, s)
#define MM_MADD(a, b) _mm256_madd_epi16(a, b)
#define MM_FZERO _mm256_setzero_ps()
#define MM_FCVT(v) _mm256_cvtepi32_ps(v)
#define MM_FMUL(a, b) _mm256_mul_ps(a, b)
#define MM_FFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MM_FNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define MM_FSET1(x) _mm256_set1_ps(x)
#define MM_FLOADH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p)))
#define MM_FLOADU8(p) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(p))))
#define MM_FLOADS8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(p))))
#define MM_FSTORE(p, v) _mm256_storeu_ps(p, v)
#if MM_VNNI == 1
#define MM_DOT(acc, u, a) _mm256_dpbusd_avx_epi32(acc, u, a)
#elif MM_VNNI == 2
#define MM_DOT(acc, u, a) _mm256_dpbusd_epi32(acc, u, a)
#endif
#endif

static inline int32_t mm_ld32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#define MM_BCAST4(p) MM_SET32(mm_ld32(p))
#define MM_LO4(v) MM_AND(v, MM_SET8(0x0f))
#define MM_HI4(v) MM_AND(MM_SRL16(v, 4), MM_SET8(0x0f))
#define MM_ISUB(v, x) MM_SUB32(v, MM_SET32(x))

/* Bits 2c..2c+1 of each byte at bits 4..5. 16-bit shifts: the masked bits of
 * a byte come from the same byte for these shift counts. */
MM_INLINE mm_vb mm_h6(mm_vb h, int c)
{
    switch (c) {
    case 0:
        return MM_AND(MM_SLL16(h, 4), MM_SET8(0x30));
    case 1:
        return MM_AND(MM_SLL16(h, 2), MM_SET8(0x30));
    case 2:
        return MM_AND(h, MM_SET8(0x30));
    default:
        return MM_AND(MM_SRL16(h, 2), MM_SET8(0x30));
    }
}
#define MM_H6(h, c) mm_h6(h, c)

#if MM_VNNI
#define MM_DOT2(acc, u1, a1, u2, a2) MM_DOT(MM_DOT(acc, u1, a1), u2, a2)
/* int8 weights as unsigned w + 128 (xor 0x80); the kernel subtracts 128 * sum(a). */
#define MM_Q8_PREP(w) MM_XOR(w, MM_SET8(0x80))
#define MM_Q8_DOT(acc, w, a) MM_DOT(acc, w, a)
#define MM_Q8_OFS 128
#else
/* vpmaddubsw: u8 x s8 pairs summed to int16 (saturating: u <= 63 and |a| <= 127
 * keep two pairs below 32767), vpmaddwd with ones: int16 pairs to int32. */
#define MM_DOT(acc, u, a) MM_ADD32(acc, MM_MADD(MM_MADDUBS(u, a), MM_SET16(1)))
#define MM_DOT2(acc, u1, a1, u2, a2)                                                                          \
    MM_ADD32(acc, MM_MADD(MM_ADD16(MM_MADDUBS(u1, a1), MM_MADDUBS(u2, a2)), MM_SET16(1)))
#define MM_Q8_PREP(w) (w)
#define MM_Q8_OFS 0
/* 4-bit weights: a whole block's vpmaddubsw results summed in int16 (8 * 2 *
 * 15 * 127 = 30480 < 32768), then one vpmaddwd. */
#define MM_DOT_U4_BLOCK 1
MM_INLINE mm_vi mm_dot_u4_block(mm_vb l0, mm_vb l1, mm_vb l2, mm_vb l3, mm_vb h0, mm_vb h1, mm_vb h2, mm_vb h3,
                                const int8_t *x)
{
    mm_vi s = MM_ADD16(MM_MADDUBS(l0, MM_BCAST4(x)), MM_MADDUBS(l1, MM_BCAST4(x + 4)));
    s = MM_ADD16(s, MM_ADD16(MM_MADDUBS(l2, MM_BCAST4(x + 8)), MM_MADDUBS(l3, MM_BCAST4(x + 12))));
    s = MM_ADD16(s, MM_ADD16(MM_MADDUBS(h0, MM_BCAST4(x + 16)), MM_MADDUBS(h1, MM_BCAST4(x + 20))));
    s = MM_ADD16(s, MM_ADD16(MM_MADDUBS(h2, MM_BCAST4(x + 24)), MM_MADDUBS(h3, MM_BCAST4(x + 28))));
    return MM_MADD(s, MM_SET16(1));
}
#if MM_WIDTH == 512
/* |w| (as u8; -128 -> 128) times a with w's sign: |w|*|a| <= 128*127, pairs fit int16. */
MM_INLINE mm_vi mm_q8_dot(mm_vi acc, mm_vb w, mm_vb a)
{
    const __m512i sa = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
    return MM_ADD32(acc, MM_MADD(MM_MADDUBS(_mm512_abs_epi8(w), sa), MM_SET16(1)));
}
#define MM_Q8_DOT(acc, w, a) mm_q8_dot(acc, w, a)
#else
#define MM_Q8_DOT(acc, w, a)                                                                                  \
    MM_ADD32(acc, MM_MADD(MM_MADDUBS(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), MM_SET16(1)))
#endif
#endif

/* The activation quantizer, vectorized; the same results as mm_quantize_scalar
 * (max is exact, the scale is computed the same way, x * id is one IEEE
 * multiplication, and cvtps2dq rounds half to even like lrintf). */
static void mm_quantize_x86(const float *x, int64_t x_stride, int nr, int64_t K, void *xq)
{
    struct mm_act a;
    mm_act_view(&a, xq, nr, K);
    for (int r = 0; r < nr; r++) {
        const float *xr = x + (size_t)r * (size_t)x_stride;
        int8_t *qr = (int8_t *)a.q + (size_t)r * (size_t)K;
        for (int64_t b = 0; b < a.nb; b++) {
            const float *xb = xr + 32 * b;
            int8_t *qb = qr + 32 * b;
            float d, id;
            int32_t s[2];
#if MM_WIDTH == 512
            const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            mm_block_scale(amax, &d, &id);
            const __m512 m = _mm512_set1_ps(id);
            const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, m));
            const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, m));
            _mm_storeu_si128((__m128i *)(void *)qb, _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(void *)(qb + 16), _mm512_cvtsepi32_epi8(i1));
            s[0] = _mm512_reduce_add_epi32(i0);
            s[1] = _mm512_reduce_add_epi32(i1);
#else
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v[4];
            for (int i = 0; i < 4; i++)
                v[i] = _mm256_loadu_ps(xb + 8 * i);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            mm_block_scale(_mm_cvtss_f32(m4), &d, &id);
            const __m256 m = _mm256_set1_ps(id);
            __m256i iv[4];
            for (int i = 0; i < 4; i++)
                iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], m));
            /* packs work within 128-bit lanes: fix the order with a permute */
            const __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]), p23 = _mm256_packs_epi32(iv[2], iv[3]);
            const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(void *)qb, p);
            for (int h = 0; h < 2; h++) {
                __m256i t = _mm256_add_epi32(iv[2 * h], iv[2 * h + 1]);
                __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
                u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4e));
                u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xb1));
                s[h] = _mm_cvtsi128_si32(u);
            }
#endif
            const size_t at = (size_t)r * (size_t)a.nb + (size_t)b;
            ((float *)a.d)[at] = d;
            ((float *)a.ds)[at] = d * (float)(s[0] + s[1]);
            ((int32_t *)a.s)[2 * at] = s[0];
            ((int32_t *)a.s)[2 * at + 1] = s[1];
        }
    }
}
#define MM_QUANTIZE mm_quantize_x86

#include "mm_simd.h"
