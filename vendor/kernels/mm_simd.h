/* mm_simd.h - the tile functions of the SIMD matrix-product paths, written
 * once over a small set of vector operations that each path defines before
 * including this file (mm_x86.h for AVX2 / AVX-VNNI / AVX-512 / AVX-512 VNNI,
 * mm_neon.h for NEON / NEON dot product):
 *
 *   mm_vb, mm_vi, mm_vf   byte vector, int32 accumulator, f32 vector (MM_LANES lanes of 4 bytes = rows)
 *   MM_LOAD(p)            MM_LANES*4 bytes of packed weights (MM_LANES rows x 4 values)
 *   MM_LO4(v), MM_HI4(v)  low / high nibble of every byte
 *   MM_H6(h, c)           bits 2c..2c+1 of every byte moved to bits 4..5 (c constant)
 *   MM_OR(a, b), MM_IZERO, MM_ISUB(v, x) (v - x in every lane, x an int)
 *   MM_BCAST4(p)          the 4 activation bytes at p in every lane
 *   MM_DOT(acc, u, a)     acc + per lane sum of 4 products u*a (u 0..63 unsigned, a int8)
 *   MM_DOT2(acc, u1, a1, u2, a2)  two MM_DOTs
 *   MM_Q8_PREP(w), MM_Q8_DOT(acc, w', a), MM_Q8_OFS: int8 weights: w' = PREP(w);
 *                         DOT(acc, w', a) - MM_Q8_OFS * sum(a) = acc + sum w*a
 *   MM_FZERO, MM_FCVT, MM_FMUL, MM_FFMA(a,b,c) = a*b+c, MM_FNMA(a,b,c) = c-a*b,
 *   MM_FSET1, MM_FLOADH (MM_LANES f16), MM_FLOADU8 / MM_FLOADS8 (MM_LANES u8/int8), MM_FSTORE
 *   MM_GROUP              activation rows per pass over a tile (register budget: 8 on
 *                         AVX-512, 4 on AVX2 and NEON; measured on Zen 4)
 *   MM_DOT_U4_BLOCK       optional: mm_dot_u4_block() sums a whole block of 4-bit products
 *                         at once (x86 without VNNI: int16 sums, one vpmaddwd)
 *
 * A tile's 16 rows are MM_RV = 16 / MM_LANES vectors. Each block of 32 values
 * is read once, in address order, and multiplied with every activation row
 * while its unpacked values are in registers; the per-row results stay in
 * vector lanes until the tile's end (no horizontal sums). The weights are
 * prefetched mk_mm_pf_distance bytes ahead into L2 (continuing into the
 * next tile), one prefetch per 64 bytes read, and on x86 the 4- and 6-bit
 * values also twice as far ahead into L2 and MM_PF_L1_DISTANCE bytes ahead
 * into L1 (mm_pf_quant_lines).
 */
#define MM_RV (MM_TILE / MM_LANES)

#define MM_FOR_R _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
#define MM_FOR_RV _Pragma("GCC unroll 4") for (int rv = 0; rv < MM_RV; rv++)

MM_INLINE void mm_store_acc(float *out, mm_vf acc[MK_MM_MAX_NR][MM_RV], const int nr)
{
    MM_FOR_R
    {
        MM_FOR_RV MM_FSTORE(out + r * MM_TILE + rv * MM_LANES, acc[r][rv]);
    }
}

/* Prefetches every `step`-th of `lines` cache lines `dist` bytes ahead of cur in its section
 * (into L2). */
MM_INLINE void mm_pf_lines_step(const uint8_t *cur, size_t dist, const uint8_t *end, size_t len, size_t tb,
                                int lines, int step)
{
    if (dist) {
        const uint8_t *p = mm_pf_addr(cur, dist, end, len, tb);
        for (int i = 0; i < lines; i += step)
            MM_PF(p + 64 * i);
    }
}

/* Prefetches `lines` cache lines `dist` bytes ahead of cur in its section (into L2). */
MM_INLINE void mm_pf_lines(const uint8_t *cur, size_t dist, const uint8_t *end, size_t len, size_t tb, int lines)
{
    mm_pf_lines_step(cur, dist, end, len, tb, lines, 1);
}

