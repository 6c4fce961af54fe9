/* mm_avx2.c - matrix products, AVX2 + FMA + F16C (vpmaddubsw).
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 256
#define MM_VNNI 0
#include "mm_x86.h"

#define MM_ENTRY mk_matmul_avx2
#define MM_QPART mm_qpart_avx2
#include "mm_driver.h"
