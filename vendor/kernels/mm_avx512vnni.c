/* mm_avx512vnni.c - matrix products, AVX-512 F/BW/VL + AVX512_VNNI (512-bit vpdpbusd).
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 512
#define MM_VNNI 1
#include "mm_x86.h"

#define MM_ENTRY mm_matmul_avx512vnni_wide
#define MM_QPART mm_qpart_avx512vnni
#include "mm_driver.h"

/* One-row products of Q4_0, Q4_K and Q6_K go to the 256-bit tiles (the
 * AVX-VNNI code in EVEX encoding: the same arithmetic, so the same results)
 * where mk_mm_narrow_one_row() says so; everything else to the 512-bit tiles. */
int mk_matmul_avx512vnni(const struct mk_mm_params *p, int ith, int nth)
{
    if (p && p->nr == 1 && p->wtype != MK_W_Q8_0 && mk_mm_narrow_one_row())
        return mk_matmul_avxvnni_evex(p, ith, nth);
    return mm_matmul_avx512vnni_wide(p, ith, nth);
}
