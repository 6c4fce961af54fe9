//! The native kernels as nodes of the ggml graph (custom operations), so they run inside the
//! same graph computation as the rest of the forward pass, on ggml's threads: attention
//! ([`AttentionOp`]) and the quantized matrix products ([`QuantizeOp`] then [`MatmulOp`]).

use super::matmul::{Matmul, PackedMatrix, RawMatmulParams};
use super::{AttnParams, Kernel, KernelError, RawAttnParams, Scratch};
use crate::ggml::{CustomOp, OpTensor};
use std::sync::Arc;

/// A ggml custom operation computing attention with the native kernel. Its arguments, in
/// order: `q` `[head_dim, n_head, n_q]`, `k_new` and `v_new` `[head_dim*n_head_kv, n_q]` (f32,
/// contiguous), then the key and value rings `[head_dim*n_head_kv, n_slots]`. Output:
/// `[head_dim, n_head, n_q]`.
pub struct AttentionOp {
    kernel: Kernel,
    params: RawAttnParams,
    /// Pointed to by `params` (when the kernel needs it); kept alive with them.
    _scratch: Scratch,
}

// SAFETY: the kernel is made to be called concurrently with the same parameters from all
// compute threads (disjoint output rows; the scratch area is synchronised inside the kernel).
unsafe impl Send for AttentionOp {}
unsafe impl Sync for AttentionOp {}

impl AttentionOp {
    /// Prepares a call of `kernel` for `params` (data pointers are filled in when the graph
    /// runs), computed by `n_threads` threads. Fails if the shapes break the kernel's contract.
    pub fn new(
        kernel: Kernel,
        params: &AttnParams,
        n_threads: usize,
    ) -> Result<AttentionOp, KernelError> {
        params.validate_layout()?;
        let (nf, nv) = (
            std::ptr::null::<f32>(),
            std::ptr::null::<std::ffi::c_void>(),
        );
        let mut params = params.to_raw_ptrs(nf, nf, nf, nv, nv, std::ptr::null_mut());
        let mut scratch = Scratch::for_params(&params, n_threads);
        scratch.attach(&mut params);
        Ok(AttentionOp {
            kernel,
            params,
            _scratch: scratch,
        })
    }
}

impl CustomOp for AttentionOp {
    fn compute(&self, dst: OpTensor, srcs: &[OpTensor], ith: usize, nth: usize) {
        let mut p = self.params;
        p.q = srcs[0].data as *const f32;
        p.k_new = srcs[1].data as *const f32;
        p.v_new = srcs[2].data as *const f32;
        p.k_cache = srcs[3].data;
        p.v_cache = srcs[4].data;
        p.out = dst.data as *mut f32;
        // SAFETY: the graph builder created this op with shapes matching `params` (checked
        // there), the tensors are allocated while the graph runs, and ggml calls every
        // ith in 0..nth exactly once.
        unsafe { self.kernel.run_raw(&p, ith as i32, nth as i32) }
    }
}

/// Quantizes a batch of activation rows for the native matrix kernels, as its own graph node:
/// every compute thread quantizes a range of 8-row chunks (the node before and the products
/// after it are separated by ggml's barriers), and the products that read the same input share
/// the result. Argument: `x` `[n_cols, rows]` f32 (rows may be strided). Output: an f32 tensor
/// of [`QuantizeOp::output_len`] elements holding the quantized bytes.
pub struct QuantizeOp {
    rows: usize,
    n_cols: usize,
}

impl QuantizeOp {
    /// The node for `rows` rows of `n_cols` values; fails for shapes the kernels do not take.
    pub fn new(rows: usize, n_cols: usize) -> Result<QuantizeOp, KernelError> {
        super::matmul::quantized_acts_bytes(rows, n_cols)?;
        Ok(QuantizeOp { rows, n_cols })
    }

    /// Elements (f32) of the output tensor: the quantized bytes / 4.
    pub fn output_len(&self) -> usize {
        super::matmul::quantized_acts_bytes(self.rows, self.n_cols).expect("checked in new") / 4
    }
}

impl CustomOp for QuantizeOp {
    fn compute(&self, dst: OpTensor, srcs: &[OpTensor], ith: usize, nth: usize) {
        let x = srcs[0];
        debug_assert_eq!(
            (x.ne[0] as usize, x.ne[1] as usize, x.nb[0]),
            (self.n_cols, self.rows, 4)
        );
        debug_assert!(dst.ne[0] as usize >= self.output_len());
        // SAFETY: the graph builder checked the argument's shape (n_cols x rows of f32, row
        // stride nb[1]) and sized the output for the quantized bytes; each thread writes its
        // own chunks.
        let rc = unsafe {
            super::matmul::quantize_part_raw(
                x.data as *const f32,
                x.nb[1] / 4,
                self.rows,
                self.n_cols,
                dst.data as *mut u8,
                ith,
                nth,
            )
        };
        debug_assert_eq!(rc, 0);
    }
}

