/* attn_avx2.c - x86-64 AVX-512 (F, BW, VL, DQ) path (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mf16c -mfma;
 * only called when cpu_features.c found these features and OS support). */
#include <immintrin.h>

#include "mk_internal.h"

/* 16 elements of a row starting at element d, as f32. */
static inline __attribute__((always_inline)) __m512 mk_load16(const void *row, int type, int d)
{
    const unsigned char *r = (const unsigned char *)row;
    if (type == MK_KV_F32)
        return _mm512_loadu_ps((const float *)row + d);
    if (type == MK_KV_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + 2 * (size_t)d)));
    const unsigned char *blk = r + (size_t)(d / 32) * sizeof(struct mk_block_q8_0);
    __m512 scale = _mm512_set1_ps(_cvtsh_ss(mk_load_u16(blk)));
    __m128i q8 = _mm_loadu_si128((const __m128i *)(blk + 2 + (d % 32)));
    return _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)));
}

/* Scores up to 4 heads (NG) against one row: the row chunk is converted once
 * and used by every head. */
static inline __attribute__((always_inline)) void mk_kscore4(const float *q, int D, int NG, const void *row, int type, float *s)
{
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int d = 0; d < D; d += 16) {
        __m512 k = mk_load16(row, type, d);
        for (int g = 0; g < NG; g++)
            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)g * D + d), k, acc[g]);
    }
    if (NG == 4) {
        /* four horizontal sums at once: fold to 256 bits, then 3 hadds + one 128-bit add */
        __m256 y[4];
        for (int g = 0; g < 4; g++)
            y[g] = _mm256_add_ps(_mm512_castps512_ps256(acc[g]), _mm512_extractf32x8_ps(acc[g], 1));
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
        _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        return;
    }
    for (int g = 0; g < NG; g++)
        s[g] = _mm512_reduce_add_ps(acc[g]);
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

/* acc[g][d0..d0+16*NC) for NG heads kept in registers (NG*NC <= 16) over the
 * tile's rows; each row chunk is converted once and each weight broadcast once
 * per row, then used by NG*NC independent FMAs. */
static inline __attribute__((always_inline)) void mk_vacc_blk(float *acc, int D, int d0, int NG, int NC,
                                                              const float *c, int n, const void *const *rows,
                                                              int type, const float *pr)
{
    __m512 a[4][4];
    for (int g = 0; g < NG; g++)
        for (int j = 0; j < NC; j++)
            a[g][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)g * D + d0 + 16 * j), _mm512_set1_ps(c[g]));
    for (int r = 0; r < n; r++) {
        __m512 v[4];
        for (int j = 0; j < NC; j++)
            v[j] = mk_load16(rows[r], type, d0 + 16 * j);
        for (int g = 0; g < NG; g++) {
            __m512 w = _mm512_set1_ps(pr[g * MK_TILE + r]);
            for (int j = 0; j < NC; j++)
                a[g][j] = _mm512_fmadd_ps(w, v[j], a[g][j]);
        }
    }
    for (int g = 0; g < NG; g++)
        for (int j = 0; j < NC; j++)
            _mm512_storeu_ps(acc + (size_t)g * D + d0 + 16 * j, a[g][j]);
}

/* acc[g][:] for NG (<= 4) heads, 64 columns at a time (D is a multiple of 32). */
static inline __attribute__((always_inline)) void mk_vacc4(float *acc, int D, int NG, const float *c, int n,
                                                           const void *const *rows, int type, const float *pr)
{
    int d0 = 0;
    for (; d0 + 64 <= D; d0 += 64)
        mk_vacc_blk(acc, D, d0, NG, 4, c, n, rows, type, pr);
    if (d0 < D)
        mk_vacc_blk(acc, D, d0, NG, 2, c, n, rows, type, pr);
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

/* Scores 4 heads against 4 rows: 16 independent FMA chains, then per row the
 * 4 sums folded into one __m128, and the 4x4 block transposed so each head's
 * 4 scores are stored together. */
static inline __attribute__((always_inline)) void mk_kscore_4x4(const float *q, int D, const void *const *rows,
                                                                int type, float scale, float *s)
{
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int g = 0; g < 4; g++)
            acc[r][g] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        __m512 k[4];
        for (int r = 0; r < 4; r++)
            k[r] = mk_load16(rows[r], type, d);
        for (int g = 0; g < 4; g++) {
            __m512 qv = _mm512_loadu_ps(q + (size_t)g * D + d);
            for (int r = 0; r < 4; r++)
                acc[r][g] = _mm512_fmadd_ps(qv, k[r], acc[r][g]);
        }
    }
    __m128 row[4];
    for (int r = 0; r < 4; r++) {
        __m256 y[4];
        for (int g = 0; g < 4; g++)
            y[g] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][g]), _mm512_extractf32x8_ps(acc[r][g], 1));
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
        row[r] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    }
    _MM_TRANSPOSE4_PS(row[0], row[1], row[2], row[3]);
    const __m128 vs = _mm_set1_ps(scale);
    for (int g = 0; g < 4; g++)
        _mm_storeu_ps(s + g * MK_TILE, _mm_mul_ps(row[g], vs));
}

#define MK_KSCORE_BLOCK_ROWS 4
#define mk_kscore_block mk_kscore_4x4

/* exp(x) for x <= 0, 16 lanes: x = n*ln2 + r, exp(r) by a polynomial (Cephes
 * expf coefficients), scaled by 2^n with vscalefps. Relative error ~2e-7;
 * x below -87 is clamped (negligible next to the tile's largest term, 1). */
static inline __m512 mk_exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}

#define MK_HAVE_EXP_SUM 1
static inline float mk_exp_sum(float *s, int n, float m)
{
    __m512 vm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    int r = 0;
    for (; r + 16 <= n; r += 16) {
        __m512 e = mk_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + r), vm));
        _mm512_storeu_ps(s + r, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (r < n) {
        __mmask16 k = (__mmask16)((1u << (n - r)) - 1);
        __m512 e = mk_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + r), vm));
        _mm512_mask_storeu_ps(s + r, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(acc);
}

#define MK_ENTRY mk_attention_avx512
#define MK_QUANT_Q 0
#include "attn_driver.h"
