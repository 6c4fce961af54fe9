/* cpu_features.c - run-time path selection for mk_attention() and mk_matmul().
 *
 * x86-64: CPUID for AVX2/FMA/F16C, AVX-512 F/BW/VL/DQ, AVX512_VNNI and
 * AVX-VNNI, plus XGETBV to check that the OS saves the YMM (and, for AVX-512,
 * opmask/ZMM) register state.
 * aarch64: getauxval(AT_HWCAP) for ASIMD and ASIMDDP (dot product).
 * Built without target flags, like the scalar path. */
#include <stdatomic.h>

#include "mk_internal.h"
#include "mm_internal.h"

#if defined(__x86_64__)
#include <cpuid.h>

static unsigned long long mk_xgetbv0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* bit 0: AVX2+FMA+F16C usable, bit 1: AVX-512 F/BW/VL/DQ usable, bit 2: and
 * AVX512_VNNI, bit 3: AVX2 usable and AVX-VNNI (VEX-encoded vpdpbusd) */
static int mk_x86_features(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return 0;
    const unsigned long long xcr0 = mk_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) /* XMM and YMM state */
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned int max_sub7 = a;
    const int avx512vnni = (c >> 11) & 1;
    const int avx2 = (b >> 5) & 1;
    const int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    int f = 0;
    if (avx2 && fma && f16c)
        f |= 1;
    if ((f & 1) && avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xe0) == 0xe0) /* opmask, ZMM_Hi256, Hi16_ZMM */
        f |= 2;
    if ((f & 2) && avx512vnni)
        f |= 4;
    if ((f & 1) && max_sub7 >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 4) & 1) /* AVX-VNNI */
            f |= 8;
    }
    return f;
}
#endif

#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

int mk_neon_has_dotprod(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}

void mk_attention_neon(const struct mk_attn_params *p, int ith, int nth)
{
    static atomic_int dot = -1;
    int v = atomic_load_explicit(&dot, memory_order_relaxed);
    if (v < 0) {
        v = mk_neon_has_dotprod();
        atomic_store_explicit(&dot, v, memory_order_relaxed);
    }
    if (v)
        mk_attention_neon_dotprod(p, ith, nth);
    else
        mk_attention_neon_plain(p, ith, nth);
}
#else
int mk_neon_has_dotprod(void)
{
    return 0;
}
#endif

int mk_path_available(enum mk_path path)
{
    switch (path) {
    case MK_PATH_SCALAR:
        return 1;
#if defined(__x86_64__)
    case MK_PATH_AVX2:
        return (mk_x86_features() & 1) != 0;
    case MK_PATH_AVX512:
        return (mk_x86_features() & 2) != 0;
#endif
#if defined(__aarch64__)
    case MK_PATH_NEON:
        return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#endif
    default:
        return 0;
    }
}

typedef void (*mk_attn_fn)(const struct mk_attn_params *, int, int);

static mk_attn_fn mk_path_fn(enum mk_path path)
{
    switch (path) {
#if defined(__x86_64__)
    case MK_PATH_AVX2:
        return mk_attention_avx2;
    case MK_PATH_AVX512:
        return mk_attention_avx512;
#endif
#if defined(__aarch64__)
    case MK_PATH_NEON:
        return mk_attention_neon;
#endif
    default:
        return mk_attention_scalar;
    }
}

static enum mk_path mk_best_path(void)
{
    if (mk_path_available(MK_PATH_AVX512))
        return MK_PATH_AVX512;
    if (mk_path_available(MK_PATH_AVX2))
        return MK_PATH_AVX2;
    if (mk_path_available(MK_PATH_NEON))
        return MK_PATH_NEON;
    return MK_PATH_SCALAR;
}

/* -1: not chosen yet; else the enum mk_path in use. */
static atomic_int mk_chosen = -1;

enum mk_path mk_current_path(void)
{
    int v = atomic_load_explicit(&mk_chosen, memory_order_acquire);
    if (v < 0) {
        int best = (int)mk_best_path();
        int expected = -1;
        /* keep a path another thread set meanwhile */
        if (!atomic_compare_exchange_strong_explicit(&mk_chosen, &expected, best, memory_order_acq_rel,
                                                     memory_order_acquire))
            return (enum mk_path)expected;
        v = best;
    }
    return (enum mk_path)v;
}

int mk_set_path(enum mk_path path)
{
    if (!mk_path_available(path))
        return -1;
    atomic_store_explicit(&mk_chosen, (int)path, memory_order_release);
    return 0;
}

void mk_attention(const struct mk_attn_params *p, int ith, int nth)
{
    mk_path_fn(mk_current_path())(p, ith, nth);
}

size_t mk_scratch_size(const struct mk_attn_params *p, int nth)
{
    struct mk_plan pl;
    if (p->n_head_kv <= 0 || p->n_head <= 0 || nth <= 0)
        return 0;
    mk_make_plan(p, nth, 1, &pl);
    return mk_plan_scratch_bytes(p, &pl);
}

/* ---- matrix products ---- */

/* Software prefetch distance of the matrix kernels (bytes). */
int mk_mm_pf_distance = 8192;

void mk_mm_set_prefetch(int bytes)
{
    mk_mm_pf_distance = bytes < 0 ? 0 : bytes > (1 << 20) ? (1 << 20) : bytes;
}

int mk_mm_get_prefetch(void)
{
    return mk_mm_pf_distance;
}

