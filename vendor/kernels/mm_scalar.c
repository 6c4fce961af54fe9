/* mm_scalar.c - portable matrix-product path, the reference the SIMD paths are
 * tested against. Reads the packed layout value by value (mistrald_kernels.h)
 * and does the same arithmetic as the SIMD paths: exact integer dot products
 * per block, then f32 scaling and accumulation in the same order (without
 * FMA). Built with the baseline flags only. */
#include "mm_internal.h"

/* Value k (0..31) of row i in a 256-byte block of 4-bit values (chunk format). */
static inline int mm_u4(const uint8_t *blk, int i, int k)
{
    const uint8_t byte = blk[64 * ((k & 15) >> 2) + 4 * i + (k & 3)];
    return k < 16 ? (byte & 15) : (byte >> 4);
}

/* Value k (0..31) of row i in a Q6_K block of 384 bytes. */
static inline int mm_u6(const uint8_t *blk, int i, int k)
{
    const int g = k >> 2; /* k-group 0..7 */
    const int hi = (blk[256 + 64 * (g >> 2) + 4 * i + (k & 3)] >> (2 * (g & 3))) & 3;
    return mm_u4(blk, i, k) | (hi << 4);
}

static float mm_h2f_s(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu, bits;
    float f;
    if (em >= 0x7c00u) {
        bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
    } else if (em >= 0x0400u) {
        bits = sign | ((em + ((127u - 15u) << 10)) << 13);
    } else {
        f = (float)em * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static void mm_tile_q4_0(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, int nr)
{
    (void)tb;
    const uint8_t *q = tile + mm_round64(32 * (size_t)a->nb);
    float acc[MK_MM_MAX_NR][MM_TILE] = {{0}};
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = q + 256 * b;
        for (int i = 0; i < MM_TILE; i++) {
            const float dw = mm_h2f_s(tile + 32 * b + 2 * i);
            for (int r = 0; r < nr; r++) {
                const int8_t *x = a->q + r * a->K + 32 * b;
                const int32_t *s = a->s + 2 * (r * a->nb + b);
                int32_t dot = 0;
                for (int k = 0; k < 32; k++)
                    dot += mm_u4(blk, i, k) * x[k];
                dot -= 8 * (s[0] + s[1]);
                acc[r][i] += (float)dot * (dw * a->d[r * a->nb + b]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        memcpy(out + r * MM_TILE, acc[r], sizeof acc[r]);
}

static void mm_tile_q8_0(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, int nr)
{
    (void)tb;
    const uint8_t *q = tile + mm_round64(32 * (size_t)a->nb);
    float acc[MK_MM_MAX_NR][MM_TILE] = {{0}};
    for (int64_t b = 0; b < a->nb; b++) {
        const int8_t *blk = (const int8_t *)(q + 512 * b);
        for (int i = 0; i < MM_TILE; i++) {
            const float dw = mm_h2f_s(tile + 32 * b + 2 * i);
            for (int r = 0; r < nr; r++) {
                const int8_t *x = a->q + r * a->K + 32 * b;
                int32_t dot = 0;
                for (int k = 0; k < 32; k++)
                    dot += blk[64 * (k >> 2) + 4 * i + (k & 3)] * x[k];
                acc[r][i] += (float)dot * (dw * a->d[r * a->nb + b]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        memcpy(out + r * MM_TILE, acc[r], sizeof acc[r]);
}

static void mm_tile_q4_k(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, int nr)
{
    (void)tb;
    const uint8_t *q = tile + mm_round64(320 * (size_t)(a->nb / 8));
    float acc[MK_MM_MAX_NR][MM_TILE] = {{0}};
    for (int64_t sb = 0; sb < a->nb / 8; sb++) {
        const uint8_t *meta = tile + 320 * sb;
        for (int j = 0; j < 8; j++) {
            const int64_t b = 8 * sb + j;
            const uint8_t *blk = q + 2048 * sb + 256 * j;
            for (int i = 0; i < MM_TILE; i++) {
                const float S = mm_h2f_s(meta + 2 * i) * (float)meta[64 + 16 * j + i];
                const float M = mm_h2f_s(meta + 32 + 2 * i) * (float)meta[192 + 16 * j + i];
                for (int r = 0; r < nr; r++) {
                    const int8_t *x = a->q + r * a->K + 32 * b;
                    int32_t dot = 0;
                    for (int k = 0; k < 32; k++)
                        dot += mm_u4(blk, i, k) * x[k];
                    const size_t at = (size_t)(r * a->nb + b);
                    acc[r][i] += ((float)dot * S) * a->d[at];
                    acc[r][i] -= M * a->ds[at];
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        memcpy(out + r * MM_TILE, acc[r], sizeof acc[r]);
}

static void mm_tile_q6_k(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, int nr)
{
    (void)tb;
    const uint8_t *q = tile + mm_round64(320 * (size_t)(a->nb / 8));
    float acc[MK_MM_MAX_NR][MM_TILE] = {{0}};
    for (int64_t sb = 0; sb < a->nb / 8; sb++) {
        const uint8_t *meta = tile + 320 * sb;
        for (int j = 0; j < 8; j++) {
            const int64_t b = 8 * sb + j;
            const uint8_t *blk = q + 3072 * sb + 384 * j;
            for (int i = 0; i < MM_TILE; i++) {
                const float d = mm_h2f_s(meta + 2 * i);
                const float S_lo = d * (float)(int8_t)meta[32 + 16 * (2 * j) + i];
                const float S_hi = d * (float)(int8_t)meta[32 + 16 * (2 * j + 1) + i];
                for (int r = 0; r < nr; r++) {
                    const int8_t *x = a->q + r * a->K + 32 * b;
                    const int32_t *s = a->s + 2 * (r * a->nb + b);
                    int32_t lo = 0, hi = 0;
                    for (int k = 0; k < 16; k++) {
                        lo += mm_u6(blk, i, k) * x[k];
                        hi += mm_u6(blk, i, 16 + k) * x[16 + k];
                    }
                    lo -= 32 * s[0];
                    hi -= 32 * s[1];
                    const float t = (float)lo * S_lo + (float)hi * S_hi;
                    acc[r][i] += t * a->d[r * a->nb + b];
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        memcpy(out + r * MM_TILE, acc[r], sizeof acc[r]);
}

#define MM_SCALAR_NR(T, N)                                                                                   \
    static void mm_##T##_n##N(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out)            \
    {                                                                                                        \
        mm_tile_##T(tile, tb, a, out, N);                                                                    \
    }
#define MM_SCALAR_TYPE(T)                                                                                    \
    MM_SCALAR_NR(T, 1)                                                                                       \
    MM_SCALAR_NR(T, 2)                                                                                       \
    MM_SCALAR_NR(T, 3)                                                                                       \
    MM_SCALAR_NR(T, 4)                                                                                       \
    MM_SCALAR_NR(T, 5) MM_SCALAR_NR(T, 6) MM_SCALAR_NR(T, 7) MM_SCALAR_NR(T, 8)
MM_SCALAR_TYPE(q4_0)
MM_SCALAR_TYPE(q8_0)
MM_SCALAR_TYPE(q4_k)
MM_SCALAR_TYPE(q6_k)
#define MM_ROW(T) {mm_##T##_n1, mm_##T##_n2, mm_##T##_n3, mm_##T##_n4, mm_##T##_n5, mm_##T##_n6, mm_##T##_n7, mm_##T##_n8}
static const mm_tile_fn mm_tile_fns[4][MK_MM_MAX_NR] = {MM_ROW(q4_0), MM_ROW(q8_0), MM_ROW(q4_k), MM_ROW(q6_k)};

#define MM_ENTRY mk_matmul_scalar
#define MM_QPART mm_qpart_scalar
#define MM_QUANTIZE mm_quantize_scalar
#include "mm_driver.h"
