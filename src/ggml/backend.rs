//! The ggml CPU backend, backend buffers and the graph allocator.

use super::context::{Context, Graph, Tensor};
use super::sys;
use std::ptr::NonNull;

/// ggml's CPU backend: computes graphs with a fixed number of worker threads, kept in a
/// persistent thread pool (no thread start-up per graph).
pub struct CpuBackend {
    ptr: NonNull<sys::ggml_backend>,
    pool: Option<NonNull<sys::ggml_threadpool>>,
    n_threads: usize,
}

// The backend is used by one thread at a time (the engine thread).
unsafe impl Send for CpuBackend {}

impl CpuBackend {
    /// Creates the backend with `n_threads` compute threads (at least 1).
    pub fn new(n_threads: usize) -> anyhow::Result<CpuBackend> {
        super::init_logging();
        let n_threads = n_threads.clamp(1, 512);
        let ptr = NonNull::new(unsafe { sys::ggml_backend_cpu_init() })
            .ok_or_else(|| anyhow::anyhow!("failed to initialize the ggml CPU backend"))?;
        let pool = if n_threads > 1 {
            let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
            NonNull::new(unsafe { sys::ggml_threadpool_new(&mut params) })
        } else {
            None
        };
        unsafe {
            sys::ggml_backend_cpu_set_n_threads(ptr.as_ptr(), n_threads as i32);
            if let Some(pool) = pool {
                sys::ggml_backend_cpu_set_threadpool(ptr.as_ptr(), pool.as_ptr());
            }
        }
        Ok(CpuBackend {
            ptr,
            pool,
            n_threads,
        })
    }

    /// Number of compute threads.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Puts the worker threads to sleep now instead of letting them poll for the next graph
    /// (they do for a while after each computation, keeping the cores busy); the next
    /// [`compute`](Self::compute) wakes them. For benchmarks that time other code in between.
    pub fn pause(&self) {
        if let Some(pool) = self.pool {
            // SAFETY: the pool is alive (owned by self); pausing an idle pool only sets a flag
            // and the workers wait on its condition variable.
            unsafe { sys::ggml_threadpool_pause(pool.as_ptr()) }
        }
    }

    /// Runs every node of `graph`. All tensors must be allocated.
    pub fn compute(&self, graph: &Graph<'_>) -> anyhow::Result<()> {
        let status = unsafe { sys::ggml_backend_graph_compute(self.ptr.as_ptr(), graph.raw()) };
        if status != sys::GGML_STATUS_SUCCESS {
            anyhow::bail!("ggml graph computation failed (status {status})");
        }
        Ok(())
    }

    /// The raw backend, for the scheduler.
    pub(crate) fn raw(&self) -> sys::ggml_backend_t {
        self.ptr.as_ptr()
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        unsafe {
            sys::ggml_backend_free(self.ptr.as_ptr());
            if let Some(pool) = self.pool {
                sys::ggml_threadpool_free(pool.as_ptr());
            }
        }
    }
}

/// A ggml backend buffer: memory that tensors are placed in. Freed on drop.
pub struct BackendBuffer {
    ptr: NonNull<sys::ggml_backend_buffer>,
}

unsafe impl Send for BackendBuffer {}

impl BackendBuffer {
    /// Takes ownership of a buffer ggml allocated.
    pub(crate) fn from_raw(ptr: NonNull<sys::ggml_backend_buffer>) -> BackendBuffer {
        BackendBuffer { ptr }
    }

    /// Wraps existing host memory (`ptr`, `len` bytes) — e.g. a memory-mapped model file — as a
    /// CPU buffer, without copying. `ptr` must be 32-byte aligned and outlive the buffer.
    ///
    /// # Safety
    /// The memory must stay valid and unchanged for the buffer's life; ggml only reads it.
    pub unsafe fn from_host_memory(ptr: *const u8, len: usize) -> anyhow::Result<BackendBuffer> {
        anyhow::ensure!(
            (ptr as usize).is_multiple_of(32),
            "tensor data is not 32-byte aligned"
        );
        let buf = sys::ggml_backend_cpu_buffer_from_ptr(ptr as *mut _, len);
        let ptr = NonNull::new(buf).ok_or_else(|| anyhow::anyhow!("failed to wrap host memory"))?;
        Ok(BackendBuffer { ptr })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr.as_ptr()) }
    }

    /// Places `tensor` (of a `no_alloc` context) at byte `offset` of this buffer.
    pub fn place(&self, tensor: Tensor<'_>, offset: usize) -> anyhow::Result<()> {
        let end = offset.checked_add(tensor.nbytes());
        anyhow::ensure!(
            end.is_some_and(|e| e <= self.size()),
            "tensor {} ({} bytes at offset {offset}) does not fit in its buffer of {} bytes",
            tensor.name(),
            tensor.nbytes(),
            self.size()
        );
        anyhow::ensure!(
            !tensor.is_allocated(),
            "tensor {} is already placed",
            tensor.name()
        );
        let base = unsafe { sys::ggml_backend_buffer_get_base(self.ptr.as_ptr()) } as *mut u8;
        let status = unsafe {
            sys::ggml_backend_tensor_alloc(self.ptr.as_ptr(), tensor.raw(), base.add(offset).cast())
        };
        anyhow::ensure!(
            status == sys::GGML_STATUS_SUCCESS,
            "failed to place tensor {}",
            tensor.name()
        );
        Ok(())
    }
}

