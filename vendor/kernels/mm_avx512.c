/* mm_avx512.c - matrix products, AVX-512 F/BW/VL (vpmaddubsw).
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 512
#define MM_VNNI 0
#include "mm_x86.h"

#define MM_ENTRY mk_matmul_avx512
#define MM_QPART mm_qpart_avx512
#include "mm_driver.h"
