//! A validating GGUF reader (pure Rust, no ggml calls).
//!
//! ggml's own reader aborts the process on some malformed inputs, so mistrald parses the
//! header itself and checks every count, length, type, shape and offset against the file size
//! before anything reaches ggml. Tensor data is not copied: [`GgufFile`] records where each
//! tensor lives so the loader can use it in place from a memory map.

use super::types::{type_id_name, GgmlType};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The GGUF magic number, "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bound on keys/tensors a header may declare (real files have a few hundred).
const MAX_ENTRIES: u64 = 1 << 20;
/// Upper bound on one array's element count.
const MAX_ARRAY_LEN: u64 = 1 << 26;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// An array: the element type id and the elements (all of that type).
    Array(u32, Vec<GgufValue>),
}

/// GGUF value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v as f64),
            GgufValue::I16(v) => Some(v as f64),
            GgufValue::I32(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, v) => Some(v),
            _ => None,
        }
    }

    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        use value_type::*;
        match self {
            GgufValue::U8(_) => U8,
            GgufValue::I8(_) => I8,
            GgufValue::U16(_) => U16,
            GgufValue::I16(_) => I16,
            GgufValue::U32(_) => U32,
            GgufValue::I32(_) => I32,
            GgufValue::F32(_) => F32,
            GgufValue::Bool(_) => BOOL,
            GgufValue::Str(_) => STRING,
            GgufValue::U64(_) => U64,
            GgufValue::I64(_) => I64,
            GgufValue::F64(_) => F64,
            GgufValue::Array(..) => ARRAY,
        }
    }
}

/// Where and what one tensor is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, innermost first; unused dimensions are 1.
    pub ne: [u64; 4],
    /// Number of dimensions declared in the file.
    pub n_dims: u32,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

/// A parse or validation failure, naming the file.
#[derive(Debug)]
pub struct GgufError {
    /// The file being read.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for GgufError {}

/// The parsed header of a GGUF file: metadata, tensor directory and data section location.
#[derive(Clone, Debug)]
pub struct GgufFile {
    /// The file this was read from.
    pub path: PathBuf,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    /// Tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Alignment of tensor data.
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    /// Total file size.
    pub file_size: u64,
}

impl GgufFile {
    /// Parses and validates a whole GGUF file held in memory (typically a memory map).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<GgufFile, GgufError> {
        let err = |message: String| GgufError {
            path: path.to_path_buf(),
            message,
        };
        let mut r = Reader { bytes, pos: 0 };
        let magic = r
            .take(4)
            .map_err(|_| err(format!("not a GGUF file: only {} bytes", bytes.len())))?;
        if magic != GGUF_MAGIC {
            return Err(err(format!(
                "not a GGUF file: bad magic {:02x?} (expected \"GGUF\")",
                magic
            )));
        }
        let version = r.u32().map_err(|e| err(format!("truncated header: {e}")))?;
        if !(2..=3).contains(&version) {
            return Err(err(format!(
                "unsupported GGUF version {version} (supported: 2, 3)"
            )));
        }
        let n_tensors = r.u64().map_err(|e| err(format!("truncated header: {e}")))?;
        let n_kv = r.u64().map_err(|e| err(format!("truncated header: {e}")))?;
        if n_tensors > MAX_ENTRIES || n_tensors > bytes.len() as u64 {
            return Err(err(format!("absurd tensor count {n_tensors} in header")));
        }
        if n_kv > MAX_ENTRIES || n_kv > bytes.len() as u64 {
            return Err(err(format!("absurd metadata count {n_kv} in header")));
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = r
                .string()
                .map_err(|e| err(format!("metadata entry {i}: bad key: {e}")))?;
            let ty = r.u32().map_err(|e| err(format!("metadata '{key}': {e}")))?;
            let value = r
                .value(ty, 0)
                .map_err(|e| err(format!("metadata '{key}': {e}")))?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(err(format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(err(format!(
                        "invalid general.alignment {v:?}: must be a power of two"
                    )))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r
                .string()
                .map_err(|e| err(format!("tensor {i}: bad name: {e}")))?;
            let t = read_tensor_info(&mut r, name.clone(), alignment)
                .map_err(|e| err(format!("tensor '{name}': {e}")))?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(err(format!("duplicate tensor '{name}'")));
            }
            tensors.push(t);
        }

        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_size = bytes.len() as u64;
        let data_len = file_size.saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.size);
            if data_offset > file_size || end.is_none_or(|e| e > data_len) {
                return Err(err(format!(
                    "truncated file: tensor '{}' needs bytes {}..{} of the data section, which has only {} bytes (file size {})",
                    t.name,
                    t.offset,
                    t.offset.saturating_add(t.size),
                    data_len,
                    file_size
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            file_size,
        })
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A string metadata value, or an error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.error(format!("metadata '{key}' is not a string"))),
            None => Err(self.error(format!("missing metadata key '{key}'"))),
        }
    }

