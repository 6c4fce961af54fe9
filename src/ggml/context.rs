//! ggml contexts, tensor handles, graph operations and compute graphs.

use super::sys;
use super::types::GgmlType;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Owns a `ggml_context`: the arena holding tensor metadata (and, unless created with
/// `no_alloc`, tensor data). Freed on drop, together with every tensor it holds.
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
}

// A context is only ever used from one thread at a time (it is moved, not shared).
unsafe impl Send for Context {}

impl Context {
    /// Creates a context with `mem_size` bytes of arena. With `no_alloc`, tensors get metadata
    /// only and their data is placed later by a backend buffer or the graph allocator.
    pub fn new(mem_size: usize, no_alloc: bool) -> anyhow::Result<Context> {
        super::init_logging();
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc,
        };
        let ptr = unsafe { sys::ggml_init(params) };
        NonNull::new(ptr).map(|ptr| Context { ptr }).ok_or_else(|| {
            anyhow::anyhow!("ggml_init failed to allocate a {mem_size}-byte context")
        })
    }

    /// A metadata-only context with room for `n_tensors` tensors and one graph of `graph_size` nodes.
    pub fn for_graph(n_tensors: usize, graph_size: usize) -> anyhow::Result<Context> {
        let graph_bytes = unsafe { sys::ggml_graph_overhead_custom(graph_size, false) };
        Context::new(
            n_tensors * super::tensor_overhead() + graph_bytes + 1024,
            true,
        )
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    /// Bytes of arena still free.
    fn free_bytes(&self) -> usize {
        unsafe { sys::ggml_get_mem_size(self.raw()) - sys::ggml_used_mem(self.raw()) }
    }

    fn wrap(&self, t: *mut sys::ggml_tensor) -> Tensor<'_> {
        Tensor {
            ptr: NonNull::new(t).expect("ggml returned a null tensor"),
            _ctx: PhantomData,
        }
    }

    fn ensure_room(&self) {
        // ggml aborts when the arena is exhausted; fail with a Rust panic (a bug, not bad input).
        assert!(
            self.free_bytes() >= super::tensor_overhead(),
            "ggml context arena exhausted (graph larger than planned)"
        );
    }

    /// A new tensor of `ty` with up to four dimensions `ne` (innermost first).
    pub fn new_tensor(&self, ty: GgmlType, ne: &[i64]) -> Tensor<'_> {
        assert!(!ne.is_empty() && ne.len() <= 4, "tensor rank must be 1..=4");
        assert!(
            ne.iter().all(|&n| n > 0),
            "tensor dimensions must be positive: {ne:?}"
        );
        assert!(
            ne[0] % ty.block_size() as i64 == 0,
            "row length {} is not a multiple of the {ty} block size",
            ne[0]
        );
        self.ensure_room();
        let t = unsafe { sys::ggml_new_tensor(self.raw(), ty.id(), ne.len() as i32, ne.as_ptr()) };
        self.wrap(t)
    }

    /// Looks a tensor up by name.
    pub fn get_tensor(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        let t = unsafe { sys::ggml_get_tensor(self.raw(), c.as_ptr()) };
        NonNull::new(t).map(|ptr| Tensor {
            ptr,
            _ctx: PhantomData,
        })
    }

    /// A new compute graph with room for `size` nodes.
    pub fn new_graph(&self, size: usize) -> Graph<'_> {
        let g = unsafe { sys::ggml_new_graph_custom(self.raw(), size, false) };
        Graph {
            ptr: NonNull::new(g).expect("ggml_new_graph_custom returned null"),
            _ctx: PhantomData,
        }
    }

    // ---- operations (each creates a node in this context) ----------------------------------

    /// Rows of `a` selected by the I32 indices `rows` (dequantized to f32).
    pub fn get_rows(&self, a: Tensor<'_>, rows: Tensor<'_>) -> Tensor<'_> {
        assert_eq!(rows.ty(), GgmlType::I32);
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_get_rows(self.raw(), a.raw(), rows.raw()) })
    }

    /// Writes the f32 rows of `src` into rows `rows` (I64) of `dst`, converting to `dst`'s
    /// type; returns a view of `dst` that depends on the write.
    pub fn set_rows(&self, dst: Tensor<'_>, src: Tensor<'_>, rows: Tensor<'_>) -> Tensor<'_> {
        assert_eq!(dst.ne()[0], src.ne()[0], "set_rows: row length mismatch");
        assert_eq!(src.ne()[1], rows.ne()[0], "set_rows: index count mismatch");
        assert_eq!(rows.ty(), GgmlType::I64);
        assert_eq!(src.ty(), GgmlType::F32);
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_set_rows(self.raw(), dst.raw(), src.raw(), rows.raw()) })
    }

    /// RMS normalization over the first dimension.
    pub fn rms_norm(&self, a: Tensor<'_>, eps: f32) -> Tensor<'_> {
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_rms_norm(self.raw(), a.raw(), eps) })
    }

    /// Element-wise product, `b` broadcast over `a`.
    pub fn mul(&self, a: Tensor<'_>, b: Tensor<'_>) -> Tensor<'_> {
        assert!(
            can_repeat(b, a),
            "mul: {:?} does not broadcast to {:?}",
            b.ne(),
            a.ne()
        );
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_mul(self.raw(), a.raw(), b.raw()) })
    }

    /// Element-wise sum, `b` broadcast over `a`.
    pub fn add(&self, a: Tensor<'_>, b: Tensor<'_>) -> Tensor<'_> {
        assert!(
            can_repeat(b, a),
            "add: {:?} does not broadcast to {:?}",
            b.ne(),
            a.ne()
        );
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_add(self.raw(), a.raw(), b.raw()) })
    }

    /// Matrix product `a^T b`: `a` is `[k, m, ...]`, `b` is `[k, n, ...]`, the result is
    /// `[m, n, ...]` (f32). `a`'s outer dimensions broadcast over `b`'s (grouped-query attention).
    pub fn mul_mat(&self, a: Tensor<'_>, b: Tensor<'_>) -> Tensor<'_> {
        let (na, nb) = (a.ne(), b.ne());
        assert!(
            na[0] == nb[0] && nb[2] % na[2] == 0 && nb[3] % na[3] == 0,
            "mul_mat: shapes {na:?} x {nb:?} do not match"
        );
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_mul_mat(self.raw(), a.raw(), b.raw()) })
    }

    /// SwiGLU: `silu(gate) * up`.
    pub fn swiglu(&self, gate: Tensor<'_>, up: Tensor<'_>) -> Tensor<'_> {
        assert_eq!(gate.ne(), up.ne(), "swiglu: shape mismatch");
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_swiglu_split(self.raw(), gate.raw(), up.raw()) })
    }

    /// Rotary position embedding, ggml "normal" mode (adjacent pairs rotated), over the first
    /// `n_dims` of each head. `x` is `[head_dim, n_head, n_tokens]`, `pos` is I32 `[n_tokens]`.
    pub fn rope_normal(
        &self,
        x: Tensor<'_>,
        pos: Tensor<'_>,
        n_dims: i32,
        n_ctx_orig: i32,
        freq_base: f32,
    ) -> Tensor<'_> {
        assert_eq!(pos.ty(), GgmlType::I32);
        assert_eq!(x.ne()[2], pos.ne()[0], "rope: one position per token");
        self.ensure_room();
        let t = unsafe {
            sys::ggml_rope_ext(
                self.raw(),
                x.raw(),
                pos.raw(),
                std::ptr::null_mut(),
                n_dims,
                0, // GGML_ROPE_TYPE_NORMAL
                n_ctx_orig,
                freq_base,
                1.0,  // freq_scale
                0.0,  // ext_factor (no YaRN)
                1.0,  // attn_factor
                32.0, // beta_fast (unused without YaRN)
                1.0,  // beta_slow
            )
        };
        self.wrap(t)
    }

    /// Fused attention: `q` `[d, n_q, n_head]`, `k`/`v` `[d, n_kv, n_head_kv]`, `mask` F16
    /// `[n_kv, n_q]` (0 or -inf). Result `[d, n_head, n_q]`.
    pub fn flash_attn(
        &self,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Tensor<'_>,
        scale: f32,
    ) -> Tensor<'_> {
        let (nq, nk, nv, nm) = (q.ne(), k.ne(), v.ne(), mask.ne());
        assert!(nq[0] == nk[0] && nk[1] == nv[1] && nk[2] == nv[2] && nq[2] % nk[2] == 0);
        assert!(
            mask.ty() == GgmlType::F16 && mask.is_contiguous() && nm[0] == nk[1] && nm[1] >= nq[1]
        );
        self.ensure_room();
        self.wrap(unsafe {
            sys::ggml_flash_attn_ext(
                self.raw(),
                q.raw(),
                k.raw(),
                v.raw(),
                mask.raw(),
                scale,
                0.0,
                0.0,
            )
        })
    }

    /// Concatenation of `a` and `b` along dimension `dim`.
    pub fn concat(&self, a: Tensor<'_>, b: Tensor<'_>, dim: usize) -> Tensor<'_> {
        let (na, nb) = (a.ne(), b.ne());
        assert!(
            (0..4).all(|d| d == dim || na[d] == nb[d]),
            "concat: shapes {na:?} and {nb:?}"
        );
        assert_eq!(a.ty(), b.ty());
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_concat(self.raw(), a.raw(), b.raw(), dim as i32) })
    }

    /// A contiguous copy of `a`.
    pub fn cont(&self, a: Tensor<'_>) -> Tensor<'_> {
        self.ensure_room();
        self.wrap(unsafe { sys::ggml_cont(self.raw(), a.raw()) })
    }

    /// Reinterprets contiguous `a` with a new shape of the same element count.
    pub fn reshape(&self, a: Tensor<'_>, ne: &[i64]) -> Tensor<'_> {
        assert!(a.is_contiguous(), "reshape of a non-contiguous tensor");
        assert_eq!(
            ne.iter().product::<i64>(),
            a.n_elements(),
            "reshape changes the element count"
        );
        self.ensure_room();
        let t = unsafe {
            match *ne {
                [a0] => sys::ggml_reshape_1d(self.raw(), a.raw(), a0),
                [a0, a1] => sys::ggml_reshape_2d(self.raw(), a.raw(), a0, a1),
                [a0, a1, a2] => sys::ggml_reshape_3d(self.raw(), a.raw(), a0, a1, a2),
                [a0, a1, a2, a3] => sys::ggml_reshape_4d(self.raw(), a.raw(), a0, a1, a2, a3),
                _ => panic!("reshape rank must be 1..=4"),
            }
        };
        self.wrap(t)
    }

    /// A view into `a` with shape `ne`, byte strides `nb` (one fewer than `ne`: dimensions
    /// 1.. of the view) and byte `offset`. Panics if the view reaches outside `a`.
    pub fn view(&self, a: Tensor<'_>, ne: &[i64], nb: &[usize], offset: usize) -> Tensor<'_> {
        assert!(!ne.is_empty() && ne.len() <= 3 && nb.len() == ne.len() - 1);
        let row = a
            .ty()
            .row_bytes(ne[0] as u64)
            .expect("view row is not whole blocks") as usize;
        let last = ne
            .iter()
            .skip(1)
            .zip(nb)
            .map(|(&n, &s)| (n as usize - 1) * s)
            .sum::<usize>();
        assert!(
            offset + last + row <= a.nbytes(),
            "view reaches outside its tensor"
        );
        self.ensure_room();
        let t = unsafe {
            match (ne, nb) {
                ([a0], []) => sys::ggml_view_1d(self.raw(), a.raw(), *a0, offset),
                ([a0, a1], [b1]) => sys::ggml_view_2d(self.raw(), a.raw(), *a0, *a1, *b1, offset),
                ([a0, a1, a2], [b1, b2]) => {
                    sys::ggml_view_3d(self.raw(), a.raw(), *a0, *a1, *a2, *b1, *b2, offset)
                }
                _ => unreachable!(),
            }
        };
        self.wrap(t)
    }

    /// Permutes the axes of `a` (axis `i` moves to position `axes[i]`).
    pub fn permute(&self, a: Tensor<'_>, axes: [i32; 4]) -> Tensor<'_> {
        self.ensure_room();
        self.wrap(unsafe {
            sys::ggml_permute(self.raw(), a.raw(), axes[0], axes[1], axes[2], axes[3])
        })
    }

    /// A custom operation: `op.compute` is called once per compute thread (`ith` of `nth`)
    /// to produce an f32 tensor of shape `ne` from `args`. The returned [`OpHandle`] must be
    /// kept alive until the graph has been computed.
    pub fn custom_op(
        &self,
        ne: [i64; 4],
        args: &[Tensor<'_>],
        op: Box<dyn CustomOp>,
    ) -> (Tensor<'_>, OpHandle) {
        assert!(args.len() <= 8, "custom op with more than 8 arguments");
        self.ensure_room();
        let handle = OpHandle(Box::new(op));
        let userdata = &*handle.0 as *const Box<dyn CustomOp> as *mut std::ffi::c_void;
        let mut raw: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.raw()).collect();
        let t = unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                sys::GGML_TYPE_F32,
                ne[0],
                ne[1],
                ne[2],
                ne[3],
                raw.as_mut_ptr(),
                raw.len() as i32,
                Some(custom_op_trampoline),
                -1, // GGML_N_TASKS_MAX: as many tasks as threads
                userdata,
            )
        };
        (self.wrap(t), handle)
    }
}

fn can_repeat(small: Tensor<'_>, big: Tensor<'_>) -> bool {
    let (s, b) = (small.ne(), big.ne());
    (0..4).all(|i| s[i] > 0 && b[i] % s[i] == 0)
}

impl Drop for Context {
    fn drop(&mut self) {
        unsafe { sys::ggml_free(self.ptr.as_ptr()) }
    }
}

/// A handle to a tensor living in a [`Context`] (valid as long as the context is).
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'ctx> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    /// Re-binds the handle to the lifetime `'b`.
    ///
    /// # Safety
    /// The tensor's context must outlive every use of the returned handle.
    pub unsafe fn detach<'b>(self) -> Tensor<'b> {
        Tensor {
            ptr: self.ptr,
            _ctx: PhantomData,
        }
    }

    fn get(&self) -> &sys::ggml_tensor {
        unsafe { self.ptr.as_ref() }
    }

    /// Element counts per dimension (innermost first).
    pub fn ne(self) -> [i64; 4] {
        self.get().ne
    }

    /// Byte strides per dimension.
    pub fn nb(self) -> [usize; 4] {
        self.get().nb
    }

    /// Element type.
    pub fn ty(self) -> GgmlType {
        GgmlType::from_id(self.get().type_).expect("tensor of a type mistrald does not use")
    }

    /// Total element count.
    pub fn n_elements(self) -> i64 {
        self.ne().iter().product()
    }

    /// Total size in bytes.
    pub fn nbytes(self) -> usize {
        unsafe { sys::ggml_nbytes(self.raw()) }
    }

    /// Whether the elements are laid out without gaps.
    pub fn is_contiguous(self) -> bool {
        unsafe { sys::ggml_is_contiguous(self.raw()) }
    }

    /// The tensor's name.
    pub fn name(self) -> String {
        unsafe { std::ffi::CStr::from_ptr(self.get().name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Sets the tensor's name (truncated to ggml's 63 bytes).
    pub fn set_name(self, name: &str) -> Self {
        let c = CString::new(name.replace('\0', "")).unwrap_or_default();
        unsafe { sys::ggml_set_name(self.raw(), c.as_ptr()) };
        self
    }

    /// Marks the tensor as a graph input (the allocator keeps it for `set_*` calls).
    pub fn mark_input(self) -> Self {
        unsafe { sys::ggml_set_input(self.raw()) };
        self
    }

    /// Marks the tensor as a graph output (the allocator never reuses its memory).
    pub fn mark_output(self) -> Self {
        unsafe { sys::ggml_set_output(self.raw()) };
        self
    }

    /// Whether the tensor has memory (from a backend buffer, allocator or context).
    pub fn is_allocated(self) -> bool {
        !self.get().data.is_null()
    }

    /// Raw pointer to the tensor's data (null before allocation).
    pub fn data_ptr(self) -> *mut std::ffi::c_void {
        self.get().data
    }

    /// Copies `src` into the tensor, which must be allocated, contiguous and of a matching
    /// type and size.
    pub fn write<T: Element>(self, src: &[T]) {
        assert!(self.is_allocated(), "write to an unallocated tensor");
        assert!(
            T::matches(self.ty()),
            "write of the wrong element type into {}",
            self.ty()
        );
        assert_eq!(
            std::mem::size_of_val(src),
            self.nbytes(),
            "write size mismatch"
        );
        unsafe { sys::ggml_backend_tensor_set(self.raw(), src.as_ptr().cast(), 0, self.nbytes()) }
    }

    /// Copies the tensor (allocated, contiguous, f32) out.
    pub fn read_f32(self) -> Vec<f32> {
        assert!(self.is_allocated(), "read of an unallocated tensor");
        assert_eq!(self.ty(), GgmlType::F32);
        assert!(self.is_contiguous());
        let mut out = vec![0f32; self.n_elements() as usize];
        unsafe {
            sys::ggml_backend_tensor_get(self.raw(), out.as_mut_ptr().cast(), 0, self.nbytes())
        };
        out
    }
}

/// Plain element types that can be copied into tensors.
pub trait Element: Copy {
    /// Whether a tensor of type `t` stores this element type.
    fn matches(t: GgmlType) -> bool;
}
impl Element for f32 {
    fn matches(t: GgmlType) -> bool {
        t == GgmlType::F32
    }
}
impl Element for i32 {
    fn matches(t: GgmlType) -> bool {
        t == GgmlType::I32
    }
}
impl Element for i64 {
    fn matches(t: GgmlType) -> bool {
        t == GgmlType::I64
    }
}
impl Element for u16 {
    fn matches(t: GgmlType) -> bool {
        t == GgmlType::F16
    }
}
impl Element for u8 {
    fn matches(_: GgmlType) -> bool {
        true
    }
}

/// A compute graph living in a [`Context`].
pub struct Graph<'ctx> {
    ptr: NonNull<sys::ggml_cgraph>,
    _ctx: PhantomData<&'ctx Context>,
}

impl Graph<'_> {
    pub(crate) fn raw(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }

    /// Adds `t` and everything it depends on (not yet in the graph) to the graph, in
    /// dependency order. Nodes run in the order they were added.
    pub fn expand(&mut self, t: Tensor<'_>) {
        unsafe { sys::ggml_build_forward_expand(self.raw(), t.raw()) }
    }

    /// Number of operation nodes.
    pub fn n_nodes(&self) -> usize {
        unsafe { sys::ggml_graph_n_nodes(self.raw()) as usize }
    }
}

/// The data and layout of a tensor as a custom operation sees it during compute.
#[derive(Clone, Copy, Debug)]
pub struct OpTensor {
    /// Start of the tensor's data.
    pub data: *mut std::ffi::c_void,
    /// Element counts per dimension.
    pub ne: [i64; 4],
    /// Byte strides per dimension.
    pub nb: [usize; 4],
}

/// Computation of a custom graph node (see [`Context::custom_op`]).
pub trait CustomOp: Send + Sync {
    /// Computes thread `ith`'s share (of `nth`) of `dst` from `srcs` (the op's arguments, in
    /// order). Called concurrently from every compute thread.
    fn compute(&self, dst: OpTensor, srcs: &[OpTensor], ith: usize, nth: usize);
}

/// Keeps a custom operation alive while its graph exists.
pub struct OpHandle(#[allow(dead_code)] Box<Box<dyn CustomOp>>);

unsafe extern "C" fn custom_op_trampoline(
    dst: *mut sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut std::ffi::c_void,
) {
    let view = |t: *const sys::ggml_tensor| {
        let t = &*t;
        OpTensor {
            data: t.data,
            ne: t.ne,
            nb: t.nb,
        }
    };
    let d = &*dst;
    let mut srcs = [OpTensor {
        data: std::ptr::null_mut(),
        ne: [0; 4],
        nb: [0; 4],
    }; 8];
    let mut n = 0;
    while n < 8 && !d.src[n].is_null() {
        srcs[n] = view(d.src[n]);
        n += 1;
    }
    let op = &*(userdata as *const Box<dyn CustomOp>);
    op.compute(view(dst), &srcs[..n], ith as usize, nth as usize);
}
