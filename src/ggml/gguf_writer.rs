//! Writing GGUF files through ggml's gguf writer.
//!
//! Metadata and the tensor directory are laid out by ggml (`gguf_*` API); tensor data is then
//! streamed after the header tensor by tensor, so multi-gigabyte files never need to be held in
//! memory at once.

use super::context::Context;
use super::gguf::{value_type, GgufValue};
use super::sys;
use super::types::GgmlType;
use anyhow::{bail, Context as _};
use std::ffi::{c_char, CString};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::ptr::NonNull;

/// Builds a GGUF file: metadata values, then tensors (declared up front, data streamed on write).
pub struct GgufWriter {
    ctx: NonNull<sys::gguf_context>,
    tensor_ctx: Context,
    tensors: Vec<(String, GgmlType, Vec<i64>)>,
}

impl GgufWriter {
    /// An empty file with room for up to `max_tensors` tensors.
    pub fn new(max_tensors: usize) -> anyhow::Result<GgufWriter> {
        let ctx =
            NonNull::new(unsafe { sys::gguf_init_empty() }).context("gguf_init_empty failed")?;
        let tensor_ctx = Context::new((max_tensors + 1) * super::tensor_overhead(), true)?;
        Ok(GgufWriter {
            ctx,
            tensor_ctx,
            tensors: Vec::new(),
        })
    }

    fn key(key: &str) -> anyhow::Result<CString> {
        CString::new(key).with_context(|| format!("metadata key {key:?} contains NUL"))
    }

    /// Sets a metadata value (replacing any previous value of the key).
    pub fn set(&mut self, key: &str, value: &GgufValue) -> anyhow::Result<()> {
        let k = Self::key(key)?;
        let c = self.ctx.as_ptr();
        unsafe {
            match value {
                GgufValue::U8(v) => sys::gguf_set_val_u8(c, k.as_ptr(), *v),
                GgufValue::I8(v) => sys::gguf_set_val_i8(c, k.as_ptr(), *v),
                GgufValue::U16(v) => sys::gguf_set_val_u16(c, k.as_ptr(), *v),
                GgufValue::I16(v) => sys::gguf_set_val_i16(c, k.as_ptr(), *v),
                GgufValue::U32(v) => sys::gguf_set_val_u32(c, k.as_ptr(), *v),
                GgufValue::I32(v) => sys::gguf_set_val_i32(c, k.as_ptr(), *v),
                GgufValue::F32(v) => sys::gguf_set_val_f32(c, k.as_ptr(), *v),
                GgufValue::Bool(v) => sys::gguf_set_val_bool(c, k.as_ptr(), *v),
                GgufValue::U64(v) => sys::gguf_set_val_u64(c, k.as_ptr(), *v),
                GgufValue::I64(v) => sys::gguf_set_val_i64(c, k.as_ptr(), *v),
                GgufValue::F64(v) => sys::gguf_set_val_f64(c, k.as_ptr(), *v),
                GgufValue::Str(s) => {
                    let s = CString::new(s.as_str())
                        .with_context(|| format!("metadata '{key}' contains NUL"))?;
                    sys::gguf_set_val_str(c, k.as_ptr(), s.as_ptr())
                }
                GgufValue::Array(elem, items) => self.set_array(&k, key, *elem, items)?,
            }
        }
        Ok(())
    }

