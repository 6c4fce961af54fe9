//! Quantized matrix-vector products (`vendor/kernels/mm_*.c`): `y[r] = W · x[r]` for a batch of
//! activation rows (computed 8 at a time per tile, so the weights are read once per call) with W
//! a Q4_0, Q8_0, Q4_K or Q6_K matrix, converted once into mistrald's packed layout (16 rows
//! interleaved per tile, see `mistrald_kernels.h`).
//!
//! * [`PackedMatrix::pack`]: GGUF blocks → the packed layout (sizes checked first).
//! * [`MatmulPath`] / [`Matmul`]: the implementations (scalar, AVX2, AVX-VNNI, AVX-512,
//!   AVX-512 VNNI, NEON, NEON dot product) and the one chosen at run time: the best the CPU
//!   supports, the best of the family `MISTRALD_KERNEL` names (`avx2` → AVX-VNNI when the CPU
//!   has it, `avx512` → AVX-512 VNNI, `neon` → dot product), or exactly the path
//!   `MISTRALD_MATMUL_KERNEL` names.
//! * [`Matmul::run`]: the safe entry: every size checked before C is called, threads spawned
//!   internally; [`Matmul::run_raw`] for a ggml custom op's threads.
//! * [`QuantizedActs`]: activation rows quantized once by the caller (otherwise each thread
//!   quantizes them into its own scratch; the C call has no barrier); [`quantize_part_raw`] for
//!   a graph node whose threads quantize a batch together before the products.

use super::{ffi, KernelError, KernelPath, KERNEL_ENV};
use crate::ggml::GgmlType;
use std::ffi::c_int;
use std::sync::OnceLock;

/// Output rows per packed tile.
pub const TILE_ROWS: usize = ffi::MK_MM_TILE_ROWS as usize;
/// Activation rows computed per pass over a tile (a batch is computed in chunks of this many).
pub const MAX_ROWS: usize = ffi::MK_MM_MAX_NR as usize;
/// Most activation rows of one call.
pub const MAX_BATCH: usize = ffi::MK_MM_MAX_BATCH as usize;
/// Environment variable that forces one matrix-product path exactly.
pub const MATMUL_KERNEL_ENV: &str = "MISTRALD_MATMUL_KERNEL";
/// Environment variable that sets the tile width (`256` or `512`) of the AVX-512 VNNI path's
/// one-row products (see [`set_narrow_one_row`]).
pub const ONE_ROW_ENV: &str = "MISTRALD_MATMUL_ONE_ROW";

/// Raw parameter block of the C matrix kernels.
pub type RawMatmulParams = ffi::mk_mm_params;
/// Raw entry point: computes thread `ith`'s share of `nth`; 0 or -1 (invalid parameters).
pub type RawMatmulFn = unsafe extern "C" fn(*const ffi::mk_mm_params, c_int, c_int) -> c_int;

/// Weight types the matrix kernels take (values equal ggml's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// Blocks of 32 four-bit values with an f16 scale (18 bytes).
    Q4_0,
    /// Blocks of 32 int8 with an f16 scale (34 bytes).
    Q8_0,
    /// Super-blocks of 256 four-bit values, 6-bit scales and mins per 32 (144 bytes).
    Q4K,
    /// Super-blocks of 256 six-bit values, int8 scales per 16 (210 bytes).
    Q6K,
}

impl WeightType {
    /// Every type, in the order of the C tile tables.
    pub const ALL: [WeightType; 4] = [
        WeightType::Q4_0,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q6K,
    ];

    /// The matrix kernels' type for a ggml type, if they take it.
    pub fn from_ggml(t: GgmlType) -> Option<WeightType> {
        match t {
            GgmlType::Q4_0 => Some(WeightType::Q4_0),
            GgmlType::Q8_0 => Some(WeightType::Q8_0),
            GgmlType::Q4K => Some(WeightType::Q4K),
            GgmlType::Q6K => Some(WeightType::Q6K),
            _ => None,
        }
    }

    /// The ggml type.
    pub fn ggml(self) -> GgmlType {
        match self {
            WeightType::Q4_0 => GgmlType::Q4_0,
            WeightType::Q8_0 => GgmlType::Q8_0,
            WeightType::Q4K => GgmlType::Q4K,
            WeightType::Q6K => GgmlType::Q6K,
        }
    }

    /// Values per GGUF block (32 or 256): the column count must be a multiple.
    pub fn block_values(self) -> usize {
        match self {
            WeightType::Q4_0 | WeightType::Q8_0 => 32,
            WeightType::Q4K | WeightType::Q6K => 256,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_0 => 18,
            WeightType::Q8_0 => 34,
            WeightType::Q4K => 144,
            WeightType::Q6K => 210,
        }
    }

