//! ggml's compute devices — GPUs, through the Vulkan or CUDA backend when the build has one —
//! their memory, and the backend scheduler that runs one graph across a GPU and the CPU.
//!
//! A build without the `vulkan` or `cuda` feature has no GPU devices: [`Device::gpus`] is empty.

use super::backend::{BackendBuffer, CpuBackend};
use super::context::{Context, Graph, Tensor};
use super::sys;
use std::ffi::CStr;
use std::ptr::NonNull;

/// What kind of device ggml reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// A discrete GPU with its own memory.
    Gpu,
    /// An integrated GPU sharing the system's memory (Jetson, Raspberry Pi 5).
    IntegratedGpu,
    /// An accelerator ggml uses alongside the CPU (BLAS and the like).
    Accelerator,
}

impl DeviceKind {
    /// A short name (`cpu`, `gpu`, `igpu`, `accel`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "igpu",
            DeviceKind::Accelerator => "accel",
        }
    }
}

/// A compute device registered with ggml (a process-wide singleton, so the handle is `Copy`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Device {
    dev: sys::ggml_backend_dev_t,
}

// Devices are immutable ggml singletons; their functions are thread-safe.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.name())
    }
}

impl Device {
    /// Every device ggml knows in this build (the CPU included).
    pub fn all() -> Vec<Device> {
        super::init_logging();
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            .filter_map(|i| {
                let dev = unsafe { sys::ggml_backend_dev_get(i) };
                (!dev.is_null()).then_some(Device { dev })
            })
            .collect()
    }

    /// The GPUs (discrete and integrated), in ggml's order.
    pub fn gpus() -> Vec<Device> {
        Device::all()
            .into_iter()
            .filter(|d| matches!(d.kind(), DeviceKind::Gpu | DeviceKind::IntegratedGpu))
            .collect()
    }

    /// The GPU called `name` (ggml's name such as `Vulkan0` or `CUDA0`, or its description),
    /// compared without regard to case. The error lists the GPUs there are.
    pub fn find_gpu(name: &str) -> anyhow::Result<Device> {
        let gpus = Device::gpus();
        if let Some(d) = gpus.iter().find(|d| {
            d.name().eq_ignore_ascii_case(name) || d.description().eq_ignore_ascii_case(name)
        }) {
            return Ok(*d);
        }
        if gpus.is_empty() {
            anyhow::bail!("GPU device '{name}' not found: {}", no_gpu_reason());
        }
        let list: Vec<String> = gpus
            .iter()
            .map(|d| format!("{} ({})", d.name(), d.description()))
            .collect();
        anyhow::bail!(
            "GPU device '{name}' not found; this machine has: {}",
            list.join(", ")
        )
    }

    /// ggml's name for the device (`Vulkan0`, `CUDA0`, `CPU`).
    pub fn name(&self) -> String {
        cstr(unsafe { sys::ggml_backend_dev_name(self.dev) })
    }

    /// The driver's description (e.g. `NVIDIA Orin (nvgpu)`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub fn description(&self) -> String {
        cstr(unsafe { sys::ggml_backend_dev_description(self.dev) })
    }

    /// The device's kind.
    pub fn kind(&self) -> DeviceKind {
        match unsafe { sys::ggml_backend_dev_type(self.dev) } {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            _ => DeviceKind::Accelerator,
        }
    }

    /// `(free, total)` bytes of the device's memory, as its driver reports them now.
    pub fn memory(&self) -> (u64, u64) {
        let (mut free, mut total) = (0usize, 0usize);
        unsafe { sys::ggml_backend_dev_memory(self.dev, &mut free, &mut total) };
        (free as u64, total as u64)
    }

    /// In words: `Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)), gpu, 1024 of 2048 MiB free`.
    pub fn summary(&self) -> String {
        let (free, total) = self.memory();
        format!(
            "{} ({}), {}, {} of {} MiB free",
            self.name(),
            self.description(),
            self.kind().name(),
            free >> 20,
            total >> 20
        )
    }

    /// The device's own memory, where weights and caches placed on it live.
    pub fn buffer_type(&self) -> BufferType {
        let _first_use = DEVICE_INIT.lock().unwrap_or_else(|e| e.into_inner());
        BufferType {
            buft: unsafe { sys::ggml_backend_dev_buffer_type(self.dev) },
        }
    }

    /// Starts a backend (a compute stream) on the device.
    pub fn start(&self) -> anyhow::Result<GpuBackend> {
        let _first_use = DEVICE_INIT.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = NonNull::new(unsafe { sys::ggml_backend_dev_init(self.dev, std::ptr::null()) })
            .ok_or_else(|| {
            anyhow::anyhow!("failed to initialize the ggml backend of {}", self.name())
        })?;
        Ok(GpuBackend { ptr, device: *self })
    }
}

/// Held while a device's buffer type is fetched or a backend started: ggml's Vulkan backend
/// creates its device object on the first of these calls and publishes it before it is built,
/// so a second thread arriving meanwhile would use a half-made device (a crash seen with two
/// engines loading at once). Every other use of a device comes after one of these calls.
static DEVICE_INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Why there is no GPU: the build has no GPU backend, or the backend found no device.
pub fn no_gpu_reason() -> &'static str {
    if cfg!(any(feature = "vulkan", feature = "cuda")) {
        "ggml's GPU backend found no GPU (for a CPU Vulkan driver such as lavapipe set GGML_VK_VISIBLE_DEVICES)"
    } else {
        "this build has no GPU backend (build with `--features vulkan` or `--features cuda`)"
    }
}

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A kind of memory tensors can be placed in (a device's, or the CPU's).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BufferType {
    buft: sys::ggml_backend_buffer_type_t,
}

// Buffer types are immutable ggml singletons.
unsafe impl Send for BufferType {}
unsafe impl Sync for BufferType {}

