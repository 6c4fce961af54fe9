/* mm_neon_dotprod.c - matrix products, aarch64 NEON with the dot-product
 * extension (ARMv8.2 SDOT); compiled with -march=armv8.2-a+dotprod.
 * The code is in mm_neon.h / mm_simd.h / mm_driver.h. */
#define MM_DOTPROD 1
#include "mm_neon.h"

#define MM_ENTRY mk_matmul_neon_dotprod
#define MM_QPART mm_qpart_neon_dotprod
#include "mm_driver.h"