    /// Lowercase name (`q4_0`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        self.ggml().name()
    }

    fn raw(self) -> c_int {
        (match self {
            WeightType::Q4_0 => ffi::mk_wtype_MK_W_Q4_0,
            WeightType::Q8_0 => ffi::mk_wtype_MK_W_Q8_0,
            WeightType::Q4K => ffi::mk_wtype_MK_W_Q4_K,
            WeightType::Q6K => ffi::mk_wtype_MK_W_Q6_K,
        }) as c_int
    }

    /// Bytes of a GGUF matrix of `n_rows` × `n_cols` of this type, after checking the shape
    /// (positive, whole blocks, no overflow).
    pub fn gguf_bytes(self, n_rows: usize, n_cols: usize) -> Result<usize, KernelError> {
        check_shape(self, n_rows, n_cols)?;
        Ok(n_rows * (n_cols / self.block_values()) * self.block_bytes())
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Largest row or column count accepted (the C side takes up to 2^40; this keeps every product
/// of the sizes far from overflowing).
const MAX_DIM: usize = 1 << 30;

fn check_shape(ty: WeightType, n_rows: usize, n_cols: usize) -> Result<(), KernelError> {
    let bv = ty.block_values();
    if n_rows == 0 || n_rows > MAX_DIM {
        return Err(KernelError::InvalidMatmul(format!(
            "{ty} matrix: {n_rows} rows (must be 1..={MAX_DIM})"
        )));
    }
    if n_cols == 0 || n_cols > MAX_DIM || !n_cols.is_multiple_of(bv) {
        return Err(KernelError::InvalidMatmul(format!(
            "{ty} matrix: {n_cols} columns (must be a positive multiple of its block size {bv}, at most {MAX_DIM})"
        )));
    }
    let bytes = (n_rows as u128) * (n_cols as u128 / bv as u128) * ty.block_bytes() as u128;
    if bytes > isize::MAX as u128 / 2 {
        return Err(KernelError::InvalidMatmul(format!(
            "{ty} matrix {n_rows}x{n_cols} is too large"
        )));
    }
    Ok(())
}

/// One implementation of the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatmulPath {
    /// Portable C, the reference; always available.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (vpmaddubsw products).
    Avx2,
    /// x86-64 AVX2 + AVX-VNNI (256-bit vpdpbusd; Intel Alder Lake and later without AVX-512).
    AvxVnni,
    /// x86-64 AVX-512 F/BW/VL (vpmaddubsw products).
    Avx512,
    /// x86-64 AVX-512 F/BW/VL + AVX512_VNNI (512-bit vpdpbusd).
    Avx512Vnni,
    /// aarch64 NEON, ARMv8.0 (smull products).
    Neon,
    /// aarch64 NEON with the ARMv8.2 dot product (SDOT).
    NeonDotprod,
}

impl MatmulPath {
    /// Every path.
    pub const ALL: [MatmulPath; 7] = [
        MatmulPath::Scalar,
        MatmulPath::Avx2,
        MatmulPath::AvxVnni,
        MatmulPath::Avx512,
        MatmulPath::Avx512Vnni,
        MatmulPath::Neon,
        MatmulPath::NeonDotprod,
    ];

    /// Name as accepted by `MISTRALD_MATMUL_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPath::Scalar => "scalar",
            MatmulPath::Avx2 => "avx2",
            MatmulPath::AvxVnni => "avxvnni",
            MatmulPath::Avx512 => "avx512",
            MatmulPath::Avx512Vnni => "avx512vnni",
            MatmulPath::Neon => "neon",
            MatmulPath::NeonDotprod => "neondot",
        }
    }

    /// Parses a name as accepted by `MISTRALD_MATMUL_KERNEL` (case-insensitive).
    pub fn from_name(name: &str) -> Result<MatmulPath, KernelError> {
        let lower = name.trim().to_ascii_lowercase();
        MatmulPath::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| KernelError::UnknownMatmulPath(name.to_string()))
    }

    /// The attention path family (`MISTRALD_KERNEL`'s vocabulary) this path belongs to.
    pub fn family(self) -> KernelPath {
        match self {
            MatmulPath::Scalar => KernelPath::Scalar,
            MatmulPath::Avx2 | MatmulPath::AvxVnni => KernelPath::Avx2,
            MatmulPath::Avx512 | MatmulPath::Avx512Vnni => KernelPath::Avx512,
            MatmulPath::Neon | MatmulPath::NeonDotprod => KernelPath::Neon,
        }
    }

    /// Whether this build contains the path and the CPU (and OS) support it.
    pub fn is_available(self) -> bool {
        // SAFETY: pure query of CPU features.
        unsafe { ffi::mk_mm_path_available(self.raw()) != 0 }
    }

    fn raw(self) -> ffi::mk_mm_path {
        match self {
            MatmulPath::Scalar => ffi::mk_mm_path::MK_MM_SCALAR,
            MatmulPath::Avx2 => ffi::mk_mm_path::MK_MM_AVX2,
            MatmulPath::AvxVnni => ffi::mk_mm_path::MK_MM_AVXVNNI,
            MatmulPath::Avx512 => ffi::mk_mm_path::MK_MM_AVX512,
            MatmulPath::Avx512Vnni => ffi::mk_mm_path::MK_MM_AVX512VNNI,
            MatmulPath::Neon => ffi::mk_mm_path::MK_MM_NEON,
            MatmulPath::NeonDotprod => ffi::mk_mm_path::MK_MM_NEON_DOTPROD,
        }
    }

    /// The C entry point of the path, if compiled into this build.
    fn entry(self) -> Option<RawMatmulFn> {
        match self {
            MatmulPath::Scalar => Some(ffi::mk_matmul_scalar),
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx2 => Some(ffi::mk_matmul_avx2),
            #[cfg(target_arch = "x86_64")]
            MatmulPath::AvxVnni => Some(ffi::mk_matmul_avxvnni),
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx512 => Some(ffi::mk_matmul_avx512),
            #[cfg(target_arch = "x86_64")]
            MatmulPath::Avx512Vnni => Some(ffi::mk_matmul_avx512vnni),
            #[cfg(target_arch = "aarch64")]
            MatmulPath::Neon => Some(ffi::mk_matmul_neon),
            #[cfg(target_arch = "aarch64")]
            MatmulPath::NeonDotprod => Some(ffi::mk_matmul_neon_dotprod),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl std::fmt::Display for MatmulPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Matrix paths this build and CPU can run, scalar first.
pub fn available_matmul_paths() -> Vec<MatmulPath> {
    MatmulPath::ALL
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// Preference order: the wider and the integer-dot-product variants first.
const PREFERENCE: [MatmulPath; 6] = [
    MatmulPath::Avx512Vnni,
    MatmulPath::Avx512,
    MatmulPath::AvxVnni,
    MatmulPath::Avx2,
    MatmulPath::NeonDotprod,
    MatmulPath::Neon,
];

/// The path [`Matmul::selected`] picks given the values of `MISTRALD_MATMUL_KERNEL` and
/// `MISTRALD_KERNEL` (`None` or empty: unset): the exact path the first names; else the best
/// available path of the family the second names; else the best available path.
pub fn matmul_path_for_env(
    matmul_value: Option<&str>,
    kernel_value: Option<&str>,
) -> Result<MatmulPath, KernelError> {
    let set = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    if let Some(name) = set(matmul_value) {
        let path = MatmulPath::from_name(&name)?;
        return Matmul::for_path(path).map(|m| m.path());
    }
    if let Some(name) = set(kernel_value) {
        let family = KernelPath::from_name(&name)?;
        // The family must itself be available (as for attention), then its best variant.
        super::Kernel::for_path(family)?;
        return Ok(PREFERENCE
            .into_iter()
            .find(|p| p.family() == family && p.is_available())
            .unwrap_or(MatmulPath::Scalar));
    }
    Ok(PREFERENCE
        .into_iter()
        .find(|p| p.is_available())
        .unwrap_or(MatmulPath::Scalar))
}

/// Sets the software prefetch distance of the matrix kernels in bytes (0: none); for benchmarks.
/// Takes effect for calls that start afterwards.
pub fn set_prefetch_distance(bytes: usize) {
    // SAFETY: stores an int (clamped by the C side).
    unsafe { ffi::mk_mm_set_prefetch(bytes.min(1 << 20) as c_int) }
}

/// Whether the AVX-512 VNNI path computes one-row products of Q4_0, Q4_K and Q6_K matrices with
/// its 256-bit tiles (the AVX-VNNI code in EVEX encoding; same results) instead of its 512-bit
/// ones. The C side's default: on AMD Zen 4, where they stream closer to the memory bandwidth.
pub fn narrow_one_row() -> bool {
    // SAFETY: reads (and on first use decides from CPUID) an int.
    unsafe { ffi::mk_mm_narrow_one_row() != 0 }
}

/// Sets [`narrow_one_row`] for every later product (benchmarks, tests, `MISTRALD_MATMUL_ONE_ROW`).
/// Either setting gives the same results.
pub fn set_narrow_one_row(on: bool) {
    // SAFETY: stores an int.
    unsafe { ffi::mk_mm_set_narrow_one_row(c_int::from(on)) }
}

/// Parses a `MISTRALD_MATMUL_ONE_ROW` value: `Some(true)` for `256`, `Some(false)` for `512`,
/// `None` when unset or empty (keep the CPU's default).
pub fn one_row_width_for_env(value: Option<&str>) -> Result<Option<bool>, KernelError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some("256") => Ok(Some(true)),
        Some("512") => Ok(Some(false)),
        Some(other) => Err(KernelError::BadOneRowWidth(other.to_string())),
    }
}

/// The one-row width rule, given the `MISTRALD_MATMUL_ONE_ROW` value, the CPU's default (see
/// [`narrow_one_row`]), the bytes of a model's packed matrices (`None`: not for a model, as
/// `bench-matmul`) and the last-level cache's size: the variable when set; else narrow where
/// the CPU's default says so, unless the matrices fit in the cache, where they are read from
/// it and the wider tiles compute faster.
pub fn one_row_narrow(
    env: Option<&str>,
    cpu_default: bool,
    packed_bytes: Option<u64>,
    cache_bytes: u64,
) -> Result<bool, KernelError> {
    if let Some(narrow) = one_row_width_for_env(env)? {
        return Ok(narrow);
    }
    Ok(cpu_default && packed_bytes.is_none_or(|b| b > cache_bytes))
}

/// Applies [`one_row_narrow`] with this process's `MISTRALD_MATMUL_ONE_ROW`, this CPU and its
/// last-level cache (for a model whose packed matrices take `packed_bytes`); returns the choice.
pub fn choose_one_row_width(packed_bytes: Option<u64>) -> Result<bool, KernelError> {
    let env = std::env::var(ONE_ROW_ENV).ok();
    // SAFETY: pure query of CPU features.
    let cpu_default = unsafe { ffi::mk_mm_narrow_one_row_default() != 0 };
    let narrow = one_row_narrow(
        env.as_deref(),
        cpu_default,
        packed_bytes,
        last_level_cache_bytes(),
    )?;
    set_narrow_one_row(narrow);
    Ok(narrow)
}

/// Size of the CPU's last-level cache from sysfs (the highest cache level cpu0 lists), or
/// 32 MiB where Linux does not say.
pub fn last_level_cache_bytes() -> u64 {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    let mut best: Option<(u32, u64)> = None;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let level = read(entry.path().join("level")).and_then(|s| s.trim().parse::<u32>().ok());
        let size = read(entry.path().join("size")).and_then(|s| parse_cache_size(&s));
        if let (Some(level), Some(size)) = (level, size) {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, size));
            }
        }
    }
    best.map_or(32 << 20, |(_, size)| size)
}

