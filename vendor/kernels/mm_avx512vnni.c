/* mm_avx512vnni.c - matrix products, AVX-512 F/BW/VL + AVX512_VNNI (512-bit vpdpbusd).
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 512
#define MM_VNNI 1
#include "mm_x86.h"

#define MM_ENTRY mk_matmul_avx512vnni
#define MM_QPART mm_qpart_avx512vnni
#include "mm_driver.h"
