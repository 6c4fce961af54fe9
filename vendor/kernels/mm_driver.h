/* mm_driver.h - the matrix-product driver, included by every path file after
 * it has defined:
 *   MM_ENTRY          name of the path's entry point (mk_matmul_<path>)
 *   MM_QPART          name of its quantizer share (mm_qpart_<path>, internal)
 *   MM_QUANTIZE       its activation quantizer (same results as mm_quantize_scalar)
 *   mm_tile_fns       static const mm_tile_fn [4][MK_MM_MAX_NR]: tile functions
 *                     per weight type (Q4_0, Q8_0, Q4_K, Q6_K) and rows - 1.
 * The driver takes thread ith's contiguous range of tiles, quantizes the
 * activations into the thread's own scratch (unless the caller passed them
 * quantized), runs the tile function on each tile for every chunk of 8
 * activation rows and stores the tile's valid rows. */
#ifndef MM_ENTRY
#error "define MM_ENTRY before including mm_driver.h"
#endif

static inline int mm_type_index(int wtype)
{
    switch (wtype) {
    case MK_W_Q4_0:
        return 0;
    case MK_W_Q8_0:
        return 1;
    case MK_W_Q4_K:
        return 2;
    default:
        return 3;
    }
}

int MM_ENTRY(const struct mk_mm_params *p, int ith, int nth)
{
    const size_t tb = mm_check_params(p, ith, nth);
    if (tb == 0)
        return -1;
    const int64_t ntiles = (p->n_rows + MM_TILE - 1) / MM_TILE;
    const int64_t t0 = ntiles * ith / nth, t1 = ntiles * (ith + 1) / nth;
    if (t0 >= t1)
        return 0;
    /* Start fetching the first weights of this thread's range (both sections)
     * while the activations are quantized. */
    struct mm_geom g = {0, 0, 0, 0};
    mm_geom(p->wtype, p->n_cols, &g);
    const uint8_t *first = (const uint8_t *)p->w + (size_t)t0 * tb;
    const size_t pf = (size_t)mk_mm_pf_distance;
    for (size_t off = 0; off < pf && off < g.quant; off += 64)
        MM_PF(first + g.meta + off);
    for (size_t off = 0; off < pf / 8 && off < g.meta; off += 64)
        MM_PF(first + off);
    const int nr = p->nr, nchunks = (nr + MK_MM_MAX_NR - 1) / MK_MM_MAX_NR;
    const void *xq = p->xq;
    if (!xq) {
        void *mine = (uint8_t *)p->scratch + (size_t)ith * mm_act_batch_bytes(p->n_cols, nr);
        mm_quantize_chunks(MM_QUANTIZE, p->x, p->x_stride, nr, p->n_cols, mine, 0, nchunks);
        xq = mine;
    }
    const size_t chunk_bytes = mm_act_bytes(p->n_cols, MK_MM_MAX_NR);
    const int ti = mm_type_index(p->wtype);
    float out[MK_MM_MAX_NR * MM_TILE];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = (const uint8_t *)p->w + (size_t)t * tb;
        const int64_t n0 = t * MM_TILE;
        const int64_t nv = p->n_rows - n0 < MM_TILE ? p->n_rows - n0 : MM_TILE;
        /* Every chunk of rows while the tile is in cache: weights read once. */
        for (int c = 0; c < nchunks; c++) {
            const int rows = mm_chunk_rows(nr, c);
            struct mm_act a;
            mm_act_view(&a, (const uint8_t *)xq + (size_t)c * chunk_bytes, rows, p->n_cols);
            mm_tile_fns[ti][rows - 1](tile, tb, &a, out);
            float *y = p->y + (size_t)c * MK_MM_MAX_NR * (size_t)p->y_stride + (size_t)n0;
            for (int r = 0; r < rows; r++)
                memcpy(y + (size_t)r * (size_t)p->y_stride, out + r * MM_TILE, (size_t)nv * sizeof(float));
        }
    }
    return 0;
}

/* This path's share of mk_mm_quantize_part (dispatched by cpu_features.c). */
void MM_QPART(const float *x, int64_t x_stride, int nr, int64_t K, void *xq, int ith, int nth)
{
    const int nchunks = (nr + MK_MM_MAX_NR - 1) / MK_MM_MAX_NR;
    mm_quantize_chunks(MM_QUANTIZE, x, x_stride, nr, K, xq, (int)((int64_t)nchunks * ith / nth),
                       (int)((int64_t)nchunks * (ith + 1) / nth));
}
