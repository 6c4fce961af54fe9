//! Native attention kernels (`vendor/kernels/`): grouped-query, sliding-window
//! causal attention that reads the rolling KV cache (F32, F16 or Q8_0) in
//! place, with one C implementation per CPU path chosen at run time.
//!
//! * [`selected_path`] / [`Kernel::selected`]: the path used by default, the
//!   best one the CPU supports unless `MISTRALD_KERNEL=scalar|avx2|avx512|neon`
//!   forces another (an unknown name, or a path this CPU or build lacks, is an
//!   error). Chosen once per process and cached.
//! * [`Kernel::run`]: safe entry point: slices plus [`AttnParams`], every size
//!   and bound validated before C is called, threads spawned internally.
//! * [`Kernel::run_raw`]: the raw entry for the ggml custom op, which calls it
//!   from each of its worker threads with `ith`/`nth`.

pub mod bandwidth;
pub mod bench;
pub mod ffi;
pub mod ggml_bench;
pub mod ggml_op;
pub mod matmul;
pub mod matmul_bench;
#[cfg(test)]
mod matmul_tests;
#[cfg(test)]
mod test_rng;
#[cfg(test)]
mod tests;

use std::ffi::c_int;
use std::sync::OnceLock;

/// Raw kernel entry point: computes the share of thread `ith` of `nth`.
pub type RawKernelFn = unsafe extern "C" fn(*const ffi::mk_attn_params, c_int, c_int);

/// Raw parameter block passed to the C kernels (see `mistrald_kernels.h`).
pub type RawAttnParams = ffi::mk_attn_params;

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = ffi::MK_MAX_HEAD_DIM as usize;

/// Environment variable that forces a kernel path.
pub const KERNEL_ENV: &str = "MISTRALD_KERNEL";

/// One implementation of the attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Portable C, the reference; always available.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, DQ).
    Avx512,
    /// aarch64 NEON, using the dot-product extension when the CPU has it.
    Neon,
}

impl KernelPath {
    /// Every path, in order of preference from least to most specialised.
    pub const ALL: [KernelPath; 4] = [
        KernelPath::Scalar,
        KernelPath::Avx2,
        KernelPath::Avx512,
        KernelPath::Neon,
    ];

