/*
 * mistrald_kernels.h - native kernels of mistrald (public C11 interface):
 * attention over the rolling KV cache (mk_attention, below) and quantized
 * matrix-vector products (mk_matmul, further down).
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


/* ======================================================================== *
 * Quantized matrix-vector products                                         *
 * ======================================================================== *
 *
 * y[r][n] = sum_k W[n][k] * x[r][k]   for r < nr (1..MK_MM_MAX_BATCH activation
 * rows), n < n_rows (output features), k < n_cols, x and y f32, W a GGUF
 * weight matrix (ggml's layout: row n is n_cols / block-size blocks of wtype)
 * converted once by mk_mm_pack() into mistrald's packed layout (below).
 *
 * Arithmetic (every path, bit for bit the same integers): each activation row
 * is quantized per block of 32 values to int8 with an f32 scale,
 *   d = amax / 127,  q[i] = round-half-to-even(x[i] * (127 / amax))
 * (amax = max |x[i]| of the block; a block with amax < 1e-30 or not a number
 * becomes all zeros), |q| <= 127. The integer values of the weights are
 * multiplied with q exactly in 32-bit integers per block (Q6_K: per half
 * block of 16), and the block sums are scaled and added in f32:
 *   Q4_0: y += dw*dx * sum (u-8)*q        (u = the 4-bit value, dw its f16 scale)
 *   Q8_0: y += dw*dx * sum w*q
 *   Q4_K: y += dx*(d*sc*sum u*q) - dmin*m*(dx*sum q)   per sub-block of 32
 *   Q6_K: y += dx*(d*sc_lo*sum_lo (u-32)*q + d*sc_hi*sum_hi (u-32)*q)
 * so results differ from the exact product by the activation rounding
 * (|x - dx*q| <= dx/2 = amax/254 per element) plus f32 rounding; paths differ
 * from each other only in f32 rounding (FMA or not).
 *
 * Packed layout ("tiles"): output rows are grouped 16 to a tile (the last tile
 * is padded with zero rows); tile t holds rows 16t .. 16t+15 and starts at
 * byte t * mk_mm_tile_bytes(wtype, n_cols), so a thread's contiguous range of
 * rows is one contiguous range of memory, read in address order. A tile is a
 * "meta" section (scales) followed by a "quant" section, both multiples of 64
 * bytes. In the quant section the 16 rows are interleaved 4 bytes at a time:
 * a 64-byte "k-group" holds row i's four values k..k+3 at bytes 4i..4i+3, so
 * one vector of 4-byte lanes holds 4 (NEON), 8 (AVX2) or 16 (AVX-512) rows,
 * multiplied with 4 activation bytes broadcast to every lane (VNNI vpdpbusd,
 * SDOT) and summed without any horizontal reduction. Per 32-value block
 * ("nb" = n_cols/32 blocks, "ns" = n_cols/256 super-blocks):
 *   Q4_0  meta: nb x 16 f16 scales (block b, row i at byte 2*(16b+i)), padded
 *         to 64; quant: nb x 256 bytes, four 64-byte chunks p = 0..3: byte
 *         4i+j = u[i][4p+j] | u[i][16+4p+j] << 4 (u = GGUF nibble, 0..15).
 *   Q8_0  meta as Q4_0; quant: nb x 512 bytes, k-group g = 0..7 at 64g:
 *         byte 4i+j = w[i][4g+j] (int8).
 *   Q4_K  per super-block s: meta 320 bytes: d[16] f16, dmin[16] f16, then
 *         sc[8][16] u8 (sub-block j, row i at 64+16j+i), m[8][16] u8 (at
 *         192+16j+i) (the 6-bit scales and mins unpacked); quant 2048 bytes:
 *         sub-block j (32 values) at 256j in Q4_0's chunk format.
 *   Q6_K  per super-block s: meta 320 bytes: d[16] f16, sc[16][16] int8 (scale
 *         of 16 values i16, row i at 32+16*i16+i), 32 zero bytes; quant 3072
 *         bytes: block j of 32 values at 384j: 256 bytes of the low 4 bits in
 *         Q4_0's chunk format, then two 64-byte chunks h = 0..1 of the high 2
 *         bits: byte 4i+j, bits 2c..2c+1 = u[i][16h+4c+j] >> 4 (u = 0..63).
 * Sizes equal GGUF's per row (Q4_0 18 bytes per 32, Q8_0 34, Q4_K 148 per
 * 256 (GGUF 144), Q6_K 212 (GGUF 210)) plus the zero rows of the last tile.
 *
 * Batches: rows are computed MK_MM_MAX_NR (8) at a time; for each tile every
 * chunk of 8 rows is computed while the tile is in the CPU's caches, so the
 * weights are read from memory once per call whatever the batch (decode: 1
 * row; small batches of continuous batching; prefill chunks).
 *
 * Threading: mk_matmul(p, ith, nth) computes thread ith's share, a contiguous
 * range of tiles (tiles * ith / nth .. tiles * (ith+1) / nth), prefetching the
 * weights mk_mm_get_prefetch() bytes ahead in address order (into the next
 * tile at a tile's end). There is no synchronisation between threads: unless
 * the caller passes activations already quantized (xq: mk_mm_quantize, or
 * mk_mm_quantize_part from every thread in a step before), every thread
 * quantizes x into its own part of the scratch memory (for 8 rows of 14336
 * values about 160 KB and a few microseconds, against milliseconds for the
 * weights), so the call needs no barrier: a ggml custom op's threads have
 * none. No allocation; under 2 KiB of stack.
 */

