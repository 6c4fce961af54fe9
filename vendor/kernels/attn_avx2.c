/* attn_avx2.c - x86-64 AVX2 + FMA + F16C path (compiled with -mavx2 -mfma -mf16c;
 * only called when cpu_features.c found these features and OS support). */
#include <immintrin.h>

#include "mk_internal.h"

static inline __attribute__((always_inline)) float mk_hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 elements of a row starting at element d, as f32. */
static inline __attribute__((always_inline)) __m256 mk_load8(const void *row, int type, int d)
{
    const unsigned char *r = (const unsigned char *)row;
    if (type == MK_KV_F32)
        return _mm256_loadu_ps((const float *)row + d);
    if (type == MK_KV_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + 2 * (size_t)d)));
    const unsigned char *blk = r + (size_t)(d / 32) * sizeof(struct mk_block_q8_0);
    __m256 scale = _mm256_set1_ps(_cvtsh_ss(mk_load_u16(blk)));
    __m128i q8 = _mm_loadl_epi64((const __m128i *)(blk + 2 + (d % 32)));
    return _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
}

/* Scores up to 4 heads (NG) against one row: the row chunk is converted once
 * and used by every head. */
static inline __attribute__((always_inline)) void mk_kscore4(const float *q, int D, int NG, const void *row, int type, float *s)
{
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int d = 0; d < D; d += 8) {
        __m256 k = mk_load8(row, type, d);
        for (int g = 0; g < NG; g++)
            acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)g * D + d), k, acc[g]);
    }
    if (NG == 4) {
        /* four horizontal sums at once: 3 hadds + one 128-bit add */
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        return;
    }
    for (int g = 0; g < NG; g++)
        s[g] = mk_hsum256(acc[g]);
}

static inline __attribute__((always_inline)) void mk_kscore_t(const struct mk_qctx *qc, int ng, const void *row,
                                                               int type, float *s)
{
    const int D = qc->D;
    for (int g0 = 0; g0 < ng; g0 += 4) {
        const float *q = qc->q + (size_t)g0 * D;
        switch (ng - g0) {
        case 1: mk_kscore4(q, D, 1, row, type, s + g0); break;
        case 2: mk_kscore4(q, D, 2, row, type, s + g0); break;
        case 3: mk_kscore4(q, D, 3, row, type, s + g0); break;
        default: mk_kscore4(q, D, 4, row, type, s + g0); break;
        }
    }
}

/* acc[g][d..d+8) for NG heads kept in registers over the tile's rows. */
static inline __attribute__((always_inline)) void mk_vacc4(float *acc, int D, int NG, const float *c, int n, const void *const *rows, int type,
                            const float *pr)
{
    for (int d = 0; d < D; d += 8) {
        __m256 a[4];
        for (int g = 0; g < NG; g++)
            a[g] = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)g * D + d), _mm256_set1_ps(c[g]));
        for (int r = 0; r < n; r++) {
            __m256 v = mk_load8(rows[r], type, d);
            for (int g = 0; g < NG; g++)
                a[g] = _mm256_fmadd_ps(_mm256_set1_ps(pr[g * MK_TILE + r]), v, a[g]);
        }
        for (int g = 0; g < NG; g++)
            _mm256_storeu_ps(acc + (size_t)g * D + d, a[g]);
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

MK_TYPE_DISPATCH

/* Scores 4 heads against 2 rows: 8 independent FMA chains (16 ymm registers
 * leave no room for more), then per row 3 hadds fold the 4 sums into one
 * __m128, and the two rows are interleaved so each head's pair of scores is
 * stored with one 64-bit store. */
#define MK_KSCORE_BLOCK_ROWS 2
static inline __attribute__((always_inline)) void mk_kscore_block(const float *q, int D, const void *const *rows,
                                                                  int type, float scale, float *s)
{
    __m256 acc[2][4];
    for (int r = 0; r < 2; r++)
        for (int g = 0; g < 4; g++)
            acc[r][g] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        __m256 k0 = mk_load8(rows[0], type, d);
        __m256 k1 = mk_load8(rows[1], type, d);
        for (int g = 0; g < 4; g++) {
            __m256 qv = _mm256_loadu_ps(q + (size_t)g * D + d);
            acc[0][g] = _mm256_fmadd_ps(qv, k0, acc[0][g]);
            acc[1][g] = _mm256_fmadd_ps(qv, k1, acc[1][g]);
        }
    }
    __m128 row[2];
    for (int r = 0; r < 2; r++) {
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
        row[r] = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale));
    }
    __m128 lo = _mm_unpacklo_ps(row[0], row[1]); /* g0r0 g0r1 g1r0 g1r1 */
    __m128 hi = _mm_unpackhi_ps(row[0], row[1]); /* g2r0 g2r1 g3r0 g3r1 */
    _mm_storel_pi((__m64 *)(s + 0 * MK_TILE), lo);
    _mm_storeh_pi((__m64 *)(s + 1 * MK_TILE), lo);
    _mm_storel_pi((__m64 *)(s + 2 * MK_TILE), hi);
    _mm_storeh_pi((__m64 *)(s + 3 * MK_TILE), hi);
}

/* exp(x) for x <= 0, 8 lanes: x = n*ln2 + r, exp(r) by a degree-7 minimax-style
 * polynomial (Cephes expf coefficients), 2^n built in the exponent bits.
 * Relative error ~2e-7; x below -87 is clamped (result ~1e-38 instead of
 * less), negligible next to the tile's largest term, which is 1. */
static inline __m256 mk_exp256(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define MK_HAVE_EXP_SUM 1
static inline float mk_exp_sum(float *s, int n, float m)
{
    __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int r = 0;
    for (; r + 8 <= n; r += 8) {
        __m256 e = mk_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + r), vm));
        _mm256_storeu_ps(s + r, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = mk_hsum256(acc);
    for (; r < n; r++) {
        s[r] = expf(s[r] - m);
        sum += s[r];
    }
    return sum;
}

#define MK_ENTRY mk_attention_avx2
#define MK_QUANT_Q 0
#include "attn_driver.h"
