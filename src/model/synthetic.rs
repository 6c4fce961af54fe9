//! Random-weight Mistral-shaped GGUF files, for tests and benchmarks (no real weights can be
//! downloaded on the machines mistrald is developed on).
//!
//! Files are written through ggml's gguf writer with the real 32000-token Llama/Mistral
//! SentencePiece vocabulary (embedded from `tests/data/`), so every tool works on them: the
//! tokenizer, chat templates, generation, benchmarks. Weights are uniform noise with a small
//! standard deviation, quantized with ggml's own quantizers.

use crate::ggml::gguf::{GgufFile, GgufValue};
use crate::ggml::gguf_writer::{quantize, GgufWriter};
use crate::ggml::GgmlType;
use std::path::Path;

/// The vocabulary-only GGUF the synthetic models borrow their tokenizer from.
pub const VOCAB_GGUF: &[u8] = include_bytes!("../../tests/data/ggml-vocab-llama-spm.gguf");

/// The shape and contents of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Model width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Trained context length recorded in the file.
    pub n_ctx: usize,
    /// Sliding window recorded in the file (`None`: no key, as in released Mistral GGUFs).
    pub sliding_window: Option<usize>,
    /// Type of the weight matrices (norms are always f32).
    pub weight_type: GgmlType,
    /// Type of the token embeddings.
    pub embd_type: GgmlType,
    /// `Some`: a `_M` mix like llama.cpp's Q4_K_M — this type for the output matrix and for
    /// `attn_v` and `ffn_down` in the blocks [`more_bits`] picks, `weight_type` elsewhere.
    pub more_bits_type: Option<GgmlType>,
    /// Seed of the weights.
    pub seed: u64,
    /// `general.architecture`.
    pub arch: String,
}

impl SyntheticSpec {
    /// A tiny model for tests: 2 layers, width 128, 4 query heads and 2 KV heads of width 32.
    pub fn tiny(weight_type: GgmlType) -> SyntheticSpec {
        SyntheticSpec {
            n_layer: 2,
            n_embd: 128,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 256,
            n_ctx: 2048,
            sliding_window: None,
            weight_type,
            embd_type: weight_type,
            more_bits_type: None,
            seed: 42,
            arch: "llama".into(),
        }
    }

    /// Mistral 7B's shape: 32 layers, width 4096, 32/8 heads, FFN 14336, window 4096.
    pub fn mistral_7b(weight_type: GgmlType) -> SyntheticSpec {
        SyntheticSpec {
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            n_ff: 14336,
            n_ctx: 32768,
            sliding_window: None,
            weight_type,
            embd_type: weight_type,
            more_bits_type: None,
            seed: 7,
            arch: "llama".into(),
        }
    }

    /// A small but not tiny model (about 60M parameters) for demos and quick benchmarks.
    pub fn small(weight_type: GgmlType) -> SyntheticSpec {
        SyntheticSpec {
            n_layer: 8,
            n_embd: 512,
            n_head: 8,
            n_head_kv: 2,
            n_ff: 1536,
            n_ctx: 8192,
            sliding_window: Some(4096),
            weight_type,
            embd_type: weight_type,
            more_bits_type: None,
            seed: 1,
            arch: "llama".into(),
        }
    }
}

/// Deterministic noise (xorshift64*), uniform in [-1, 1).
struct Noise(u64);