/* The 4- and 6-bit tiles' quantized values: mm_pf_lines, on x86 the same lines once more
 * into L2 MM_PF_L2_AGAIN times as far ahead (mm_internal.h), and MM_PF_L1_DISTANCE bytes ahead
 * into L1 too where the L2 prefetch runs at least twice as far ahead. Q8_0's tiles and the
 * scale sections prefetch into L2 once (the 512-bit one-row Q8_0 tile, the least work per
 * byte, streamed at 49-75 % of the read with the L1 prefetch against 78-94 % without). */
MM_INLINE void mm_pf_quant_lines(const uint8_t *cur, size_t dist, const uint8_t *end, size_t len, size_t tb,
                                 int lines)
{
    mm_pf_lines(cur, dist, end, len, tb, lines);
    if (MM_PF_L2_AGAIN)
        mm_pf_lines(cur, MM_PF_L2_AGAIN * dist, end, len, tb, lines);
    if (MM_PF_L1_DISTANCE && dist >= 2 * (size_t)MM_PF_L1_DISTANCE) {
        const uint8_t *p1 = mm_pf_addr(cur, MM_PF_L1_DISTANCE, end, len, tb);
        for (int i = 0; i < lines; i++)
            MM_PF_L1(p1 + 64 * i);
    }
}

/* Lines per software prefetch of a one-row Q8_0 product. One row is the least work per byte:
 * the loads themselves run far enough ahead, and a prefetch per line only costs issue slots.
 * The 512-bit paths set 2: on Zen 4 (one thread, from memory) a prefetch every other line
 * streamed 20-30 % faster there, while 2 or more rows, other types and the 256-bit paths need
 * (or do not gain from dropping) one per line. */
#ifndef MM_Q8_N1_PF_STEP
#define MM_Q8_N1_PF_STEP 1
#endif

/* Dot products of one block of 32 four-bit values (Q4_0 / Q4_K chunk format,
 * row vector rv) with every activation row: it[r] = sum u*q. */
MM_INLINE void mm_dot_u4(const uint8_t *blk, int rv, const int8_t *const *xb, mm_vi *it, const int nr)
{
#ifdef MM_DOT_U4_BLOCK
    const mm_vb v0 = MM_LOAD(blk + 4 * MM_LANES * rv), v1 = MM_LOAD(blk + 64 + 4 * MM_LANES * rv);
    const mm_vb v2 = MM_LOAD(blk + 128 + 4 * MM_LANES * rv), v3 = MM_LOAD(blk + 192 + 4 * MM_LANES * rv);
    const mm_vb l0 = MM_LO4(v0), l1 = MM_LO4(v1), l2 = MM_LO4(v2), l3 = MM_LO4(v3);
    const mm_vb h0 = MM_HI4(v0), h1 = MM_HI4(v1), h2 = MM_HI4(v2), h3 = MM_HI4(v3);
    MM_FOR_R it[r] = mm_dot_u4_block(l0, l1, l2, l3, h0, h1, h2, h3, xb[r]);
    return;
#endif
    MM_FOR_R it[r] = MM_IZERO;
    _Pragma("GCC unroll 2") for (int p = 0; p < 4; p += 2)
    {
        const mm_vb v0 = MM_LOAD(blk + 64 * p + 4 * MM_LANES * rv);
        const mm_vb v1 = MM_LOAD(blk + 64 * (p + 1) + 4 * MM_LANES * rv);
        const mm_vb l0 = MM_LO4(v0), l1 = MM_LO4(v1), h0 = MM_HI4(v0), h1 = MM_HI4(v1);
        MM_FOR_R
        {
            it[r] = MM_DOT2(it[r], l0, MM_BCAST4(xb[r] + 4 * p), l1, MM_BCAST4(xb[r] + 4 * p + 4));
            it[r] = MM_DOT2(it[r], h0, MM_BCAST4(xb[r] + 16 + 4 * p), h1, MM_BCAST4(xb[r] + 20 + 4 * p));
        }
    }
}