    /// Name as accepted by `MISTRALD_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
            KernelPath::Neon => "neon",
        }
    }

    /// Parses a name as accepted by `MISTRALD_KERNEL` (case-insensitive).
    pub fn from_name(name: &str) -> Result<KernelPath, KernelError> {
        let lower = name.trim().to_ascii_lowercase();
        KernelPath::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| KernelError::UnknownPath(name.to_string()))
    }

    /// Name plus variant details, e.g. `neon (dotprod)`, for `mistrald info`.
    pub fn description(self) -> String {
        match self {
            KernelPath::Neon if neon_has_dotprod() => "neon (dotprod)".to_string(),
            KernelPath::Neon => "neon (no dotprod)".to_string(),
            p => p.name().to_string(),
        }
    }

    /// Whether this build contains the path and the CPU (and OS) support it.
    pub fn is_available(self) -> bool {
        // SAFETY: pure query of CPU features.
        unsafe { ffi::mk_path_available(self.raw()) != 0 }
    }

    fn raw(self) -> ffi::mk_path {
        match self {
            KernelPath::Scalar => ffi::mk_path::MK_PATH_SCALAR,
            KernelPath::Avx2 => ffi::mk_path::MK_PATH_AVX2,
            KernelPath::Avx512 => ffi::mk_path::MK_PATH_AVX512,
            KernelPath::Neon => ffi::mk_path::MK_PATH_NEON,
        }
    }

    /// The C entry point of the path, if compiled into this build.
    fn entry(self) -> Option<RawKernelFn> {
        match self {
            KernelPath::Scalar => Some(ffi::mk_attention_scalar),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => Some(ffi::mk_attention_avx2),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => Some(ffi::mk_attention_avx512),
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => Some(ffi::mk_attention_neon),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the NEON path uses the dot-product extension on this CPU.
pub fn neon_has_dotprod() -> bool {
    // SAFETY: pure query of CPU features.
    unsafe { ffi::mk_neon_has_dotprod() != 0 }
}

/// Errors of kernel selection and of the safe entry point's validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// `MISTRALD_KERNEL` (or a requested name) is not a known path.
    #[error("unknown attention kernel path {0:?} (expected one of: scalar, avx2, avx512, neon)")]
    UnknownPath(String),
    /// The path exists but this build or CPU does not support it.
    #[error(
        "attention kernel path {path} is not available on this CPU/build (available: {available})"
    )]
    Unavailable {
        /// The requested path.
        path: KernelPath,
        /// Comma-separated names of the available paths.
        available: String,
    },
    /// A parameter or buffer does not satisfy the kernel's contract.
    #[error("invalid attention parameters: {0}")]
    Invalid(String),
    /// `MISTRALD_MATMUL_KERNEL` (or a requested name) is not a known matrix path.
    #[error("unknown matrix kernel path {0:?} (expected one of: scalar, avx2, avxvnni, avx512, avx512vnni, neon, neondot)")]
    UnknownMatmulPath(String),
    /// `MISTRALD_MATMUL_ONE_ROW` has a value other than `256` or `512`.
    #[error("MISTRALD_MATMUL_ONE_ROW must be 256 or 512 (the AVX-512 VNNI path's tile width for one-row products), not {0:?}")]
    BadOneRowWidth(String),
    /// The matrix path exists but this build or CPU does not support it.
    #[error(
        "matrix kernel path {path} is not available on this CPU/build (available: {available})"
    )]
    MatmulUnavailable {
        /// The requested path.
        path: matmul::MatmulPath,
        /// Comma-separated names of the available matrix paths.
        available: String,
    },
    /// A matrix-product parameter or buffer does not satisfy the kernel's contract.
    #[error("invalid matrix-product parameters: {0}")]
    InvalidMatmul(String),
}

/// Paths this build and CPU can run, scalar first.
pub fn available_paths() -> Vec<KernelPath> {
    KernelPath::ALL
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

/// The path [`selected_path`] picks given the value of `MISTRALD_KERNEL`
/// (`None`: unset or empty → the best available path).
pub fn path_for_env_value(value: Option<&str>) -> Result<KernelPath, KernelError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(best_path()),
        Some(name) => {
            let path = KernelPath::from_name(name)?;
            Kernel::for_path(path).map(|k| k.path())
        }
    }
}

fn best_path() -> KernelPath {
    [KernelPath::Avx512, KernelPath::Avx2, KernelPath::Neon]
        .into_iter()
        .find(|p| p.is_available())
        .unwrap_or(KernelPath::Scalar)
}

/// The kernel path used by default: chosen once per process from
/// `MISTRALD_KERNEL` and the CPU's features, then cached.
pub fn selected_path() -> Result<KernelPath, KernelError> {
    Kernel::selected().map(|k| k.path())
}

/// A kernel path together with its resolved entry point (dispatch done once).
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    path: KernelPath,
    entry: RawKernelFn,
}

static SELECTED: OnceLock<Result<Kernel, KernelError>> = OnceLock::new();

