/*
 * mistrald_kernels.h - native attention kernels of mistrald (public C11 interface).
 *
 * Grouped-query, sliding-window, causal attention for one layer, reading the
 * keys and values of the past directly from the rolling (ring) KV cache in
 * F32, F16 or Q8_0, dequantizing on the fly. Each cached K/V row is read once
 * per group of query heads that share it (GQA), and the softmax is computed
 * online in one pass (running max, running sum, rescaled accumulator).
 *
 * Paths: scalar C (always built, the reference), AVX2+FMA+F16C and AVX-512
 * (x86-64), NEON and NEON with the dot-product extension (aarch64). The path
 * used by mk_attention() is chosen once at run time from the CPU's features
 * (or set with mk_set_path()), so one binary runs on any CPU of its
 * architecture.
 *
 * Rust bindings: build.rs runs bindgen on this header at build time and writes
 * them to $OUT_DIR/mk_bindings.rs, which src/kernels/ffi.rs includes. Nothing
 * generated is committed; changing this header regenerates them on the next
 * cargo build.
 */
#ifndef MISTRALD_KERNELS_H
#define MISTRALD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Largest supported head dimension (stack buffers are sized for it). */
#define MK_MAX_HEAD_DIM 256

/* Element format of the K/V cache. Values equal ggml's enum ggml_type. */
enum mk_kv_type { MK_KV_F32 = 0, MK_KV_F16 = 1, MK_KV_Q8_0 = 8 };

/* Q8_0 block, same layout as ggml's block_q8_0 (34 bytes, no padding):
 * value i = half_to_float(d) * qs[i]. */
struct mk_block_q8_0 {
    uint16_t d;     /* IEEE 754 binary16 scale */
    int8_t qs[32];
};

/* Kernel implementations ("paths"). */
enum mk_path {
    MK_PATH_SCALAR = 0,
    MK_PATH_AVX2 = 1,
    MK_PATH_AVX512 = 2,
    MK_PATH_NEON = 3,
};

struct mk_attn_params {
    int32_t head_dim;      /* multiple of 32, at most MK_MAX_HEAD_DIM (64, 128) */
    int32_t n_head;        /* query heads */
    int32_t n_head_kv;     /* key/value heads; n_head % n_head_kv == 0; query head h uses kv head h / (n_head/n_head_kv) */
    int32_t window;        /* query at position i sees keys j with i - window < j <= i; 0 = unlimited (full causal) */
    int32_t kv_type;       /* enum mk_kv_type of the cache */
    int32_t n_slots;       /* ring size of the cache: position j lives in slot j % n_slots */
    const void *k_cache;   /* slot s, kv head h starts at k_cache + s*slot_bytes + h*head_bytes */
    const void *v_cache;   /* same layout as k_cache */
    size_t slot_bytes;     /* bytes between consecutive slots */
    size_t head_bytes;     /* bytes between kv heads within a slot (row of head_dim elements of kv_type) */
    int64_t pos0;          /* absolute position of the first query (>= n_hist) */
    int64_t n_hist;        /* cached history = positions [pos0 - n_hist, pos0), all present in the ring (n_hist <= n_slots) */
    int32_t n_q;           /* number of query positions: pos0 .. pos0+n_q-1 (1 for decode, a prefill chunk otherwise) */
    const float *q;        /* [n_q][n_head][head_dim], contiguous f32 (already RoPE'd) */
    const float *k_new;    /* [n_q][n_head_kv][head_dim] f32: keys of the query positions themselves (not yet in the cache) */
    const float *v_new;    /* [n_q][n_head_kv][head_dim] f32 */
    float scale;           /* usually 1/sqrt(head_dim) */
    float *out;            /* [n_q][n_head][head_dim] f32 */
    /* Optional scratch memory for splitting one (query, kv head) unit's key
     * range across threads when there are fewer units than threads. NULL (or
     * scratch_bytes < mk_scratch_size(p, nth)) disables the split; the result
     * is the same, only fewer threads work. When used it must be 64-byte
     * aligned and zero-filled once when allocated: the kernel leaves it zeroed
     * again after every complete call, so it can be reused for later calls
     * (not for two calls running at the same time). */
    void *scratch;
    size_t scratch_bytes;
};

/* Computes the part of the output owned by thread ith of nth (0 <= ith < nth);
 * calling it for every ith in [0,nth) (in any order / in parallel) computes
 * the whole output. No allocation; about 40 KiB of stack (56 KiB on the NEON
 * dot-product path). Query heads of a group are processed together up to 16
 * at a time (each cached K/V row is read once per 16 heads of its group), and
 * the key range is walked position by position for all kv heads together, so
 * a slot-major ring is read in address order. Dispatches to the path chosen at run time (the best one
 * the CPU supports, unless mk_set_path() chose another). */
void mk_attention(const struct mk_attn_params *p, int ith, int nth);

/* Bytes of scratch that let mk_attention split the key range across nth
 * threads; 0 when there are at least nth units of work anyway. */
size_t mk_scratch_size(const struct mk_attn_params *p, int nth);

/* 1 if the path is compiled into this build and the CPU (and OS) support it, else 0. */
int mk_path_available(enum mk_path path);

/* Path that mk_attention() currently uses. */
enum mk_path mk_current_path(void);

/* Makes mk_attention() use the path; returns 0, or -1 (and changes nothing)
 * if the path is not available. Call it before any mk_attention() call runs. */
int mk_set_path(enum mk_path path);

/* 1 if the NEON path uses the dot-product extension (aarch64 with
 * HWCAP_ASIMDDP), else 0. */
int mk_neon_has_dotprod(void);

/* Explicit paths, same contract as mk_attention(). Only call a path that
 * mk_path_available() reports; they are compiled only on their architecture. */
void mk_attention_scalar(const struct mk_attn_params *p, int ith, int nth);
#if defined(__x86_64__) || defined(_M_X64)
void mk_attention_avx2(const struct mk_attn_params *p, int ith, int nth);
void mk_attention_avx512(const struct mk_attn_params *p, int ith, int nth);
#endif
#if defined(__aarch64__)
/* NEON without the dot-product extension (plain ARMv8.0 NEON). */
void mk_attention_neon_plain(const struct mk_attn_params *p, int ith, int nth);
/* NEON with the dot-product extension (Q8_0 keys scored with SDOT against
 * the query quantized to Q8_0 blocks, like ggml's q8_0 x q8_0 dot product). */
void mk_attention_neon_dotprod(const struct mk_attn_params *p, int ith, int nth);
/* mk_attention_neon_dotprod if the CPU has dotprod, else mk_attention_neon_plain. */
void mk_attention_neon(const struct mk_attn_params *p, int ith, int nth);
#endif

#ifdef __cplusplus
}
#endif

#endif /* MISTRALD_KERNELS_H */