/// Parses sysfs's cache sizes (`32768K`, `2M`, `512`).
pub(crate) fn parse_cache_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mul = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// The software prefetch distance of the matrix kernels in bytes.
pub fn prefetch_distance() -> usize {
    // SAFETY: reads an int.
    unsafe { ffi::mk_mm_get_prefetch() }.max(0) as usize
}

/// Zeroed memory aligned to 64 bytes (what the kernels want of weights, activations and
/// scratch). Large buffers (the packed matrices) are anonymous mappings aligned to 2 MiB and
/// marked for transparent huge pages (`MADV_HUGEPAGE`: where THP is `madvise`-only, as on many
/// distributions, streaming gigabytes of weights through 4 KiB pages costs a TLB miss every
/// 4 KiB); their pages are zero until written. Small ones come from the allocator.
pub(crate) struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Bytes mapped (0: allocated from the heap).
    mapped: usize,
}

// SAFETY: plain owned memory.
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

/// Buffers at least this large are mapped with huge pages.
const HUGE_MIN: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

impl Aligned {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1).next_multiple_of(64), 64)
            .expect("size checked by the caller")
    }

    pub(crate) fn zeroed(len: usize) -> Aligned {
        if len >= HUGE_MIN {
            if let Some(a) = Self::mapped(len) {
                return a;
            }
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Aligned {
            ptr,
            len,
            mapped: 0,
        }
    }

    /// An anonymous mapping of `len` bytes starting on a 2 MiB boundary, marked for huge pages.
    fn mapped(len: usize) -> Option<Aligned> {
        let size = len.next_multiple_of(HUGE_PAGE);
        let span = size + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; the parts outside the aligned range are
        // unmapped again at once, the rest is owned by the returned value.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            let base = p as usize;
            let start = base.next_multiple_of(HUGE_PAGE);
            if start > base {
                libc::munmap(p, start - base);
            }
            let tail = base + span - (start + size);
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
            // Only a hint: without THP the mapping works with small pages.
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            Some(Aligned {
                ptr: std::ptr::NonNull::new(start as *mut u8)?,
                len,
                mapped: size,
            })
        }
    }

    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed, then written) bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        if self.mapped > 0 {
            // SAFETY: the mapping made in `mapped`, of this size.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        } else {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

/// A pointer shared by threads that write disjoint parts of what it points to.
struct SendPtr(*mut u8);
// SAFETY: used only for disjoint writes (see its uses).
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(&self) -> *mut u8 {
        self.0
    }
}