impl Kernel {
    /// The kernel for an explicit path, or an error if it is unavailable.
    pub fn for_path(path: KernelPath) -> Result<Kernel, KernelError> {
        match path.entry() {
            Some(entry) if path.is_available() => Ok(Kernel { path, entry }),
            _ => Err(KernelError::Unavailable {
                path,
                available: available_paths()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The process-wide default kernel (see [`selected_path`]). The first call
    /// reads `MISTRALD_KERNEL` and also makes the C dispatcher
    /// `mk_attention()` use the same path.
    pub fn selected() -> Result<Kernel, KernelError> {
        SELECTED
            .get_or_init(|| {
                let value = std::env::var(KERNEL_ENV).ok();
                let path = path_for_env_value(value.as_deref())?;
                let kernel = Kernel::for_path(path)?;
                // SAFETY: the path is available (checked above).
                let rc = unsafe { ffi::mk_set_path(path.raw()) };
                debug_assert_eq!(rc, 0);
                Ok(kernel)
            })
            .clone()
    }

    /// The path of this kernel.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// The raw C entry point (for storing in a ggml custom op's userdata).
    pub fn raw_fn(&self) -> RawKernelFn {
        self.entry
    }

    /// Computes thread `ith`'s share of the attention described by `p`.
    ///
    /// # Safety
    /// `p` must point to parameters that satisfy the contract of
    /// `mistrald_kernels.h` (what [`AttnParams::validate`] and
    /// [`Kernel::run`] check): every pointer valid for the sizes it implies,
    /// `out` not read or written by anyone else during the call except by the
    /// other threads' calls for the same `p` and `nth`, `0 <= ith < nth`, and
    /// `scratch` either null or as documented in the header.
    pub unsafe fn run_raw(&self, p: *const RawAttnParams, ith: i32, nth: i32) {
        (self.entry)(p, ith, nth)
    }

    /// Safe entry point: validates `params` against the slices, then computes
    /// the whole output with `n_threads` threads (the calling thread plus
    /// `n_threads - 1` scoped threads), splitting key ranges across threads
    /// when there are fewer (query, kv head) units than threads.
    pub fn run(
        &self,
        params: &AttnParams,
        inputs: &AttnInputs<'_>,
        out: &mut [f32],
        n_threads: usize,
    ) -> Result<(), KernelError> {
        let order: Vec<usize> = (0..n_threads).collect();
        self.run_with(params, inputs, out, n_threads, RunMode::Parallel, &order)
    }

    /// Like [`Kernel::run`] but calls the `n_threads` shares one after another
    /// on the calling thread in the given order (tests use it to check that
    /// the result does not depend on the order; it is also a deterministic
    /// single-threaded way to run a multi-thread plan).
    pub fn run_sequential(
        &self,
        params: &AttnParams,
        inputs: &AttnInputs<'_>,
        out: &mut [f32],
        n_threads: usize,
        order: &[usize],
    ) -> Result<(), KernelError> {
        self.run_with(params, inputs, out, n_threads, RunMode::Sequential, order)
    }

    fn run_with(
        &self,
        params: &AttnParams,
        inputs: &AttnInputs<'_>,
        out: &mut [f32],
        n_threads: usize,
        mode: RunMode,
        order: &[usize],
    ) -> Result<(), KernelError> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(KernelError::Invalid(format!(
                "n_threads must be in 1..=1024, got {n_threads}"
            )));
        }
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        if sorted != (0..n_threads).collect::<Vec<_>>() {
            return Err(KernelError::Invalid(
                "thread order must be a permutation of 0..n_threads".into(),
            ));
        }
        params.validate(inputs, out.len())?;
        let mut raw = params.to_raw(inputs, out.as_mut_ptr());
        let mut scratch = Scratch::for_params(&raw, n_threads);
        scratch.attach(&mut raw);
        let shared = SharedParams(&raw);
        let nth = n_threads as c_int;
        match mode {
            RunMode::Sequential => {
                for &ith in order {
                    // SAFETY: validated above; calls run one at a time.
                    unsafe { self.run_raw(shared.0, ith as c_int, nth) };
                }
            }
            RunMode::Parallel => std::thread::scope(|s| {
                let shared = &shared;
                for &ith in &order[1..] {
                    s.spawn(move || {
                        // SAFETY: validated above; the kernel's threads write
                        // disjoint parts of `out` and synchronise on scratch.
                        unsafe { self.run_raw(shared.0, ith as c_int, nth) };
                    });
                }
                // SAFETY: as above.
                unsafe { self.run_raw(shared.0, order[0] as c_int, nth) };
            }),
        }
        drop(scratch);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum RunMode {
    Parallel,
    Sequential,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

/// Scratch memory that lets the kernel split one unit's key range across threads (a decode
/// step has one unit): [`scratch_bytes`] for the parameters, 64-byte aligned and zeroed, as the
/// header requires. Calls that run one after another may share it (the kernel leaves it zeroed).
pub struct Scratch(Vec<CacheLine>);

impl Scratch {
    /// Scratch for `raw`'s shapes computed by `nth` threads (empty when no split is needed).
    pub fn for_params(raw: &RawAttnParams, nth: usize) -> Scratch {
        Scratch(vec![
            CacheLine([0; 64]);
            scratch_bytes(raw, nth).div_ceil(64)
        ])
    }

    /// Points `raw` at this scratch (leaves it unset when empty). The memory stays where it is
    /// when the `Scratch` moves; `raw` must not be used after the `Scratch` is dropped.
    pub fn attach(&mut self, raw: &mut RawAttnParams) {
        if !self.0.is_empty() {
            raw.scratch = self.0.as_mut_ptr().cast();
            raw.scratch_bytes = self.0.len() * 64;
        }
    }
}

struct SharedParams(*const RawAttnParams);
// SAFETY: the kernel is designed to be called concurrently with the same
// parameters from several threads (disjoint outputs, atomics in scratch).
unsafe impl Sync for SharedParams {}
unsafe impl Send for SharedParams {}

/// Element format of the K/V cache (values equal ggml's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// ggml's Q8_0: blocks of 32 int8 with one f16 scale (34 bytes).
    Q8_0,
}

impl KvType {
    /// Bytes of one row of `head_dim` elements.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvType::F32 => 4 * head_dim,
            KvType::F16 => 2 * head_dim,
            KvType::Q8_0 => head_dim / 32 * 34,
        }
    }

    /// Name as used by `--kv-type`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Alignment the kernels need for rows of this type.
    fn align(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
            KvType::Q8_0 => 1,
        }
    }

    fn raw(self) -> i32 {
        match self {
            KvType::F32 => ffi::mk_kv_type_MK_KV_F32 as i32,
            KvType::F16 => ffi::mk_kv_type_MK_KV_F16 as i32,
            KvType::Q8_0 => ffi::mk_kv_type_MK_KV_Q8_0 as i32,
        }
    }
}

/// Shapes and positions of one attention call (see `mistrald_kernels.h`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnParams {
    /// Elements per head; a multiple of 32, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; divides `n_head`.
    pub n_head_kv: usize,
    /// Sliding window: query at position i sees keys j with i - window < j <= i; 0 = unlimited.
    pub window: usize,
    /// Element format of the cache.
    pub kv_type: KvType,
    /// Ring size: position j lives in slot j % n_slots.
    pub n_slots: usize,
    /// Bytes between consecutive slots.
    pub slot_bytes: usize,
    /// Bytes between kv heads within a slot.
    pub head_bytes: usize,
    /// Absolute position of the first query (>= n_hist).
    pub pos0: u64,
    /// Cached history: positions [pos0 - n_hist, pos0), all in the ring.
    pub n_hist: usize,
    /// Query positions pos0 .. pos0 + n_q.
    pub n_q: usize,
    /// Score scale, usually 1/sqrt(head_dim).
    pub scale: f32,
}

