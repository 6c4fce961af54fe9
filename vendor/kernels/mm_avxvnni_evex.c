/* mm_avxvnni_evex.c - test twin of mm_avxvnni.c: the same code with vpdpbusd's EVEX encoding (AVX512_VNNI + VL), so the AVX-VNNI algorithm runs on AVX-512 VNNI CPUs.
 * Everything is in mm_x86.h / mm_simd.h / mm_driver.h; this file picks the
 * vector width and the product instruction, and build.rs compiles it with
 * exactly the flags that path needs. */
#define MM_WIDTH 256
#define MM_VNNI 2
#include "mm_x86.h"

#define MM_ENTRY mk_matmul_avxvnni_evex
#define MM_QPART mm_qpart_avxvnni_evex
#include "mm_driver.h"