int mk_mm_path_available(enum mk_mm_path path)
{
    switch (path) {
    case MK_MM_SCALAR:
        return 1;
#if defined(__x86_64__)
    case MK_MM_AVX2:
        return (mk_x86_features() & 1) != 0;
    case MK_MM_AVXVNNI:
        return (mk_x86_features() & 8) != 0;
    case MK_MM_AVX512:
        return (mk_x86_features() & 2) != 0;
    case MK_MM_AVX512VNNI:
        return (mk_x86_features() & 4) != 0;
#endif
#if defined(__aarch64__)
    case MK_MM_NEON:
        return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
    case MK_MM_NEON_DOTPROD:
        return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0 && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    default:
        return 0;
    }
}

typedef int (*mk_mm_fn)(const struct mk_mm_params *, int, int);

static mk_mm_fn mk_mm_path_fn(enum mk_mm_path path)
{
    switch (path) {
#if defined(__x86_64__)
    case MK_MM_AVX2:
        return mk_matmul_avx2;
    case MK_MM_AVXVNNI:
        return mk_matmul_avxvnni;
    case MK_MM_AVX512:
        return mk_matmul_avx512;
    case MK_MM_AVX512VNNI:
        return mk_matmul_avx512vnni;
#endif
#if defined(__aarch64__)
    case MK_MM_NEON:
        return mk_matmul_neon;
    case MK_MM_NEON_DOTPROD:
        return mk_matmul_neon_dotprod;
#endif
    default:
        return mk_matmul_scalar;
    }
}

static enum mk_mm_path mk_mm_best_path(void)
{
    static const enum mk_mm_path order[] = {MK_MM_AVX512VNNI, MK_MM_AVX512, MK_MM_AVXVNNI, MK_MM_AVX2,
                                            MK_MM_NEON_DOTPROD, MK_MM_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (mk_mm_path_available(order[i]))
            return order[i];
    return MK_MM_SCALAR;
}

/* -1: not chosen yet; else the enum mk_mm_path in use. */
static atomic_int mk_mm_chosen = -1;

enum mk_mm_path mk_mm_current_path(void)
{
    int v = atomic_load_explicit(&mk_mm_chosen, memory_order_acquire);
    if (v < 0) {
        int best = (int)mk_mm_best_path();
        int expected = -1;
        if (!atomic_compare_exchange_strong_explicit(&mk_mm_chosen, &expected, best, memory_order_acq_rel,
                                                     memory_order_acquire))
            return (enum mk_mm_path)expected;
        v = best;
    }
    return (enum mk_mm_path)v;
}

int mk_mm_set_path(enum mk_mm_path path)
{
    if (!mk_mm_path_available(path))
        return -1;
    atomic_store_explicit(&mk_mm_chosen, (int)path, memory_order_release);
    return 0;
}

/* AMD Zen 4: vendor AuthenticAMD, CPUID family 19h (base 0Fh + extended
 * 0Ah), with the AVX-512 VNNI path (Zen 3 has the family but no AVX-512). */
static int mk_is_zen4(void)
{
#if defined(__x86_64__)
    unsigned int a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d))
        return 0;
    /* "AuthenticAMD" in EBX, EDX, ECX */
    if (b != 0x68747541u || d != 0x69746e65u || c != 0x444d4163u)
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    unsigned int family = (a >> 8) & 0xf;
    if (family == 0xf)
        family += (a >> 20) & 0xff;
    return family == 0x19 && (mk_x86_features() & 4) != 0;
#else
    return 0;
#endif
}

/* -1: not decided yet; else 0 or 1. */
static atomic_int mk_mm_narrow = -1;

int mk_mm_narrow_one_row(void)
{
    int v = atomic_load_explicit(&mk_mm_narrow, memory_order_relaxed);
    if (v < 0) {
        v = mk_is_zen4();
        int expected = -1;
        if (!atomic_compare_exchange_strong_explicit(&mk_mm_narrow, &expected, v, memory_order_relaxed,
                                                     memory_order_relaxed))
            v = expected;
    }
    return v;
}

int mk_mm_narrow_one_row_default(void)
{
    return mk_is_zen4();
}

void mk_mm_set_narrow_one_row(int on)
{
    atomic_store_explicit(&mk_mm_narrow, on ? 1 : 0, memory_order_relaxed);
}

int mk_matmul(const struct mk_mm_params *p, int ith, int nth)
{
    return mk_mm_path_fn(mk_mm_current_path())(p, ith, nth);
}

static mm_qpart_fn mk_mm_qpart_fn(enum mk_mm_path path)
{
    switch (path) {
#if defined(__x86_64__)
    case MK_MM_AVX2:
        return mm_qpart_avx2;
    case MK_MM_AVXVNNI:
        return mm_qpart_avxvnni;
    case MK_MM_AVX512:
        return mm_qpart_avx512;
    case MK_MM_AVX512VNNI:
        return mm_qpart_avx512vnni;
#endif
#if defined(__aarch64__)
    case MK_MM_NEON:
        return mm_qpart_neon;
    case MK_MM_NEON_DOTPROD:
        return mm_qpart_neon_dotprod;
#endif
    default:
        return mm_qpart_scalar;
    }
}

int mk_mm_quantize_part(const float *x, int64_t x_stride, int nr, int64_t n_cols, void *xq, int ith, int nth)
{
    if (!x || !xq || mk_mm_act_size(n_cols, nr) == 0 || x_stride < n_cols || nth <= 0 || ith < 0 || ith >= nth)
        return -1;
    mk_mm_qpart_fn(mk_mm_current_path())(x, x_stride, nr, n_cols, xq, ith, nth);
    return 0;
}