impl Drop for BackendBuffer {
    fn drop(&mut self) {
        unsafe { sys::ggml_backend_buffer_free(self.ptr.as_ptr()) }
    }
}

/// ggml's graph allocator: places a graph's intermediate tensors in one CPU buffer, reusing
/// memory between tensors whose lifetimes don't overlap. The buffer grows to the largest graph
/// seen and is reused for every later graph.
pub struct GraphAllocator {
    ptr: NonNull<sys::ggml_gallocr>,
}

unsafe impl Send for GraphAllocator {}

impl GraphAllocator {
    /// A new allocator over CPU memory.
    pub fn new() -> anyhow::Result<GraphAllocator> {
        let a = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        NonNull::new(a)
            .map(|ptr| GraphAllocator { ptr })
            .ok_or_else(|| anyhow::anyhow!("failed to create the ggml graph allocator"))
    }

    /// Allocates every not-yet-placed tensor of `graph`.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> anyhow::Result<()> {
        let ok = unsafe { sys::ggml_gallocr_alloc_graph(self.ptr.as_ptr(), graph.raw()) };
        anyhow::ensure!(ok, "out of memory allocating the compute graph");
        Ok(())
    }

    /// Bytes of the allocator's buffer.
    pub fn buffer_size(&self) -> usize {
        unsafe { sys::ggml_gallocr_get_buffer_size(self.ptr.as_ptr(), 0) }
    }
}

impl Drop for GraphAllocator {
    fn drop(&mut self) {
        unsafe { sys::ggml_gallocr_free(self.ptr.as_ptr()) }
    }
}

/// ggml's `CPU_REPACK` buffer type: weight matrices placed in it are converted at load time to
/// an interleaved layout that ggml's CPU matrix kernels multiply faster (Q4_0, Q4_K, ... with
/// AVX2/AVX-512 or NEON). ggml's other extra buffer types — in particular AMX, which faults on
/// machines whose CPU advertises it while the kernel or hypervisor does not allow it — are never
/// used.
pub struct RepackBufferType {
    buft: sys::ggml_backend_buffer_type_t,
    dev: sys::ggml_backend_dev_t,
}

// The buffer type and device are process-wide ggml singletons.
unsafe impl Send for RepackBufferType {}
unsafe impl Sync for RepackBufferType {}

impl RepackBufferType {
    /// The repack buffer type, if this build of ggml has one for this CPU.
    pub fn find() -> Option<RepackBufferType> {
        super::init_logging();
        unsafe {
            let reg = sys::ggml_backend_cpu_reg();
            if reg.is_null() {
                return None;
            }
            let dev = sys::ggml_backend_reg_dev_get(reg, 0);
            let name = c"ggml_backend_dev_get_extra_bufts";
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if f.is_null() || dev.is_null() {
                return None;
            }
            let get: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(f);
            let mut list = get?(dev);
            while !list.is_null() && !(*list).is_null() {
                let buft = *list;
                let n = std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(buft));
                if n.to_bytes() == b"CPU_REPACK" {
                    return Some(RepackBufferType { buft, dev });
                }
                list = list.add(1);
            }
            None
        }
    }

    /// Whether ggml can repack `weight` (a 2-D matrix used as `mul_mat`'s first operand).
    pub fn supports(&self, weight: Tensor<'_>) -> bool {
        let ne = weight.ne();
        if ne[2] != 1 || ne[3] != 1 {
            return false;
        }
        let Ok(ctx) = Context::new(4 * super::tensor_overhead(), true) else {
            return false;
        };
        unsafe {
            let probe = ctx.new_tensor(weight.ty(), &[ne[0], ne[1]]);
            let input = ctx.new_tensor(super::GgmlType::F32, &[ne[0], 1]);
            let op = ctx.mul_mat(probe, input);
            // A zero-sized buffer of the repack type marks where the weight would live.
            let dummy = sys::ggml_backend_buft_alloc_buffer(self.buft, 0);
            if dummy.is_null() {
                return false;
            }
            (*probe.raw()).buffer = dummy;
            let ok = sys::ggml_backend_dev_supports_op(self.dev, op.raw());
            (*probe.raw()).buffer = std::ptr::null_mut();
            sys::ggml_backend_buffer_free(dummy);
            ok
        }
    }

    /// The repack buffer type, to place tensors in.
    pub fn buffer_type(&self) -> super::BufferType {
        super::BufferType::from_raw(self.buft)
    }
}