/// A weight matrix in the kernels' packed layout.
pub struct PackedMatrix {
    ty: WeightType,
    n_rows: usize,
    n_cols: usize,
    data: Aligned,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("ty", &self.ty)
            .field("n_rows", &self.n_rows)
            .field("n_cols", &self.n_cols)
            .field("bytes", &self.data.len)
            .finish()
    }
}

impl PackedMatrix {
    /// Bytes of the packed form of an `n_rows` × `n_cols` matrix of `ty`.
    pub fn packed_size(ty: WeightType, n_rows: usize, n_cols: usize) -> Result<usize, KernelError> {
        check_shape(ty, n_rows, n_cols)?;
        // SAFETY: pure computation on checked sizes.
        let n = unsafe { ffi::mk_mm_packed_size(ty.raw(), n_rows as i64, n_cols as i64) };
        if n == 0 {
            return Err(KernelError::InvalidMatmul(format!(
                "{ty} matrix {n_rows}x{n_cols} has no packed size"
            )));
        }
        Ok(n)
    }

    /// Converts a GGUF matrix (`n_rows` rows of `n_cols / block` blocks, contiguous) into the
    /// packed layout.
    pub fn pack(
        ty: WeightType,
        n_rows: usize,
        n_cols: usize,
        gguf: &[u8],
    ) -> Result<PackedMatrix, KernelError> {
        let need = ty.gguf_bytes(n_rows, n_cols)?;
        if gguf.len() != need {
            return Err(KernelError::InvalidMatmul(format!(
                "{ty} matrix {n_rows}x{n_cols} needs {need} bytes of GGUF blocks, got {}",
                gguf.len()
            )));
        }
        let size = Self::packed_size(ty, n_rows, n_cols)?;
        let mut data = Aligned::zeroed(size);
        let tiles = n_rows.div_ceil(TILE_ROWS);
        // Large matrices are converted by all cores, each a contiguous range of tiles.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(tiles.div_ceil(64))
            .max(1);
        let dst = SendPtr(data.as_mut_ptr());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let part = |i: usize| {
            // SAFETY: the source holds exactly the matrix, the destination its packed size; the
            // shape was checked; the threads write disjoint tile ranges.
            let rc = unsafe {
                ffi::mk_mm_pack(
                    ty.raw(),
                    n_rows as i64,
                    n_cols as i64,
                    gguf.as_ptr().cast(),
                    dst.get().cast(),
                    (tiles * i / threads) as i64,
                    (tiles * (i + 1) / threads) as i64,
                )
            };
            if rc != 0 {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        std::thread::scope(|s| {
            for i in 1..threads {
                let part = &part;
                s.spawn(move || part(i));
            }
            part(0);
        });
        if failed.into_inner() {
            return Err(KernelError::InvalidMatmul(format!(
                "packing a {ty} matrix {n_rows}x{n_cols} failed"
            )));
        }
        Ok(PackedMatrix {
            ty,
            n_rows,
            n_cols,
            data,
        })
    }

    /// The weight type.
    pub fn ty(&self) -> WeightType {
        self.ty
    }
    /// Output features (rows of W).
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    /// Inputs (columns of W).
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }
    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }
    /// Pointer to the packed bytes (64-byte aligned), for raw parameter blocks.
    pub fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }
}