    /// An integer metadata value (if present), or an error if it has another type.
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    self.error(format!(
                        "metadata '{key}' is not a non-negative integer: {v:?}"
                    ))
                })
            })
            .transpose()
    }

    /// A float metadata value (if present), or an error if it has another type.
    pub fn get_f64_opt(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.error(format!("metadata '{key}' is not a number: {v:?}")))
            })
            .transpose()
    }

    /// An error about this file.
    pub fn error(&self, message: String) -> GgufError {
        GgufError {
            path: self.path.clone(),
            message,
        }
    }
}

fn read_tensor_info(
    r: &mut Reader<'_>,
    name: String,
    alignment: u64,
) -> Result<TensorInfo, String> {
    let n_dims = r.u32()?;
    if n_dims == 0 || n_dims > 4 {
        return Err(format!("{n_dims} dimensions (supported: 1 to 4)"));
    }
    let mut ne = [1u64; 4];
    for d in ne.iter_mut().take(n_dims as usize) {
        *d = r.u64()?;
        if *d == 0 || *d > 1 << 40 {
            return Err(format!("absurd dimension {d}"));
        }
    }
    let type_id = r.u32()?;
    let ty = GgmlType::from_id(type_id)
        .filter(|t| GgmlType::WEIGHT_TYPES.contains(t))
        .ok_or_else(|| format!("unsupported tensor type {}", type_id_name(type_id)))?;
    let offset = r.u64()?;
    if offset % alignment != 0 {
        return Err(format!(
            "data offset {offset} is not aligned to {alignment}"
        ));
    }
    let row = ty.row_bytes(ne[0]).ok_or_else(|| {
        format!(
            "row length {} is not a multiple of the {ty} block size {}",
            ne[0],
            ty.block_size()
        )
    })?;
    let size = ne[1..]
        .iter()
        .try_fold(row, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| "absurd size (overflows)".to_string())?;
    Ok(TensorInfo {
        name,
        ty,
        ne,
        n_dims,
        offset,
        size,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "unexpected end of file at byte {} (needed {n} more bytes, file size {})",
                self.pos,
                self.bytes.len()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("string at byte {} is not valid UTF-8", self.pos - b.len()))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue, String> {
        use value_type::*;
        Ok(match ty {
            U8 => GgufValue::U8(self.array::<1>()?[0]),
            I8 => GgufValue::I8(self.array::<1>()?[0] as i8),
            U16 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            I16 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            U32 => GgufValue::U32(self.u32()?),
            I32 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            F32 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            BOOL => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            STRING => GgufValue::Str(self.string()?),
            U64 => GgufValue::U64(self.u64()?),
            I64 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            F64 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            ARRAY => {
                if depth > 0 {
                    return Err("nested arrays are not supported".into());
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                let min_size = match elem {
                    U8 | I8 | BOOL => 1,
                    U16 | I16 => 2,
                    U32 | I32 | F32 => 4,
                    _ => 8,
                };
                let left = (self.bytes.len() - self.pos) as u64;
                if n > MAX_ARRAY_LEN || n.saturating_mul(min_size) > left {
                    return Err(format!(
                        "absurd array length {n} (only {left} bytes left in the file)"
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(elem, items)
            }
            other => return Err(format!("unknown value type {other}")),
        })
    }
}