MM_INLINE void mm_g_q4_0(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, const int r0, const int nr)
{
    const int64_t nb = a->nb;
    const size_t mlen = mm_round64(32 * (size_t)nb), qlen = 256 * (size_t)nb;
    const uint8_t *meta = tile, *q = tile + mlen;
    const size_t pfd = (size_t)mk_mm_pf_distance;
    mm_vf acc[MK_MM_MAX_NR][MM_RV];
    MM_FOR_R
    {
        MM_FOR_RV acc[r][rv] = MM_FZERO;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + 256 * b;
        mm_pf_quant_lines(qb, pfd, q + qlen, qlen, tb, 4);
        if ((b & 1) == 0)
            mm_pf_lines(meta + 32 * b, pfd / 8, meta + mlen, mlen, tb, 1);
        const int8_t *xb[MK_MM_MAX_NR];
        MM_FOR_R xb[r] = a->q + (r0 + r) * a->K + 32 * b;
        MM_FOR_RV
        {
            const mm_vf dw = MM_FLOADH(meta + 32 * b + 2 * MM_LANES * rv);
            mm_vi it[MK_MM_MAX_NR];
            mm_dot_u4(qb, rv, xb, it, nr);
            MM_FOR_R
            {
                const int32_t *s = a->s + 2 * ((r0 + r) * nb + b);
                const mm_vf c = MM_FCVT(MM_ISUB(it[r], 8 * (s[0] + s[1])));
                acc[r][rv] = MM_FFMA(c, MM_FMUL(dw, MM_FSET1(a->d[(r0 + r) * nb + b])), acc[r][rv]);
            }
        }
    }
    mm_store_acc(out + r0 * MM_TILE, acc, nr);
}

MM_INLINE void mm_g_q8_0(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, const int r0, const int nr)
{
    const int64_t nb = a->nb;
    const size_t mlen = mm_round64(32 * (size_t)nb), qlen = 512 * (size_t)nb;
    const uint8_t *meta = tile, *q = tile + mlen;
    const size_t pfd = (size_t)mk_mm_pf_distance;
    mm_vf acc[MK_MM_MAX_NR][MM_RV];
    MM_FOR_R
    {
        MM_FOR_RV acc[r][rv] = MM_FZERO;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + 512 * b;
        mm_pf_lines_step(qb, pfd, q + qlen, qlen, tb, 8, nr == 1 ? MM_Q8_N1_PF_STEP : 1);
        if ((b & 1) == 0)
            mm_pf_lines(meta + 32 * b, pfd / 16, meta + mlen, mlen, tb, 1);
        const int8_t *xb[MK_MM_MAX_NR];
        MM_FOR_R xb[r] = a->q + (r0 + r) * a->K + 32 * b;
        MM_FOR_RV
        {
            const mm_vf dw = MM_FLOADH(meta + 32 * b + 2 * MM_LANES * rv);
            mm_vi it[MK_MM_MAX_NR];
            MM_FOR_R it[r] = MM_IZERO;
            _Pragma("GCC unroll 4") for (int g = 0; g < 8; g += 2)
            {
                const mm_vb w0 = MM_Q8_PREP(MM_LOAD(qb + 64 * g + 4 * MM_LANES * rv));
                const mm_vb w1 = MM_Q8_PREP(MM_LOAD(qb + 64 * (g + 1) + 4 * MM_LANES * rv));
                MM_FOR_R
                {
                    it[r] = MM_Q8_DOT(it[r], w0, MM_BCAST4(xb[r] + 4 * g));
                    it[r] = MM_Q8_DOT(it[r], w1, MM_BCAST4(xb[r] + 4 * g + 4));
                }
            }
            MM_FOR_R
            {
                mm_vi c = it[r];
                if (MM_Q8_OFS) {
                    const int32_t *s = a->s + 2 * ((r0 + r) * nb + b);
                    c = MM_ISUB(c, MM_Q8_OFS * (s[0] + s[1]));
                }
                acc[r][rv] = MM_FFMA(MM_FCVT(c), MM_FMUL(dw, MM_FSET1(a->d[(r0 + r) * nb + b])), acc[r][rv]);
            }
        }
    }
    mm_store_acc(out + r0 * MM_TILE, acc, nr);
}

