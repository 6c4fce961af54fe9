//! The native attention kernel as a node of the ggml graph (a custom operation), so it runs
//! inside the same graph computation as the rest of the forward pass, on ggml's threads.

use super::{scratch_bytes, Kernel, KvType, RawAttnParams};
use crate::ggml::{CustomOp, OpTensor};
use std::alloc::{alloc_zeroed, dealloc, Layout};

/// The fixed part of one attention call: everything except the data pointers, which the graph
/// only knows when it runs.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Width of one head.
    pub head_dim: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Attention window (0: full causal attention).
    pub window: usize,
    /// Cache element type.
    pub kv_type: KvType,
    /// Ring size of the cache.
    pub n_slots: usize,
    /// Bytes between consecutive slots of the cache.
    pub slot_bytes: usize,
    /// Bytes between KV heads within a slot.
    pub head_bytes: usize,
    /// Position of the first query.
    pub pos0: u64,
    /// Cached history positions `[pos0 - n_hist, pos0)` (all in the ring).
    pub n_hist: usize,
    /// Query positions.
    pub n_q: usize,
    /// Score scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// A ggml custom operation computing attention with the native kernel. Its arguments, in
/// order: `q` `[head_dim, n_head, n_q]`, `k_new` and `v_new` `[head_dim*n_head_kv, n_q]` (f32,
/// contiguous), then the key and value rings `[head_dim*n_head_kv, n_slots]`. Output:
/// `[head_dim, n_head, n_q]`.
pub struct AttentionOp {
    kernel: Kernel,
    params: RawAttnParams,
    scratch: *mut u8,
    scratch_layout: Option<Layout>,
}

// SAFETY: the kernel is made to be called concurrently with the same parameters from all
// compute threads (disjoint output rows; the scratch area is synchronised inside the kernel).
unsafe impl Send for AttentionOp {}
unsafe impl Sync for AttentionOp {}

impl AttentionOp {
    /// Prepares a call of `kernel` for `shape` computed by `n_threads` threads.
    pub fn new(kernel: Kernel, shape: &AttentionShape, n_threads: usize) -> AttentionOp {
        let mut params = RawAttnParams {
            head_dim: shape.head_dim as i32,
            n_head: shape.n_head as i32,
            n_head_kv: shape.n_head_kv as i32,
            window: shape.window.min(i32::MAX as usize) as i32,
            kv_type: kv_type_raw(shape.kv_type),
            n_slots: shape.n_slots as i32,
            k_cache: std::ptr::null(),
            v_cache: std::ptr::null(),
            slot_bytes: shape.slot_bytes,
            head_bytes: shape.head_bytes,
            pos0: shape.pos0 as i64,
            n_hist: shape.n_hist as i64,
            n_q: shape.n_q as i32,
            q: std::ptr::null(),
            k_new: std::ptr::null(),
            v_new: std::ptr::null(),
            scale: shape.scale,
            out: std::ptr::null_mut(),
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
        };
        let bytes = scratch_bytes(&params, n_threads);
        let mut op = AttentionOp {
            kernel,
            params,
            scratch: std::ptr::null_mut(),
            scratch_layout: None,
        };
        if bytes > 0 {
            if let Ok(layout) = Layout::from_size_align(bytes, 64) {
                // SAFETY: non-zero size; freed in Drop with the same layout.
                let p = unsafe { alloc_zeroed(layout) };
                if !p.is_null() {
                    op.scratch = p;
                    op.scratch_layout = Some(layout);
                    params.scratch = p.cast();
                    params.scratch_bytes = bytes;
                    op.params = params;
                }
            }
        }
        op
    }
}

fn kv_type_raw(t: KvType) -> i32 {
    match t {
        KvType::F32 => 0,
        KvType::F16 => 1,
        KvType::Q8_0 => 8,
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

impl Drop for AttentionOp {
    fn drop(&mut self) {
        if let Some(layout) = self.scratch_layout {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.scratch, layout) }
        }
    }
}
