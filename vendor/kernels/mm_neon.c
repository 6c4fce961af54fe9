/* mm_neon.c - matrix products, aarch64 NEON (ARMv8.0: smull + pairwise adds).
 * The code is in mm_neon.h / mm_simd.h / mm_driver.h. */
#define MM_DOTPROD 0
#include "mm_neon.h"

#define MM_ENTRY mk_matmul_neon
#define MM_QPART mm_qpart_neon
#include "mm_driver.h"