/// Activation rows quantized the kernels' way (int8 blocks of 32 with an f32 scale, plus block
/// sums), computed once and shared by every thread of a call.
pub struct QuantizedActs {
    n_cols: usize,
    rows: usize,
    data: Aligned,
}

fn check_rows(rows: usize, n_cols: usize) -> Result<(), KernelError> {
    if rows == 0 || rows > MAX_BATCH {
        return Err(KernelError::InvalidMatmul(format!(
            "{rows} activation rows (one call takes 1..={MAX_BATCH})"
        )));
    }
    if n_cols == 0 || n_cols > MAX_DIM || !n_cols.is_multiple_of(32) {
        return Err(KernelError::InvalidMatmul(format!(
            "activation rows of {n_cols} values (must be a positive multiple of 32)"
        )));
    }
    Ok(())
}

impl QuantizedActs {
    /// Quantizes `rows` rows of `n_cols` values (`x.len() == rows * n_cols`, 1..=[`MAX_BATCH`]
    /// rows).
    pub fn quantize(x: &[f32], rows: usize, n_cols: usize) -> Result<QuantizedActs, KernelError> {
        check_rows(rows, n_cols)?;
        if x.len() != rows * n_cols {
            return Err(KernelError::InvalidMatmul(format!(
                "x has {} values, expected {rows} rows of {n_cols}",
                x.len()
            )));
        }
        // SAFETY: sizes checked.
        let size = unsafe { ffi::mk_mm_act_size(n_cols as i64, rows as c_int) };
        let mut data = Aligned::zeroed(size);
        // SAFETY: x holds rows * n_cols values, data act_size aligned bytes.
        let rc = unsafe {
            ffi::mk_mm_quantize(
                x.as_ptr(),
                n_cols as i64,
                rows as c_int,
                n_cols as i64,
                data.as_mut_ptr().cast(),
            )
        };
        debug_assert_eq!(rc, 0);
        Ok(QuantizedActs { n_cols, rows, data })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Where row `r` lives: (start of its chunk of 8, rows in that chunk, index in it).
    fn chunk_of(&self, r: usize) -> (usize, usize, usize) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: sizes checked at construction.
        let chunk = unsafe { ffi::mk_mm_act_size(self.n_cols as i64, MAX_ROWS as c_int) };
        let c = r / MAX_ROWS;
        (
            (c * chunk),
            (self.rows - c * MAX_ROWS).min(MAX_ROWS),
            r % MAX_ROWS,
        )
    }

