//! ggml element types that mistrald reads or writes.

use super::sys;
use std::fmt;

/// An element type of a ggml tensor: plain floats, integers for indices, and the block
/// quantization formats found in Mistral GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    I32,
    I64,
}

impl GgmlType {
    /// Every type a weight tensor may have.
    pub const WEIGHT_TYPES: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Maps ggml's numeric type id (as stored in GGUF) to a supported type.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            sys::GGML_TYPE_F32 => GgmlType::F32,
            sys::GGML_TYPE_F16 => GgmlType::F16,
            sys::GGML_TYPE_Q4_0 => GgmlType::Q4_0,
            sys::GGML_TYPE_Q4_1 => GgmlType::Q4_1,
            sys::GGML_TYPE_Q5_0 => GgmlType::Q5_0,
            sys::GGML_TYPE_Q5_1 => GgmlType::Q5_1,
            sys::GGML_TYPE_Q8_0 => GgmlType::Q8_0,
            sys::GGML_TYPE_Q4_K => GgmlType::Q4K,
            sys::GGML_TYPE_Q5_K => GgmlType::Q5K,
            sys::GGML_TYPE_Q6_K => GgmlType::Q6K,
            sys::GGML_TYPE_I32 => GgmlType::I32,
            sys::GGML_TYPE_I64 => GgmlType::I64,
            _ => return None,
        })
    }

    /// ggml's numeric type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => sys::GGML_TYPE_F32,
            GgmlType::F16 => sys::GGML_TYPE_F16,
            GgmlType::Q4_0 => sys::GGML_TYPE_Q4_0,
            GgmlType::Q4_1 => sys::GGML_TYPE_Q4_1,
            GgmlType::Q5_0 => sys::GGML_TYPE_Q5_0,
            GgmlType::Q5_1 => sys::GGML_TYPE_Q5_1,
            GgmlType::Q8_0 => sys::GGML_TYPE_Q8_0,
            GgmlType::Q4K => sys::GGML_TYPE_Q4_K,
            GgmlType::Q5K => sys::GGML_TYPE_Q5_K,
            GgmlType::Q6K => sys::GGML_TYPE_Q6_K,
            GgmlType::I32 => sys::GGML_TYPE_I32,
            GgmlType::I64 => sys::GGML_TYPE_I64,
        }
    }

    /// Parses a lowercase type name such as `q4_0`, `q4_k` or `f16`.
    pub fn parse(name: &str) -> Option<GgmlType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "q4_0" => GgmlType::Q4_0,
            "q4_1" => GgmlType::Q4_1,
            "q5_0" => GgmlType::Q5_0,
            "q5_1" => GgmlType::Q5_1,
            "q8_0" => GgmlType::Q8_0,
            "q4_k" => GgmlType::Q4K,
            "q5_k" => GgmlType::Q5K,
            "q6_k" => GgmlType::Q6K,
            _ => return None,
        })
    }

    /// The lowercase name (`q4_0`, `q6_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
            GgmlType::I32 => "i32",
            GgmlType::I64 => "i64",
        }
    }

    /// Number of elements in one block (1 for plain types, 32 or 256 for quantized ones).
    pub fn block_size(self) -> usize {
        unsafe { sys::ggml_blck_size(self.id()) as usize }
    }

    /// Size in bytes of one block.
    pub fn block_bytes(self) -> usize {
        unsafe { sys::ggml_type_size(self.id()) }
    }

    /// Whether this is a block-quantized type.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Size in bytes of a row of `n` elements, or `None` if `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name ggml gives a numeric type id, for error messages about unsupported types.
pub fn type_id_name(id: u32) -> String {
    if id < sys::GGML_TYPE_COUNT {
        let p = unsafe { sys::ggml_type_name(id) };
        if !p.is_null() {
            return unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned();
        }
    }
    format!("type id {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml_layouts() {
        assert_eq!(GgmlType::F32.row_bytes(4096), Some(16384));
        assert_eq!(GgmlType::Q4_0.block_size(), 32);
        assert_eq!(GgmlType::Q4_0.block_bytes(), 18);
        assert_eq!(GgmlType::Q8_0.block_bytes(), 34);
        assert_eq!(GgmlType::Q6K.block_size(), 256);
        assert_eq!(GgmlType::Q4_0.row_bytes(33), None);
        for t in GgmlType::WEIGHT_TYPES {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::parse(t.name()), Some(t));
        }
    }
}
