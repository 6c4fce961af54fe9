/* attn_neon.c - aarch64 NEON path (ARMv8.0, every aarch64 CPU). */
#include "attn_neon_common.h"

#define mk_kscore_t mk_kscore_f_t
MK_TYPE_DISPATCH

#define MK_ENTRY mk_attention_neon_plain
#define MK_QUANT_Q 0
#include "attn_driver.h"