    /// Row `r`'s int8 values.
    pub fn q(&self, r: usize) -> &[i8] {
        let (base, _, i) = self.chunk_of(r);
        let q = &self.data.bytes()[base + i * self.n_cols..base + (i + 1) * self.n_cols];
        // SAFETY: u8 and i8 have the same layout.
        unsafe { std::slice::from_raw_parts(q.as_ptr().cast(), q.len()) }
    }

    /// Row `r`'s block scales (one per 32 values): value k is `d[k / 32] * q[k]`.
    pub fn d(&self, r: usize) -> &[f32] {
        let (base, rows, i) = self.chunk_of(r);
        let nb = self.n_cols / 32;
        let at = base + (rows * self.n_cols).next_multiple_of(64) + i * nb * 4;
        let b = &self.data.bytes()[at..at + nb * 4];
        // SAFETY: nb 4-byte values at a 4-byte aligned offset (mk_mm_act_size layout).
        unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), nb) }
    }

    /// Row `r`'s dequantized values.
    pub fn dequantized(&self, r: usize) -> Vec<f32> {
        let d = self.d(r);
        self.q(r)
            .iter()
            .enumerate()
            .map(|(k, &q)| d[k / 32] * q as f32)
            .collect()
    }
}

/// A matrix path together with its resolved entry point.
#[derive(Debug, Clone, Copy)]
pub struct Matmul {
    path: MatmulPath,
    entry: RawMatmulFn,
}

static SELECTED: OnceLock<Result<Matmul, KernelError>> = OnceLock::new();

struct SharedParams(*const RawMatmulParams);
// SAFETY: the kernel is made to be called with the same parameters from several threads at once
// (disjoint output rows, per-thread scratch).
unsafe impl Sync for SharedParams {}

impl SharedParams {
    fn get(&self) -> *const RawMatmulParams {
        self.0
    }
}

