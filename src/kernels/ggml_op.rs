//! The native attention kernel as a node of the ggml graph (a custom operation), so it runs
//! inside the same graph computation as the rest of the forward pass, on ggml's threads.

use super::{AttnParams, Kernel, KernelError, RawAttnParams, Scratch};
use crate::ggml::{CustomOp, OpTensor};

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