/// `y = W·x` with a native matrix kernel on a packed weight matrix, as a graph node. Its
/// argument is either the output of a [`QuantizeOp`] over `x` ([`MatmulOp::new`], for big
/// batches: quantized once by all threads), or `x` itself ([`MatmulOp::with_f32_input`], at
/// most 8 rows: each thread quantizes it into its own scratch, which saves the quantization
/// node and its barrier per input). Output: `[n_rows, rows]` f32.
pub struct MatmulOp {
    matmul: Matmul,
    weights: Arc<PackedMatrix>,
    rows: usize,
    /// Per-thread scratch for the f32 input (`None`: the input is quantized already).
    scratch: Option<(Vec<super::CacheLine>, *mut u8, usize)>,
}

// SAFETY: the scratch is written by the op's threads in disjoint parts (the kernel's contract);
// everything else is read-only.
unsafe impl Send for MatmulOp {}
unsafe impl Sync for MatmulOp {}

impl MatmulOp {
    /// The product of `weights` with `rows` activation rows quantized by a [`QuantizeOp`].
    pub fn new(
        matmul: Matmul,
        weights: Arc<PackedMatrix>,
        rows: usize,
    ) -> Result<MatmulOp, KernelError> {
        super::matmul::quantized_acts_bytes(rows, weights.n_cols())?;
        Ok(MatmulOp {
            matmul,
            weights,
            rows,
            scratch: None,
        })
    }

    /// The product of `weights` with `rows` (at most 8) f32 activation rows, which each of the
    /// `n_threads` threads computing the graph quantizes itself.
    pub fn with_f32_input(
        matmul: Matmul,
        weights: Arc<PackedMatrix>,
        rows: usize,
        n_threads: usize,
    ) -> Result<MatmulOp, KernelError> {
        if rows > super::matmul::MAX_ROWS || n_threads == 0 {
            return Err(KernelError::InvalidMatmul(format!(
                "per-thread quantization takes 1..={} rows and at least one thread",
                super::matmul::MAX_ROWS
            )));
        }
        let bytes = super::matmul::quantized_acts_bytes(rows, weights.n_cols())? * n_threads;
        let mut lines = vec![super::CacheLine([0; 64]); bytes.div_ceil(64)];
        let ptr = lines.as_mut_ptr().cast::<u8>();
        Ok(MatmulOp {
            matmul,
            weights,
            rows,
            scratch: Some((lines, ptr, bytes)),
        })
    }
}

impl CustomOp for MatmulOp {
    fn compute(&self, dst: OpTensor, srcs: &[OpTensor], ith: usize, nth: usize) {
        let w = &self.weights;
        debug_assert_eq!(
            (dst.ne[0] as usize, dst.ne[1] as usize),
            (w.n_rows(), self.rows)
        );
        let mut p = RawMatmulParams {
            wtype: w.ty().ggml().id() as i32,
            nr: self.rows as i32,
            n_rows: w.n_rows() as i64,
            n_cols: w.n_cols() as i64,
            w: w.as_ptr().cast(),
            x: std::ptr::null(),
            x_stride: w.n_cols() as i64,
            xq: std::ptr::null(),
            y: dst.data as *mut f32,
            y_stride: (dst.nb[1] / 4) as i64,
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
        };
        match &self.scratch {
            None => p.xq = srcs[0].data,
            Some((_, ptr, bytes)) => {
                let x = srcs[0];
                debug_assert_eq!((x.ne[0] as usize, x.nb[0]), (w.n_cols(), 4));
                p.x = x.data as *const f32;
                p.x_stride = (x.nb[1] / 4) as i64;
                p.scratch = (*ptr).cast();
                p.scratch_bytes = *bytes;
            }
        }
        // SAFETY: the packed matrix lives as long as this op; the argument holds the rows
        // (quantized by a QuantizeOp of the same shape, or f32 with the checked row stride),
        // the output is `[n_rows, rows]` f32, the scratch was sized for the graph's thread
        // count (the C side checks it against nth); threads write disjoint output rows and
        // their own parts of the scratch.
        let rc = unsafe { self.matmul.run_raw(&p, ith as i32, nth as i32) };
        if rc != 0 && ith == 0 {
            // Cannot happen with the graph's own thread count; make it visible, not silent.
            log::error!("native matrix product rejected its parameters ({nth} threads)");
            let n = (dst.nb[1] / 4) * self.rows;
            // SAFETY: the output holds `rows` rows of nb[1] bytes; every thread failed alike,
            // so no other thread writes it.
            unsafe { std::slice::from_raw_parts_mut(dst.data as *mut f32, n) }.fill(f32::NAN);
        }
    }
}