impl Matmul {
    /// The implementation of an explicit path, or an error if it is unavailable.
    pub fn for_path(path: MatmulPath) -> Result<Matmul, KernelError> {
        match path.entry() {
            Some(entry) if path.is_available() => Ok(Matmul { path, entry }),
            _ => Err(KernelError::MatmulUnavailable {
                path,
                available: available_matmul_paths()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The test twin of the AVX-VNNI path: the same code with vpdpbusd's EVEX encoding, which
    /// runs on AVX-512 VNNI CPUs (where AVX-VNNI itself is usually missing). `None` elsewhere.
    pub fn avxvnni_evex_twin() -> Option<Matmul> {
        #[cfg(target_arch = "x86_64")]
        if MatmulPath::Avx512Vnni.is_available() {
            return Some(Matmul {
                path: MatmulPath::AvxVnni,
                entry: ffi::mk_matmul_avxvnni_evex,
            });
        }
        None
    }

    /// The process-wide default (see [`matmul_path_for_env`]): chosen once from
    /// `MISTRALD_MATMUL_KERNEL`, `MISTRALD_KERNEL` and the CPU, then cached; the first call also
    /// makes the C dispatcher `mk_matmul()` use the same path.
    pub fn selected() -> Result<Matmul, KernelError> {
        SELECTED
            .get_or_init(|| {
                let m = std::env::var(MATMUL_KERNEL_ENV).ok();
                let k = std::env::var(KERNEL_ENV).ok();
                let path = matmul_path_for_env(m.as_deref(), k.as_deref())?;
                let mm = Matmul::for_path(path)?;
                // SAFETY: the path is available (checked above).
                let rc = unsafe { ffi::mk_mm_set_path(path.raw()) };
                debug_assert_eq!(rc, 0);
                Ok(mm)
            })
            .clone()
    }

    /// The path.
    pub fn path(&self) -> MatmulPath {
        self.path
    }

    /// The path's name, with the tiles of its one-row products where they are narrower
    /// (`avx512vnni, one row of Q4_0/Q4_K/Q6_K 256-bit`), for `info` and logs.
    pub fn describe(&self) -> String {
        if self.path == MatmulPath::Avx512Vnni && narrow_one_row() {
            format!("{}, one row of Q4_0/Q4_K/Q6_K 256-bit", self.path)
        } else {
            self.path.to_string()
        }
    }

    /// The raw C entry point (for a ggml custom op).
    pub fn raw_fn(&self) -> RawMatmulFn {
        self.entry
    }

    /// Computes thread `ith`'s share of the product described by `p`; returns the C status
    /// (0, or -1 when the C side rejected the parameters and wrote nothing).
    ///
    /// # Safety
    /// `p` must satisfy the contract of `mistrald_kernels.h`: `w` a packed matrix of the stated
    /// type and shape, `x` (or `xq`) and `y` valid for the rows and strides, `scratch` (when `xq`
    /// is null) at least `mk_mm_scratch_size(p, nth)` bytes (64-byte alignment recommended),
    /// used by no one else during the call except the other threads of the same call; `y` not
    /// accessed by anyone else meanwhile.
    pub unsafe fn run_raw(&self, p: *const RawMatmulParams, ith: i32, nth: i32) -> i32 {
        (self.entry)(p, ith, nth)
    }

    /// Safe entry: `y[r] = w · x[r]` for every row `r` of `x` (`x.len() == rows * n_cols`,
    /// `y.len() == rows * n_rows`, 1..=[`MAX_BATCH`] rows), computed by `n_threads` threads (the
    /// calling thread plus scoped threads), each quantizing the activations itself.
    pub fn run(
        &self,
        w: &PackedMatrix,
        x: &[f32],
        y: &mut [f32],
        n_threads: usize,
    ) -> Result<(), KernelError> {
        let order: Vec<usize> = (0..n_threads).collect();
        self.run_with(w, Acts::F32(x), y, n_threads, true, &order)
    }

    /// Like [`Matmul::run`] with activations quantized beforehand (no per-thread quantization).
    pub fn run_quantized(
        &self,
        w: &PackedMatrix,
        xq: &QuantizedActs,
        y: &mut [f32],
        n_threads: usize,
    ) -> Result<(), KernelError> {
        let order: Vec<usize> = (0..n_threads).collect();
        self.run_with(w, Acts::Quantized(xq), y, n_threads, true, &order)
    }

    /// Like [`Matmul::run`] (or [`Matmul::run_quantized`] when `xq` is given) but calls the
    /// `n_threads` shares one after another on the calling thread in the given order (tests:
    /// the result must not depend on the split or the order).
    pub fn run_sequential(
        &self,
        w: &PackedMatrix,
        x: &[f32],
        xq: Option<&QuantizedActs>,
        y: &mut [f32],
        n_threads: usize,
        order: &[usize],
    ) -> Result<(), KernelError> {
        let acts = match xq {
            Some(q) => Acts::Quantized(q),
            None => Acts::F32(x),
        };
        self.run_with(w, acts, y, n_threads, false, order)
    }

    fn run_with(
        &self,
        w: &PackedMatrix,
        acts: Acts<'_>,
        y: &mut [f32],
        n_threads: usize,
        parallel: bool,
        order: &[usize],
    ) -> Result<(), KernelError> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(KernelError::InvalidMatmul(format!(
                "n_threads must be in 1..=1024, got {n_threads}"
            )));
        }
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        if sorted != (0..n_threads).collect::<Vec<_>>() {
            return Err(KernelError::InvalidMatmul(
                "thread order must be a permutation of 0..n_threads".into(),
            ));
        }
        let (k, n) = (w.n_cols, w.n_rows);
        let rows = match acts {
            Acts::F32(x) => {
                if x.is_empty() || !x.len().is_multiple_of(k) {
                    return Err(KernelError::InvalidMatmul(format!(
                        "x has {} values, not a positive number of rows of {k}",
                        x.len()
                    )));
                }
                x.len() / k
            }
            Acts::Quantized(q) => {
                if q.n_cols != k {
                    return Err(KernelError::InvalidMatmul(format!(
                        "quantized activations have rows of {}, the matrix {k} columns",
                        q.n_cols
                    )));
                }
                q.rows
            }
        };
        if y.len() != rows * n {
            return Err(KernelError::InvalidMatmul(format!(
                "y has {} values, expected {rows} rows of {n}",
                y.len()
            )));
        }
        if rows > MAX_BATCH {
            return Err(KernelError::InvalidMatmul(format!(
                "{rows} activation rows (one call takes 1..={MAX_BATCH})"
            )));
        }
        let nth = n_threads as c_int;
        let mut raw = RawMatmulParams {
            wtype: w.ty.raw(),
            nr: rows as i32,
            n_rows: n as i64,
            n_cols: k as i64,
            w: w.as_ptr().cast(),
            x: std::ptr::null(),
            x_stride: k as i64,
            xq: std::ptr::null(),
            y: y.as_mut_ptr(),
            y_stride: n as i64,
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
        };
        let mut scratch = None;
        match acts {
            Acts::F32(x) => {
                raw.x = x.as_ptr();
                // SAFETY: reads the counts in `raw`.
                let bytes = unsafe { ffi::mk_mm_scratch_size(&raw, nth) };
                let s = scratch.insert(Aligned::zeroed(bytes));
                raw.scratch = s.as_mut_ptr().cast();
                raw.scratch_bytes = bytes;
            }
            Acts::Quantized(q) => raw.xq = q.data.as_ptr().cast(),
        }
        let shared = SharedParams(&raw);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let call = |ith: usize| {
            // SAFETY: every size was checked against the buffers above; the threads of this
            // call write disjoint rows of y and use their own parts of the scratch.
            if unsafe { self.run_raw(shared.get(), ith as c_int, nth) } != 0 {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        if parallel {
            std::thread::scope(|s| {
                for &ith in &order[1..] {
                    let call = &call;
                    s.spawn(move || call(ith));
                }
                call(order[0]);
            });
        } else {
            order.iter().for_each(|&ith| call(ith));
        }
        drop(scratch);
        if failed.into_inner() {
            return Err(KernelError::InvalidMatmul(
                "the matrix kernel rejected its parameters".into(),
            ));
        }
        Ok(())
    }
}

/// Bytes of `rows` activation rows of `n_cols` values quantized the kernels' way (the `xq`
/// buffer of a call), or an error for an invalid shape.
pub fn quantized_acts_bytes(rows: usize, n_cols: usize) -> Result<usize, KernelError> {
    check_rows(rows, n_cols)?;
    // SAFETY: pure computation on checked sizes.
    Ok(unsafe { ffi::mk_mm_act_size(n_cols as i64, rows as c_int) })
}

/// Thread `ith` of `nth`'s share of quantizing `rows` rows (`x[r * x_stride + k]`) into `xq`
/// (calling it for every `ith` quantizes them all, as [`QuantizedActs::quantize`] does).
///
/// # Safety
/// `x` must hold `rows` rows of `x_stride >= n_cols` floats, `xq`
/// [`quantized_acts_bytes`]`(rows, n_cols)` writable bytes that nobody else reads during the
/// call except the other threads' shares (which write other chunks), and the shape must be
/// valid (`quantized_acts_bytes` succeeds).
pub unsafe fn quantize_part_raw(
    x: *const f32,
    x_stride: usize,
    rows: usize,
    n_cols: usize,
    xq: *mut u8,
    ith: usize,
    nth: usize,
) -> i32 {
    ffi::mk_mm_quantize_part(
        x,
        x_stride as i64,
        rows as c_int,
        n_cols as i64,
        xq.cast(),
        ith as c_int,
        nth as c_int,
    )
}

#[derive(Clone, Copy)]
enum Acts<'a> {
    F32(&'a [f32]),
    Quantized(&'a QuantizedActs),
}