impl Noise {
    fn new(seed: u64, stream: u64) -> Noise {
        Noise((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)).max(1))
    }

    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((r >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Values of tensor `index` with `n` elements: norms near 1, weights uniform with std `std`.
fn tensor_values(seed: u64, index: usize, name: &str, n: usize, std: f32) -> Vec<f32> {
    let mut noise = Noise::new(seed, index as u64 + 1);
    if name.contains("norm") {
        (0..n).map(|_| 1.0 + 0.1 * noise.next()).collect()
    } else {
        let a = std * 3f32.sqrt();
        (0..n).map(|_| a * noise.next()).collect()
    }
}

/// Whether block `i` of `n` gets the `_M` mixes' extra bits in `attn_v` and `ffn_down`: the
/// first and last eighth of the blocks and every third block between them (llama.cpp's rule).
pub fn more_bits(i: usize, n: usize) -> bool {
    // (Past the first clause i >= n / 8, so the subtraction cannot underflow.)
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// One tensor of a model file: name, type, dimensions (innermost first).
pub type TensorDecl = (String, GgmlType, Vec<i64>);

/// The tensors of a Mistral model of `spec`'s shape, in file order.
pub fn synthetic_tensors(spec: &SyntheticSpec) -> Vec<TensorDecl> {
    let n_vocab = vocab_size();
    let head_dim = spec.n_embd / spec.n_head;
    let kv = head_dim * spec.n_head_kv;
    let mut tensors: Vec<TensorDecl> = vec![
        (
            "token_embd.weight".into(),
            spec.embd_type,
            vec![spec.n_embd as i64, n_vocab as i64],
        ),
        (
            "output_norm.weight".into(),
            GgmlType::F32,
            vec![spec.n_embd as i64],
        ),
        (
            "output.weight".into(),
            spec.more_bits_type.unwrap_or(spec.weight_type),
            vec![spec.n_embd as i64, n_vocab as i64],
        ),
    ];
    let (e, q, kv, ff) = (
        spec.n_embd as i64,
        spec.n_embd as i64,
        kv as i64,
        spec.n_ff as i64,
    );
    for i in 0..spec.n_layer {
        let t = spec.weight_type;
        let more = match spec.more_bits_type {
            Some(m) if more_bits(i, spec.n_layer) => m,
            _ => t,
        };
        for (name, ty, ne) in [
            ("attn_norm", GgmlType::F32, vec![e]),
            ("attn_q", t, vec![e, q]),
            ("attn_k", t, vec![e, kv]),
            ("attn_v", more, vec![e, kv]),
            ("attn_output", t, vec![q, e]),
            ("ffn_norm", GgmlType::F32, vec![e]),
            ("ffn_gate", t, vec![e, ff]),
            ("ffn_up", t, vec![e, ff]),
            ("ffn_down", more, vec![ff, e]),
        ] {
            tensors.push((format!("blk.{i}.{name}.weight"), ty, ne));
        }
    }
    tensors
}

fn vocab() -> GgufFile {
    GgufFile::parse(VOCAB_GGUF, Path::new("embedded vocabulary"))
        .expect("embedded vocabulary parses")
}

fn vocab_size() -> usize {
    vocab()
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .map_or(0, |a| a.len())
}

/// Writes a synthetic model to `path`.
pub fn write_synthetic_model(path: &Path, spec: &SyntheticSpec) -> anyhow::Result<()> {
    anyhow::ensure!(
        spec.n_embd.is_multiple_of(spec.n_head),
        "n_embd must be a multiple of n_head"
    );
    anyhow::ensure!(
        spec.n_head.is_multiple_of(spec.n_head_kv),
        "n_head must be a multiple of n_head_kv"
    );
    write_model(path, spec, &synthetic_tensors(spec))
}

/// Writes a model with `spec`'s metadata and the given tensors (which tests may alter to make
/// malformed files); tensor values are seeded by position and name.
pub fn write_model(
    path: &Path,
    spec: &SyntheticSpec,
    tensors: &[TensorDecl],
) -> anyhow::Result<()> {
    let vocab = vocab();
    let head_dim = spec.n_embd / spec.n_head;
    let mut w = GgufWriter::new(tensors.len())?;
    let a = spec.arch.as_str();
    w.set("general.architecture", &GgufValue::Str(a.into()))?;
    w.set(
        "general.name",
        &GgufValue::Str(format!(
            "synthetic-mistral-{}l-{}",
            spec.n_layer, spec.n_embd
        )),
    )?;
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.set(&format!("{a}.block_count"), &u32v(spec.n_layer))?;
    w.set(&format!("{a}.embedding_length"), &u32v(spec.n_embd))?;
    w.set(&format!("{a}.attention.head_count"), &u32v(spec.n_head))?;
    w.set(
        &format!("{a}.attention.head_count_kv"),
        &u32v(spec.n_head_kv),
    )?;
    w.set(&format!("{a}.feed_forward_length"), &u32v(spec.n_ff))?;
    w.set(&format!("{a}.context_length"), &u32v(spec.n_ctx))?;
    w.set(&format!("{a}.rope.dimension_count"), &u32v(head_dim))?;
    w.set(&format!("{a}.rope.freq_base"), &GgufValue::F32(10000.0))?;
    w.set(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        &GgufValue::F32(1e-5),
    )?;
    if let Some(win) = spec.sliding_window {
        w.set(&format!("{a}.attention.sliding_window"), &u32v(win))?;
    }
    for (key, value) in &vocab.metadata {
        if key.starts_with("tokenizer.") {
            w.set(key, value)?;
        }
    }

    for (name, ty, ne) in tensors {
        w.add_tensor(name, *ty, ne)?;
    }
    let seed = spec.seed;
    w.write(path, |index, name, ty, ne| {
        let n: usize = ne.iter().product::<i64>() as usize;
        let row = ne[0] as usize;
        // Embeddings get a larger spread so logits of a random model are not flat.
        let std = if name.starts_with("token_embd") {
            1.0
        } else {
            0.5 / (row as f32).sqrt()
        };
        quantize_parallel(ty, &tensor_values(seed, index, name, n, std), row)
    })
}

/// Quantizes on all cores (multi-gigabyte models take seconds instead of minutes).
fn quantize_parallel(ty: GgmlType, values: &[f32], row: usize) -> anyhow::Result<Vec<u8>> {
    let n_rows = values.len() / row;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(n_rows.max(1));
    if threads <= 1 || values.len() < 1 << 20 {
        return quantize(ty, values, row);
    }
    let rows_per = n_rows.div_ceil(threads);
    let parts: Vec<anyhow::Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(rows_per * row)
            .map(|chunk| s.spawn(move || quantize(ty, chunk, row)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("quantizer thread panicked"))
            .collect()
    });
    let mut out = Vec::new();
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_m_mix_gives_half_of_mistral_7bs_blocks_more_bits() {
        let picked: Vec<usize> = (0..32).filter(|&i| more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let mut spec = SyntheticSpec::mistral_7b(GgmlType::Q4K);
        spec.more_bits_type = Some(GgmlType::Q6K);
        let types: HashMap<String, GgmlType> = synthetic_tensors(&spec)
            .into_iter()
            .map(|(name, ty, _)| (name, ty))
            .collect();
        assert_eq!(types["output.weight"], GgmlType::Q6K);
        assert_eq!(types["token_embd.weight"], GgmlType::Q4K);
        assert_eq!(types["blk.6.ffn_down.weight"], GgmlType::Q6K);
        assert_eq!(types["blk.6.attn_v.weight"], GgmlType::Q6K);
        assert_eq!(types["blk.7.ffn_down.weight"], GgmlType::Q4K);
        assert_eq!(types["blk.6.attn_q.weight"], GgmlType::Q4K);
        assert_eq!(types["blk.31.ffn_gate.weight"], GgmlType::Q4K);
    }
}