/* Weight types (values equal ggml's enum ggml_type). */
enum mk_wtype { MK_W_Q4_0 = 2, MK_W_Q8_0 = 8, MK_W_Q4_K = 12, MK_W_Q6_K = 14 };

/* Matrix-product implementations. The VNNI and dot-product variants are
 * separate paths: they need CPU features their base does not have. */
enum mk_mm_path {
    MK_MM_SCALAR = 0,      /* portable C, the reference */
    MK_MM_AVX2 = 1,        /* AVX2 + FMA + F16C (maddubs) */
    MK_MM_AVXVNNI = 2,     /* AVX2 + AVX-VNNI (256-bit vpdpbusd, VEX: Alder Lake and later without AVX-512) */
    MK_MM_AVX512 = 3,      /* AVX-512 F/BW/VL (maddubs) */
    MK_MM_AVX512VNNI = 4,  /* AVX-512 F/BW/VL + AVX512_VNNI (512-bit vpdpbusd) */
    MK_MM_NEON = 5,        /* aarch64 NEON, ARMv8.0 (smull) */
    MK_MM_NEON_DOTPROD = 6 /* aarch64 NEON + dot product (ARMv8.2 SDOT) */
};

/* Output rows per packed tile. */
#define MK_MM_TILE_ROWS 16
/* Activation rows computed per pass over a tile (a batch is processed in
 * chunks of this many). */
#define MK_MM_MAX_NR 8
/* Most activation rows of one call. */
#define MK_MM_MAX_BATCH 65536
/* Alignment recommended for the packed weights, the quantized activations and
 * the scratch memory (the kernels use unaligned loads: any alignment works). */
#define MK_MM_ALIGN 64

/* Bytes of one packed tile (16 rows of n_cols), a multiple of 64; 0 if wtype
 * is unknown or n_cols is not a positive multiple of its block size (32 for
 * Q4_0/Q8_0, 256 for Q4_K/Q6_K). */
size_t mk_mm_tile_bytes(int wtype, int64_t n_cols);

/* Bytes of the packed form of an n_rows x n_cols matrix: ceil(n_rows/16)
 * tiles; 0 if the shape is invalid (see mk_mm_tile_bytes; n_rows >= 1). */
size_t mk_mm_packed_size(int wtype, int64_t n_rows, int64_t n_cols);

/* Converts tiles [tile_begin, tile_end) of the matrix: src is the whole GGUF
 * matrix (n_rows rows of n_cols/blocksize blocks, contiguous), dst the whole
 * packed buffer (mk_mm_packed_size bytes, 64-byte alignment recommended; tile t is written
 * at t * mk_mm_tile_bytes). Disjoint tile ranges may be packed by different
 * threads at once. Returns 0, or -1 (nothing written) if an argument is
 * invalid. Reads the source in address order, once. */
int mk_mm_pack(int wtype, int64_t n_rows, int64_t n_cols, const void *src, void *dst, int64_t tile_begin,
               int64_t tile_end);

/* Bytes of nr (1..MK_MM_MAX_BATCH) quantized activation rows of n_cols values,
 * a multiple of 64, 0 if invalid. Rows are stored in chunks of 8 (the last may
 * hold fewer); a chunk of c rows is: int8 q[c][n_cols], then f32
 * d[c][n_cols/32], f32 d*sum(q)[c][n_cols/32], int32 half-block sums
 * [c][n_cols/32][2], each section 64-byte aligned; chunk j starts at
 * j * mk_mm_act_size(n_cols, 8). */
size_t mk_mm_act_size(int64_t n_cols, int nr);

/* Quantizes nr rows (x[r * x_stride + k]) into xq (mk_mm_act_size bytes).
 * Returns 0, or -1 on invalid arguments (n_cols not a positive multiple of
 * 32, nr not in 1..MK_MM_MAX_BATCH, x_stride < n_cols). */
int mk_mm_quantize(const float *x, int64_t x_stride, int nr, int64_t n_cols, void *xq);

/* Thread ith of nth's share of mk_mm_quantize (a contiguous range of chunks;
 * calling it for every ith quantizes all rows), with the selected path's
 * vector code (the bytes are the same on every path). For a graph node that
 * quantizes once for the products that follow it. */
int mk_mm_quantize_part(const float *x, int64_t x_stride, int nr, int64_t n_cols, void *xq, int ith, int nth);