    unsafe fn set_array(
        &mut self,
        k: &CString,
        key: &str,
        elem: u32,
        items: &[GgufValue],
    ) -> anyhow::Result<()> {
        use value_type::*;
        let c = self.ctx.as_ptr();
        if elem == STRING {
            let owned: Vec<CString> = items
                .iter()
                .map(|v| match v {
                    GgufValue::Str(s) => CString::new(s.as_str())
                        .with_context(|| format!("'{key}' element contains NUL")),
                    _ => bail!("'{key}': mixed array"),
                })
                .collect::<anyhow::Result<_>>()?;
            let mut ptrs: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
            sys::gguf_set_arr_str(c, k.as_ptr(), ptrs.as_mut_ptr(), ptrs.len());
            return Ok(());
        }
        let mut bytes = Vec::new();
        for v in items {
            if v.type_id() != elem {
                bail!("'{key}': array element {v:?} does not match the array type {elem}");
            }
            match *v {
                GgufValue::U8(x) => bytes.push(x),
                GgufValue::I8(x) => bytes.push(x as u8),
                GgufValue::Bool(x) => bytes.push(x as u8),
                GgufValue::U16(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::I16(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::U32(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::I32(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::F32(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::U64(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::I64(x) => bytes.extend(x.to_le_bytes()),
                GgufValue::F64(x) => bytes.extend(x.to_le_bytes()),
                _ => bail!("'{key}': unsupported array element {v:?}"),
            }
        }
        sys::gguf_set_arr_data(c, k.as_ptr(), elem, bytes.as_ptr().cast(), items.len());
        Ok(())
    }

    /// Declares a tensor (its data is produced when the file is written). `ne` is innermost first.
    pub fn add_tensor(&mut self, name: &str, ty: GgmlType, ne: &[i64]) -> anyhow::Result<()> {
        if self.tensors.iter().any(|(n, ..)| n == name) {
            bail!("duplicate tensor name {name}");
        }
        let t = self.tensor_ctx.new_tensor(ty, ne).set_name(name);
        unsafe { sys::gguf_add_tensor(self.ctx.as_ptr(), t.raw()) };
        self.tensors.push((name.to_string(), ty, ne.to_vec()));
        Ok(())
    }

    /// Writes the file: header and metadata from ggml's writer, then each tensor's data as
    /// returned by `data(index, name, type, ne)` (exactly the tensor's byte size), padded to
    /// the file's alignment.
    pub fn write<F>(&self, path: &Path, mut data: F) -> anyhow::Result<()>
    where
        F: FnMut(usize, &str, GgmlType, &[i64]) -> anyhow::Result<Vec<u8>>,
    {
        let meta_len = unsafe { sys::gguf_get_meta_size(self.ctx.as_ptr()) };
        let mut meta = vec![0u8; meta_len];
        unsafe { sys::gguf_get_meta_data(self.ctx.as_ptr(), meta.as_mut_ptr().cast()) };
        let alignment = unsafe { sys::gguf_get_alignment(self.ctx.as_ptr()) };
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&meta)?;
        for (i, (name, ty, ne)) in self.tensors.iter().enumerate() {
            let bytes = data(i, name, *ty, ne)?;
            let expected = ty.row_bytes(ne[0] as u64).unwrap() as usize
                * ne[1..].iter().product::<i64>() as usize;
            if bytes.len() != expected {
                bail!(
                    "tensor {name}: {} bytes of data, expected {expected}",
                    bytes.len()
                );
            }
            out.write_all(&bytes)?;
            let pad = bytes.len().next_multiple_of(alignment) - bytes.len();
            out.write_all(&vec![0u8; pad])?;
        }
        out.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        unsafe { sys::gguf_free(self.ctx.as_ptr()) }
    }
}

/// Quantizes `n_rows` rows of `row_len` f32 values into `ty` with ggml's quantizers
/// (or converts to F16/F32).
pub fn quantize(ty: GgmlType, src: &[f32], row_len: usize) -> anyhow::Result<Vec<u8>> {
    if row_len == 0
        || !src.len().is_multiple_of(row_len)
        || !row_len.is_multiple_of(ty.block_size())
    {
        bail!(
            "quantize: {} values do not form rows of {row_len} for {ty}",
            src.len()
        );
    }
    let n_rows = src.len() / row_len;
    let row_bytes = ty.row_bytes(row_len as u64).unwrap() as usize;
    let mut out = vec![0u8; row_bytes * n_rows];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::I32 | GgmlType::I64 => bail!("quantize: {ty} is not a float type"),
        _ => {
            let written = unsafe {
                sys::ggml_quantize_chunk(
                    ty.id(),
                    src.as_ptr(),
                    out.as_mut_ptr().cast(),
                    0,
                    n_rows as i64,
                    row_len as i64,
                    std::ptr::null(),
                )
            };
            if written != out.len() {
                bail!(
                    "quantize: ggml wrote {written} bytes, expected {}",
                    out.len()
                );
            }
        }
    }
    Ok(out)
}

/// Converts `n` elements of `ty` stored in `bytes` to f32 with ggml's dequantizers.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
    let need = ty.row_bytes(n as u64).map(|b| b as usize);
    if need != Some(bytes.len()) {
        bail!(
            "dequantize: {} bytes do not hold {n} {ty} values",
            bytes.len()
        );
    }
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        GgmlType::I32 | GgmlType::I64 => bail!("dequantize: {ty} is not a float type"),
        _ => unsafe {
            let traits = sys::ggml_get_type_traits(ty.id());
            let to_float = (*traits).to_float.context("no dequantizer for this type")?;
            to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64);
        },
    }
    Ok(out)
}