MM_INLINE void mm_g_q4_k(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, const int r0, const int nr)
{
    const int64_t nb = a->nb, ns = nb / 8;
    const size_t mlen = mm_round64(320 * (size_t)ns), qlen = 2048 * (size_t)ns;
    const uint8_t *q = tile + mlen;
    const size_t pfd = (size_t)mk_mm_pf_distance;
    mm_vf acc[MK_MM_MAX_NR][MM_RV];
    MM_FOR_R
    {
        MM_FOR_RV acc[r][rv] = MM_FZERO;
    }
    for (int64_t sb = 0; sb < ns; sb++) {
        const uint8_t *meta = tile + 320 * sb;
        mm_pf_lines(meta, pfd / 6, tile + mlen, mlen, tb, 5);
        mm_vf dv[MM_RV], dmv[MM_RV];
        MM_FOR_RV
        {
            dv[rv] = MM_FLOADH(meta + 2 * MM_LANES * rv);
            dmv[rv] = MM_FLOADH(meta + 32 + 2 * MM_LANES * rv);
        }
        for (int j = 0; j < 8; j++) {
            const int64_t b = 8 * sb + j;
            const uint8_t *qb = q + 2048 * sb + 256 * j;
            mm_pf_quant_lines(qb, pfd, q + qlen, qlen, tb, 4);
            const int8_t *xb[MK_MM_MAX_NR];
            MM_FOR_R xb[r] = a->q + (r0 + r) * a->K + 32 * b;
            MM_FOR_RV
            {
                const mm_vf S = MM_FMUL(dv[rv], MM_FLOADU8(meta + 64 + 16 * j + MM_LANES * rv));
                const mm_vf M = MM_FMUL(dmv[rv], MM_FLOADU8(meta + 192 + 16 * j + MM_LANES * rv));
                mm_vi it[MK_MM_MAX_NR];
                mm_dot_u4(qb, rv, xb, it, nr);
                MM_FOR_R
                {
                    const mm_vf t = MM_FMUL(MM_FCVT(it[r]), S);
                    const mm_vf u = MM_FFMA(t, MM_FSET1(a->d[(r0 + r) * nb + b]), acc[r][rv]);
                    acc[r][rv] = MM_FNMA(M, MM_FSET1(a->ds[(r0 + r) * nb + b]), u);
                }
            }
        }
    }
    mm_store_acc(out + r0 * MM_TILE, acc, nr);
}