struct mk_mm_params {
    int32_t wtype;       /* enum mk_wtype */
    int32_t nr;          /* activation rows, 1..MK_MM_MAX_BATCH */
    int64_t n_rows;      /* output features (rows of W), >= 1 */
    int64_t n_cols;      /* inputs (columns of W), a multiple of the block size */
    const void *w;       /* packed weights (mk_mm_pack), mk_mm_packed_size bytes */
    const float *x;      /* activations x[r * x_stride + k]; unused when xq is set */
    int64_t x_stride;    /* >= n_cols */
    const void *xq;      /* NULL, or the activations quantized by mk_mm_quantize (then x and scratch are unused) */
    float *y;            /* output y[r * y_stride + n], n < n_rows; written, never read */
    int64_t y_stride;    /* >= n_rows */
    void *scratch;       /* with xq NULL: mk_mm_scratch_size(p, nth) bytes; thread ith uses its own part */
    size_t scratch_bytes;
};

/* Scratch bytes a call with nth threads needs: 0 when xq is set, else
 * nth * mk_mm_act_size(n_cols, nr). */
size_t mk_mm_scratch_size(const struct mk_mm_params *p, int nth);

/* Computes thread ith's share of y (0 <= ith < nth); calling it for every ith
 * in [0, nth) (in any order, in parallel) computes all of y. Returns 0, or -1
 * if the parameters are invalid (then this thread wrote nothing). Dispatches
 * to the path chosen at run time (the best one the CPU supports, unless
 * mk_mm_set_path() chose another). */
int mk_matmul(const struct mk_mm_params *p, int ith, int nth);

/* 1 if the path is compiled into this build and the CPU (and OS) support it. */
int mk_mm_path_available(enum mk_mm_path path);
/* Path mk_matmul() currently uses. */
enum mk_mm_path mk_mm_current_path(void);
/* Makes mk_matmul() use the path; 0, or -1 (nothing changed) if unavailable. */
int mk_mm_set_path(enum mk_mm_path path);

/* Software prefetch distance of the matrix kernels, in bytes ahead of the
 * weights being read (0: none; default 8192, into L2). For benchmarks; set it
 * before any call runs. */
void mk_mm_set_prefetch(int bytes);
int mk_mm_get_prefetch(void);

/* Explicit paths, same contract as mk_matmul(). Only call a path that
 * mk_mm_path_available() reports; each is compiled only on its architecture. */
int mk_matmul_scalar(const struct mk_mm_params *p, int ith, int nth);
#if defined(__x86_64__) || defined(_M_X64)
int mk_matmul_avx2(const struct mk_mm_params *p, int ith, int nth);
int mk_matmul_avxvnni(const struct mk_mm_params *p, int ith, int nth);
int mk_matmul_avx512(const struct mk_mm_params *p, int ith, int nth);
int mk_matmul_avx512vnni(const struct mk_mm_params *p, int ith, int nth);
/* The AVX-VNNI path's code (256-bit, two vectors per tile) with the EVEX
 * encoding of vpdpbusd (AVX512_VNNI + AVX512VL): the AVX-VNNI algorithm on
 * CPUs that have AVX-512 VNNI but not AVX-VNNI (tests), and the AVX-512 VNNI
 * path's one-row tiles where mk_mm_narrow_one_row() is set. Available when
 * mk_mm_path_available(MK_MM_AVX512VNNI). */
int mk_matmul_avxvnni_evex(const struct mk_mm_params *p, int ith, int nth);
#endif

/* One-row products (nr == 1) of Q4_0, Q4_K and Q6_K matrices on the AVX-512
 * VNNI path: 1 = through its 256-bit tiles (mk_matmul_avxvnni_evex), 0 =
 * through its 512-bit tiles; the results are the same. Default: 1 on AMD Zen 4
 * (CPUID family 19h with AVX-512), where the 256-bit tiles stream 5-10 % closer
 * to the memory's read bandwidth at one row (one thread from memory: 8-15 %;
 * two threads: 5-10 % when the memory is not saturated; BENCHMARKS.md
 * section 7), else 0.
 * Q8_0 keeps its 512-bit tile (measured as fast or faster). */
int mk_mm_narrow_one_row(void);
/* Sets it (0 or 1) for every later call. Callers whose matrices stay in the
 * CPU's caches should set 0: there the 512-bit tiles compute faster (15-25 %
 * on Zen 4, one thread). */
void mk_mm_set_narrow_one_row(int on);
/* The CPU's default for mk_mm_narrow_one_row() (whatever was set since). */
int mk_mm_narrow_one_row_default(void);
#if defined(__aarch64__)
int mk_matmul_neon(const struct mk_mm_params *p, int ith, int nth);
int mk_matmul_neon_dotprod(const struct mk_mm_params *p, int ith, int nth);
#endif

#ifdef __cplusplus
}
#endif

#endif /* MISTRALD_KERNELS_H */
