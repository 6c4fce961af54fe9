/* mm_pack.c - GGUF blocks -> mistrald's packed tiles, sizes, and the
 * reference activation quantizer (portable; built with the baseline flags).
 * The formats are described in mistrald_kernels.h. GGUF block layouts, as
 * ggml defines them:
 *   Q4_0 (18 bytes): f16 d, qs[16]: value j = (qs[j] & 15) - 8, value 16+j = (qs[j] >> 4) - 8.
 *   Q8_0 (34 bytes): f16 d, int8 qs[32].
 *   Q4_K (144 bytes per 256): f16 d, f16 dmin, scales[12] (eight 6-bit scales
 *     and mins), qs[128]: 64 values per 32 bytes, low nibbles first; value =
 *     d*sc*u - dmin*m.
 *   Q6_K (210 bytes per 256): ql[128], qh[64], int8 scales[16], f16 d; value =
 *     d*scales[e/16]*(u-32), u = 4 low bits from ql | 2 high bits from qh.
 */
#include "mm_internal.h"

size_t mk_mm_tile_bytes(int wtype, int64_t n_cols)
{
    struct mm_geom g;
    if (mm_geom(wtype, n_cols, &g) != 0)
        return 0;
    return g.meta + g.quant;
}

size_t mk_mm_packed_size(int wtype, int64_t n_rows, int64_t n_cols)
{
    const size_t tb = mk_mm_tile_bytes(wtype, n_cols);
    if (tb == 0 || n_rows < 1 || n_rows > ((int64_t)1 << 40))
        return 0;
    const size_t tiles = (size_t)((n_rows + MM_TILE - 1) / MM_TILE);
    if (tiles > SIZE_MAX / tb)
        return 0;
    return tiles * tb;
}

size_t mk_mm_act_size(int64_t n_cols, int nr)
{
    if (n_cols <= 0 || n_cols % 32 != 0 || n_cols > ((int64_t)1 << 30) || nr < 1 || nr > MK_MM_MAX_BATCH)
        return 0;
    return mm_act_batch_bytes(n_cols, nr);
}

int mk_mm_quantize(const float *x, int64_t x_stride, int nr, int64_t n_cols, void *xq)
{
    if (!x || !xq || mk_mm_act_size(n_cols, nr) == 0 || x_stride < n_cols)
        return -1;
    mm_quantize_chunks(mm_quantize_scalar, x, x_stride, nr, n_cols, xq, 0, (nr + MK_MM_MAX_NR - 1) / MK_MM_MAX_NR);
    return 0;
}

size_t mk_mm_scratch_size(const struct mk_mm_params *p, int nth)
{
    if (!p || p->xq || nth <= 0)
        return 0;
    const size_t one = mk_mm_act_size(p->n_cols, p->nr);
    return one * (size_t)nth;
}

/* Scale and min j (0..7) of a Q4_K super-block (6 bits each). */
static void mm_q4k_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Row i of one tile unit (a block of 32 or a super-block of 256) from its GGUF block. */
static void mm_pack_unit(int wtype, const uint8_t *src, int i, uint8_t *meta, uint8_t *quant)
{
    switch (wtype) {
    case MK_W_Q4_0:
        memcpy(meta + 2 * i, src, 2);
        for (int p = 0; p < 4; p++) /* byte j of GGUF = value j | value 16+j << 4 */
            memcpy(quant + 64 * p + 4 * i, src + 2 + 4 * p, 4);
        break;
    case MK_W_Q8_0:
        memcpy(meta + 2 * i, src, 2);
        for (int g = 0; g < 8; g++)
            memcpy(quant + 64 * g + 4 * i, src + 2 + 4 * g, 4);
        break;
    case MK_W_Q4_K: {
        memcpy(meta + 2 * i, src, 2);
        memcpy(meta + 32 + 2 * i, src + 2, 2);
        const uint8_t *qs = src + 16;
        for (int j = 0; j < 8; j++) {
            mm_q4k_scale_min(src + 4, j, meta + 64 + 16 * j + i, meta + 192 + 16 * j + i);
            const uint8_t *q = qs + 32 * (j >> 1);
            uint8_t *blk = quant + 256 * j;
            for (int k = 0; k < 16; k++) {
                const uint8_t lo = (j & 1) ? (uint8_t)(q[k] >> 4) : (uint8_t)(q[k] & 15);
                const uint8_t hi = (j & 1) ? (uint8_t)(q[16 + k] >> 4) : (uint8_t)(q[16 + k] & 15);
                blk[64 * (k >> 2) + 4 * i + (k & 3)] = (uint8_t)(lo | (hi << 4));
            }
        }
        break;
    }
    default: { /* Q6_K */
        const uint8_t *ql = src, *qh = src + 128;
        const int8_t *sc = (const int8_t *)(src + 192);
        memcpy(meta + 2 * i, src + 208, 2);
        for (int j = 0; j < 16; j++)
            meta[32 + 16 * j + i] = (uint8_t)sc[j];
        uint8_t u[256];
        for (int n = 0; n < 2; n++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *L = ql + 64 * n, *H = qh + 32 * n;
                u[128 * n + l] = (uint8_t)((L[l] & 15) | ((H[l] & 3) << 4));
                u[128 * n + 32 + l] = (uint8_t)((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4));
                u[128 * n + 64 + l] = (uint8_t)((L[l] >> 4) | (((H[l] >> 4) & 3) << 4));
                u[128 * n + 96 + l] = (uint8_t)((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4));
            }
        for (int j = 0; j < 8; j++) {
            const uint8_t *v = u + 32 * j;
            uint8_t *blk = quant + 384 * j;
            for (int k = 0; k < 16; k++)
                blk[64 * (k >> 2) + 4 * i + (k & 3)] = (uint8_t)((v[k] & 15) | ((v[16 + k] & 15) << 4));
            for (int k = 0; k < 32; k++) {
                const int g = k >> 2;
                blk[256 + 64 * (g >> 2) + 4 * i + (k & 3)] |= (uint8_t)((v[k] >> 4) << (2 * (g & 3)));
            }
        }
        break;
    }
    }
}

int mk_mm_pack(int wtype, int64_t n_rows, int64_t n_cols, const void *src, void *dst, int64_t tile_begin,
               int64_t tile_end)
{
    struct mm_geom g;
    if (!src || !dst || mk_mm_packed_size(wtype, n_rows, n_cols) == 0 || mm_geom(wtype, n_cols, &g) != 0)
        return -1;
    const int64_t ntiles = (n_rows + MM_TILE - 1) / MM_TILE;
    if (tile_begin < 0 || tile_end > ntiles || tile_begin > tile_end)
        return -1;
    const size_t tb = g.meta + g.quant;
    const size_t units = (size_t)(n_cols / mm_block_values(wtype));
    const size_t src_unit = mm_gguf_block_bytes(wtype);
    const size_t row_bytes = units * src_unit;
    for (int64_t t = tile_begin; t < tile_end; t++) {
        uint8_t *tile = (uint8_t *)dst + (size_t)t * tb;
        memset(tile, 0, tb);
        for (int i = 0; i < MM_TILE; i++) {
            const int64_t n = t * MM_TILE + i;
            if (n >= n_rows)
                break;
            const uint8_t *row = (const uint8_t *)src + (size_t)n * row_bytes;
            for (size_t u = 0; u < units; u++)
                mm_pack_unit(wtype, row + u * src_unit, i, tile + u * g.meta_unit, tile + g.meta + u * g.quant_unit);
        }
    }
    return 0;
}