impl std::fmt::Debug for BufferType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferType({})", self.name())
    }
}

impl BufferType {
    /// Wraps a buffer type ggml returned.
    pub(crate) fn from_raw(buft: sys::ggml_backend_buffer_type_t) -> BufferType {
        BufferType { buft }
    }

    /// Ordinary CPU memory.
    pub fn cpu() -> BufferType {
        BufferType {
            buft: unsafe { sys::ggml_backend_cpu_buffer_type() },
        }
    }

    /// ggml's name for it (`CPU`, `Vulkan0`, `CUDA0`).
    pub fn name(&self) -> String {
        cstr(unsafe { sys::ggml_backend_buft_name(self.buft) })
    }

    /// Bytes `t` needs in a buffer of this type.
    pub fn alloc_size(&self, t: Tensor<'_>) -> usize {
        unsafe { sys::ggml_backend_buft_get_alloc_size(self.buft, t.raw()) }
    }

    /// Alignment of tensors in a buffer of this type.
    pub fn alignment(&self) -> usize {
        unsafe { sys::ggml_backend_buft_get_alignment(self.buft) }.max(1)
    }

    /// A new buffer of `size` bytes (contents undefined).
    pub fn alloc(&self, size: usize) -> anyhow::Result<BackendBuffer> {
        let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(self.buft, size.max(1)) };
        let ptr = NonNull::new(buf).ok_or_else(|| {
            anyhow::anyhow!("out of {} memory allocating {size} bytes", self.name())
        })?;
        Ok(BackendBuffer::from_raw(ptr))
    }

    /// Allocates every tensor of `ctx` (a `no_alloc` context) in one new buffer, zeroed.
    pub fn alloc_context_tensors(&self, ctx: &Context) -> anyhow::Result<BackendBuffer> {
        let buf = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.raw(), self.buft) };
        let ptr = NonNull::new(buf)
            .ok_or_else(|| anyhow::anyhow!("out of {} memory allocating tensors", self.name()))?;
        unsafe { sys::ggml_backend_buffer_clear(ptr.as_ptr(), 0) };
        Ok(BackendBuffer::from_raw(ptr))
    }
}

/// A backend running graphs on a GPU.
pub struct GpuBackend {
    ptr: NonNull<sys::ggml_backend>,
    device: Device,
}

// Used by one thread at a time (the engine thread).
unsafe impl Send for GpuBackend {}

impl GpuBackend {
    /// The device it runs on.
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Drop for GpuBackend {
    fn drop(&mut self) {
        unsafe { sys::ggml_backend_free(self.ptr.as_ptr()) }
    }
}

/// ggml's backend scheduler over a GPU backend and the CPU backend: splits each graph into runs
/// of operations per backend — an operation runs where its weights live, or on the CPU when the
/// GPU cannot do it (mistrald's custom operations) — and copies activations between them.
pub struct Scheduler {
    ptr: NonNull<sys::ggml_backend_sched>,
    capacity: usize,
}

// Used by one thread at a time (the engine thread).
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// A scheduler for graphs of up to `capacity` nodes over `gpu` (preferred) and `cpu`.
    pub fn new(gpu: &GpuBackend, cpu: &CpuBackend, capacity: usize) -> anyhow::Result<Scheduler> {
        let mut backends = [gpu.ptr.as_ptr(), cpu.raw()];
        let ptr = unsafe {
            sys::ggml_backend_sched_new(
                backends.as_mut_ptr(),
                std::ptr::null_mut(),
                backends.len() as i32,
                capacity,
                false,
                false,
            )
        };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| anyhow::anyhow!("failed to create the ggml backend scheduler"))?;
        Ok(Scheduler { ptr, capacity })
    }

    /// The most graph nodes it was created for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Assigns `graph`'s operations to backends and allocates its intermediate tensors. The
    /// graph must have at most [`Scheduler::capacity`] nodes.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> anyhow::Result<()> {
        anyhow::ensure!(
            graph.n_nodes() <= self.capacity,
            "graph of {} nodes exceeds the scheduler's {}",
            graph.n_nodes(),
            self.capacity
        );
        unsafe { sys::ggml_backend_sched_reset(self.ptr.as_ptr()) };
        let ok = unsafe { sys::ggml_backend_sched_alloc_graph(self.ptr.as_ptr(), graph.raw()) };
        anyhow::ensure!(ok, "out of memory allocating the compute graph");
        Ok(())
    }

    /// Runs `graph` (allocated by [`Scheduler::alloc`]).
    pub fn compute(&mut self, graph: &Graph<'_>) -> anyhow::Result<()> {
        let status =
            unsafe { sys::ggml_backend_sched_graph_compute(self.ptr.as_ptr(), graph.raw()) };
        anyhow::ensure!(
            status == sys::GGML_STATUS_SUCCESS,
            "ggml graph computation failed (status {status})"
        );
        Ok(())
    }

    /// Bytes of compute buffer the scheduler holds on `gpu`'s device and on the CPU.
    pub fn buffer_sizes(&self, gpu: &GpuBackend, cpu: &CpuBackend) -> (usize, usize) {
        unsafe {
            (
                sys::ggml_backend_sched_get_buffer_size(self.ptr.as_ptr(), gpu.ptr.as_ptr()),
                sys::ggml_backend_sched_get_buffer_size(self.ptr.as_ptr(), cpu.raw()),
            )
        }
    }

    /// Number of backend switches in the last graph (1: it ran on one backend).
    pub fn n_splits(&self) -> usize {
        unsafe { sys::ggml_backend_sched_get_n_splits(self.ptr.as_ptr()) }.max(0) as usize
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        unsafe { sys::ggml_backend_sched_free(self.ptr.as_ptr()) }
    }
}
