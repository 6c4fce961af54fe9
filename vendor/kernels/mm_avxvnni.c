/* mm_avxvnni.c - matrix products, AVX2 + AVX-VNNI (256-bit vpdpbusd, VEX encoding).
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 256
#define MM_VNNI 1
#include "mm_x86.h"

#define MM_ENTRY mk_matmul_avxvnni
#define MM_QPART mm_qpart_avxvnni
#include "mm_driver.h"