/// Input buffers of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnInputs<'a> {
    /// `[n_q][n_head][head_dim]` queries (RoPE applied).
    pub q: &'a [f32],
    /// `[n_q][n_head_kv][head_dim]` keys of the query positions.
    pub k_new: &'a [f32],
    /// `[n_q][n_head_kv][head_dim]` values of the query positions.
    pub v_new: &'a [f32],
    /// Key ring: row (slot s, kv head h) at byte `s * slot_bytes + h * head_bytes`.
    pub k_cache: &'a [u8],
    /// Value ring, same layout as `k_cache`.
    pub v_cache: &'a [u8],
}

impl AttnParams {
    /// Dense layout: slots of `n_head_kv` rows without padding.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        head_dim: usize,
        n_head: usize,
        n_head_kv: usize,
        window: usize,
        kv_type: KvType,
        n_slots: usize,
        pos0: u64,
        n_hist: usize,
        n_q: usize,
    ) -> AttnParams {
        let head_bytes = kv_type.row_bytes(head_dim);
        AttnParams {
            head_dim,
            n_head,
            n_head_kv,
            window,
            kv_type,
            n_slots,
            slot_bytes: head_bytes * n_head_kv,
            head_bytes,
            pos0,
            n_hist,
            n_q,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Bytes a cache buffer needs for this layout.
    pub fn cache_bytes(&self) -> usize {
        (self.n_slots - 1) * self.slot_bytes
            + (self.n_head_kv - 1) * self.head_bytes
            + self.kv_type.row_bytes(self.head_dim)
    }

    /// Checks every size and bound of the kernel contract against the
    /// buffers (`out_len`: length of the output slice).
    pub fn validate(&self, inputs: &AttnInputs<'_>, out_len: usize) -> Result<(), KernelError> {
        let bad = |msg: String| Err(KernelError::Invalid(msg));
        let need = self.validate_layout()?;
        let d = self.head_dim;
        for (name, buf) in [("k_cache", inputs.k_cache), ("v_cache", inputs.v_cache)] {
            if buf.len() < need {
                return bad(format!(
                    "{name} has {} bytes, the ring of {} slots needs {need}",
                    buf.len(),
                    self.n_slots
                ));
            }
            let al = self.kv_type.align();
            if !(buf.as_ptr() as usize).is_multiple_of(al) {
                return bad(format!(
                    "{name} is not {al}-byte aligned as {} rows need",
                    self.kv_type.name()
                ));
            }
        }
        let nq_len = self.n_q.saturating_mul(self.n_head).saturating_mul(d);
        let nkv_len = self.n_q.saturating_mul(self.n_head_kv).saturating_mul(d);
        for (name, len, want) in [
            ("q", inputs.q.len(), nq_len),
            ("k_new", inputs.k_new.len(), nkv_len),
            ("v_new", inputs.v_new.len(), nkv_len),
            ("out", out_len, nq_len),
        ] {
            if len != want {
                return bad(format!(
                    "{name} has {len} elements, expected {want} (n_q {} x heads x head_dim {d})",
                    self.n_q
                ));
            }
        }
        Ok(())
    }

    /// Checks the shapes, positions and cache strides (everything but the
    /// buffers) and returns the bytes each cache buffer must span. The ggml
    /// op can call it when it builds the graph, then fill the raw block with
    /// [`AttnParams::to_raw_ptrs`].
    pub fn validate_layout(&self) -> Result<usize, KernelError> {
        let bad = |msg: String| Err(KernelError::Invalid(msg));
        let d = self.head_dim;
        if d == 0 || !d.is_multiple_of(32) || d > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {d} must be a positive multiple of 32, at most {MAX_HEAD_DIM}"
            ));
        }
        if self.n_head == 0 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head {} must be a positive multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_q == 0 {
            return bad("n_q must be at least 1".into());
        }
        if self.n_slots == 0 {
            return bad("n_slots must be at least 1".into());
        }
        if self.n_hist > self.n_slots {
            return bad(format!(
                "n_hist {} exceeds the ring size n_slots {}",
                self.n_hist, self.n_slots
            ));
        }
        if (self.n_hist as u64) > self.pos0 {
            return bad(format!(
                "n_hist {} exceeds pos0 {} (history would start before position 0)",
                self.n_hist, self.pos0
            ));
        }
        let fits_i32 = |v: usize| v <= i32::MAX as usize;
        if ![
            self.n_head,
            self.n_head_kv,
            self.window,
            self.n_slots,
            self.n_q,
        ]
        .into_iter()
        .all(fits_i32)
        {
            return bad("a count does not fit in 32 bits".into());
        }
        if self
            .pos0
            .checked_add(self.n_q as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return bad("pos0 + n_q overflows".into());
        }
        if !self.scale.is_finite() {
            return bad(format!("scale {} is not finite", self.scale));
        }
        // Any strides work (slot-major, head-major, padded) as long as rows
        // do not overlap within a dimension and every row lies in the buffer.
        let row = self.kv_type.row_bytes(d);
        if self.n_head_kv > 1 && self.head_bytes < row {
            return bad(format!(
                "head_bytes {} is smaller than a {} row of {d} elements ({row} bytes)",
                self.head_bytes,
                self.kv_type.name()
            ));
        }
        if self.n_slots > 1 && self.slot_bytes < row {
            return bad(format!(
                "slot_bytes {} is smaller than a {} row of {d} elements ({row} bytes)",
                self.slot_bytes,
                self.kv_type.name()
            ));
        }
        let need = (self.n_slots - 1)
            .checked_mul(self.slot_bytes)
            .and_then(|b| b.checked_add((self.n_head_kv - 1).checked_mul(self.head_bytes)?))
            .and_then(|b| b.checked_add(row))
            .ok_or_else(|| KernelError::Invalid("cache size overflows".into()))?;
        let al = self.kv_type.align();
        if !self.slot_bytes.is_multiple_of(al) || !self.head_bytes.is_multiple_of(al) {
            return bad(format!(
                "slot_bytes and head_bytes must be multiples of {al} for {} rows",
                self.kv_type.name()
            ));
        }
        Ok(need)
    }

    /// The raw parameter block (scratch unset); `validate` must have passed.
    fn to_raw(&self, inputs: &AttnInputs<'_>, out: *mut f32) -> RawAttnParams {
        self.to_raw_ptrs(
            inputs.q.as_ptr(),
            inputs.k_new.as_ptr(),
            inputs.v_new.as_ptr(),
            inputs.k_cache.as_ptr().cast(),
            inputs.v_cache.as_ptr().cast(),
            out,
        )
    }

    /// The raw parameter block for [`Kernel::run_raw`] from raw pointers
    /// (scratch unset). Building it is safe; using it requires
    /// [`AttnParams::validate_layout`] to have passed and the pointers to be
    /// valid for the sizes it implies (see [`Kernel::run_raw`]).
    pub fn to_raw_ptrs(
        &self,
        q: *const f32,
        k_new: *const f32,
        v_new: *const f32,
        k_cache: *const std::ffi::c_void,
        v_cache: *const std::ffi::c_void,
        out: *mut f32,
    ) -> RawAttnParams {
        RawAttnParams {
            head_dim: self.head_dim as i32,
            n_head: self.n_head as i32,
            n_head_kv: self.n_head_kv as i32,
            window: self.window as i32,
            kv_type: self.kv_type.raw(),
            n_slots: self.n_slots as i32,
            k_cache,
            v_cache,
            slot_bytes: self.slot_bytes,
            head_bytes: self.head_bytes,
            pos0: self.pos0 as i64,
            n_hist: self.n_hist as i64,
            n_q: self.n_q as i32,
            q,
            k_new,
            v_new,
            scale: self.scale,
            out,
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
        }
    }
}

/// Bytes of scratch memory the raw entry needs to split key ranges across
/// `nth` threads for these parameters (0: no split needed); [`Scratch`]
/// allocates it.
pub fn scratch_bytes(raw: &RawAttnParams, nth: usize) -> usize {
    // SAFETY: only reads the counts in `raw`.
    unsafe { ffi::mk_scratch_size(raw, nth.min(i32::MAX as usize) as c_int) }
}
