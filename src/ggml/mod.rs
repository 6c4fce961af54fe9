//! A thin, safe wrapper over ggml: the only module of mistrald that touches ggml's raw FFI.
//!
//! - [`types`]: element types (F32, F16, the quantized block formats) and their sizes.
//! - [`context`]: [`Context`] owns a `ggml_context`; [`Tensor`] is a handle to one of its tensors,
//!   and the graph operations the Mistral forward pass needs are methods of [`Context`].
//! - [`backend`]: the CPU backend (thread count, graph compute), backend buffers (including one
//!   wrapping a memory-mapped file) and the graph allocator that reuses activation memory.
//! - [`device`]: GPU devices (Vulkan/CUDA builds), their memory and buffer types, and the
//!   backend scheduler that runs a graph across a GPU and the CPU.
//! - [`gguf_writer`]: writing GGUF files through ggml's own gguf writer.
//!
//! ggml aborts the process when one of its assertions fails, so every public function here either
//! checks the preconditions ggml asserts on, or is only reachable with shapes that the model
//! loader validated beforehand (documented on each function).

pub mod backend;
pub mod context;
pub mod device;
pub mod gguf;
pub mod gguf_writer;
pub mod types;

pub use backend::{BackendBuffer, CpuBackend, GraphAllocator, RepackBufferType};
pub use context::{Context, CustomOp, Graph, OpHandle, OpTensor, Tensor};
pub use device::{BufferType, Device, DeviceKind, GpuBackend, Scheduler};
pub use types::GgmlType;

use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

/// Routes ggml's log output to the `log` crate and makes ggml print a clear note before it
/// aborts. Called once, lazily, by every constructor in this module.
pub(crate) fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        sys::ggml_log_set(Some(ggml_log_callback), std::ptr::null_mut());
        sys::ggml_set_abort_callback(Some(ggml_abort_callback));
    });
}

unsafe extern "C" fn ggml_log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    let msg = CStr::from_ptr(text).to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() || msg == "." {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => log::error!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => log::debug!(target: "ggml", "{msg}"),
        _ => log::trace!(target: "ggml", "{msg}"),
    }
}

unsafe extern "C" fn ggml_abort_callback(message: *const c_char) {
    let msg = if message.is_null() {
        "(no message)".into()
    } else {
        CStr::from_ptr(message).to_string_lossy()
    };
    eprintln!("mistrald: internal error inside ggml, aborting: {msg}");
}

/// The size in bytes of one tensor's metadata inside a ggml context.
pub fn tensor_overhead() -> usize {
    unsafe { sys::ggml_tensor_overhead() }
}

/// Converts IEEE half-precision values to f32 (ggml's conversion).
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: length mismatch");
    unsafe { sys::ggml_fp16_to_fp32_row(src.as_ptr(), dst.as_mut_ptr(), src.len() as i64) }
}

/// Converts f32 values to IEEE half precision (ggml's conversion, round to nearest).
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16: length mismatch");
    unsafe { sys::ggml_fp32_to_fp16_row(src.as_ptr(), dst.as_mut_ptr(), src.len() as i64) }
}