MM_INLINE void mm_g_q6_k(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out, const int r0, const int nr)
{
    const int64_t nb = a->nb, ns = nb / 8;
    const size_t mlen = mm_round64(320 * (size_t)ns), qlen = 3072 * (size_t)ns;
    const uint8_t *q = tile + mlen;
    const size_t pfd = (size_t)mk_mm_pf_distance;
    mm_vf acc[MK_MM_MAX_NR][MM_RV];
    MM_FOR_R
    {
        MM_FOR_RV acc[r][rv] = MM_FZERO;
    }
    for (int64_t sb = 0; sb < ns; sb++) {
        const uint8_t *meta = tile + 320 * sb;
        mm_pf_lines(meta, pfd / 9, tile + mlen, mlen, tb, 5);
        mm_vf dv[MM_RV];
        MM_FOR_RV dv[rv] = MM_FLOADH(meta + 2 * MM_LANES * rv);
        for (int j = 0; j < 8; j++) {
            const int64_t b = 8 * sb + j;
            const uint8_t *ql = q + 3072 * sb + 384 * j, *qh = ql + 256;
            mm_pf_quant_lines(ql, pfd, q + qlen, qlen, tb, 6);
            const int8_t *xb[MK_MM_MAX_NR];
            MM_FOR_R xb[r] = a->q + (r0 + r) * a->K + 32 * b;
            MM_FOR_RV
            {
                const mm_vf S_lo = MM_FMUL(dv[rv], MM_FLOADS8(meta + 32 + 16 * (2 * j) + MM_LANES * rv));
                const mm_vf S_hi = MM_FMUL(dv[rv], MM_FLOADS8(meta + 32 + 16 * (2 * j + 1) + MM_LANES * rv));
                const mm_vb hv0 = MM_LOAD(qh + 4 * MM_LANES * rv), hv1 = MM_LOAD(qh + 64 + 4 * MM_LANES * rv);
                mm_vi il[MK_MM_MAX_NR], ih[MK_MM_MAX_NR];
                MM_FOR_R il[r] = ih[r] = MM_IZERO;
                _Pragma("GCC unroll 2") for (int p = 0; p < 4; p += 2)
                {
                    const mm_vb v0 = MM_LOAD(ql + 64 * p + 4 * MM_LANES * rv);
                    const mm_vb v1 = MM_LOAD(ql + 64 * (p + 1) + 4 * MM_LANES * rv);
                    const mm_vb ul0 = MM_OR(MM_LO4(v0), MM_H6(hv0, p)), ul1 = MM_OR(MM_LO4(v1), MM_H6(hv0, p + 1));
                    const mm_vb uh0 = MM_OR(MM_HI4(v0), MM_H6(hv1, p)), uh1 = MM_OR(MM_HI4(v1), MM_H6(hv1, p + 1));
                    MM_FOR_R
                    {
                        il[r] = MM_DOT2(il[r], ul0, MM_BCAST4(xb[r] + 4 * p), ul1, MM_BCAST4(xb[r] + 4 * p + 4));
                        ih[r] = MM_DOT2(ih[r], uh0, MM_BCAST4(xb[r] + 16 + 4 * p), uh1,
                                        MM_BCAST4(xb[r] + 20 + 4 * p));
                    }
                }
                MM_FOR_R
                {
                    const int32_t *s = a->s + 2 * ((r0 + r) * nb + b);
                    const mm_vf lo = MM_FCVT(MM_ISUB(il[r], 32 * s[0]));
                    const mm_vf hi = MM_FCVT(MM_ISUB(ih[r], 32 * s[1]));
                    const mm_vf t = MM_FFMA(lo, S_lo, MM_FMUL(hi, S_hi));
                    acc[r][rv] = MM_FFMA(t, MM_FSET1(a->d[(r0 + r) * nb + b]), acc[r][rv]);
                }
            }
        }
    }
    mm_store_acc(out + r0 * MM_TILE, acc, nr);
}

/* Activation rows are computed MM_GROUP at a time, each group in one pass over
 * the tile (later passes find it in L2): the accumulators of a group (group x
 * MM_RV vectors) must stay in registers across blocks. */
#define MM_SIMD_NR(T, N)                                                                                     \
    static void mm_##T##_n##N(const uint8_t *tile, size_t tb, const struct mm_act *a, float *out)            \
    {                                                                                                        \
        _Pragma("GCC unroll 8") for (int r0 = 0; r0 < (N); r0 += MM_GROUP)                                  \
        {                                                                                                    \
            mm_g_##T(tile, tb, a, out, r0, (N) - r0 < MM_GROUP ? (N) - r0 : MM_GROUP);                       \
        }                                                                                                    \
    }
#define MM_SIMD_TYPE(T)                                                                                      \
    MM_SIMD_NR(T, 1)                                                                                         \
    MM_SIMD_NR(T, 2)                                                                                         \
    MM_SIMD_NR(T, 3)                                                                                         \
    MM_SIMD_NR(T, 4)                                                                                         \
    MM_SIMD_NR(T, 5) MM_SIMD_NR(T, 6) MM_SIMD_NR(T, 7) MM_SIMD_NR(T, 8)
MM_SIMD_TYPE(q4_0)
MM_SIMD_TYPE(q8_0)
MM_SIMD_TYPE(q4_k)
MM_SIMD_TYPE(q6_k)
#define MM_ROW(T) {mm_##T##_n1, mm_##T##_n2, mm_##T##_n3, mm_##T##_n4, mm_##T##_n5, mm_##T##_n6, mm_##T##_n7, mm_##T##_n8}
static const mm_tile_fn mm_tile_fns[4][MK_MM_MAX_NR] = {MM_ROW(q4_0), MM_ROW(q8_0), MM_ROW(q4_k), MM_ROW(q6_k)};
