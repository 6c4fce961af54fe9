//! The weight tensors of a Mistral model, used in place from the memory-mapped GGUF file.

use super::{HParams, MappedGguf};
use crate::ggml::gguf::{GgufFile, TensorInfo};
use crate::ggml::{BackendBuffer, Context, GgmlType, Tensor};
use anyhow::Context as _;

/// One transformer block's weights.
#[derive(Clone, Copy)]
pub struct LayerWeights<'a> {
    /// RMSNorm scale before attention, `[n_embd]`.
    pub attn_norm: Tensor<'a>,
    /// Query projection, `[n_embd, n_head*head_dim]`.
    pub wq: Tensor<'a>,
    /// Key projection, `[n_embd, n_head_kv*head_dim]`.
    pub wk: Tensor<'a>,
    /// Value projection, `[n_embd, n_head_kv*head_dim]`.
    pub wv: Tensor<'a>,
    /// Attention output projection, `[n_head*head_dim, n_embd]`.
    pub wo: Tensor<'a>,
    /// RMSNorm scale before the feed-forward block, `[n_embd]`.
    pub ffn_norm: Tensor<'a>,
    /// SwiGLU gate projection, `[n_embd, n_ff]`.
    pub w_gate: Tensor<'a>,
    /// SwiGLU up projection, `[n_embd, n_ff]`.
    pub w_up: Tensor<'a>,
    /// SwiGLU down projection, `[n_ff, n_embd]`.
    pub w_down: Tensor<'a>,
}

/// All weights of the model.
pub struct Weights<'a> {
    /// Token embeddings, `[n_embd, n_vocab]`.
    pub tok_embd: Tensor<'a>,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights<'a>>,
    /// Final RMSNorm scale, `[n_embd]`.
    pub output_norm: Tensor<'a>,
    /// Output head, `[n_embd, n_vocab]` (the embedding matrix when the file ties them).
    pub output: Tensor<'a>,
}

/// A loaded model: hyper-parameters and weights, backed by the memory-mapped file.
pub struct Model {
    /// Hyper-parameters.
    pub hparams: HParams,
    weights: Weights<'static>,
    _ctx: Context,
    _buffer: BackendBuffer,
    file: MappedGguf,
}

/// Tensors the loader recognises but mistrald does not run (mixture-of-experts layers).
const UNSUPPORTED_TENSORS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_gate_inp"];

impl Model {
    /// Validates every weight tensor of `file` against the hyper-parameters and places them
    /// in place in the memory map (no copy). Errors name the file, the tensor and the problem.
    pub fn load(file: MappedGguf) -> anyhow::Result<Model> {
        let g = &file.info;
        let hp = HParams::from_gguf(g)?;
        if hp.n_vocab == 0 {
            return Err(g
                .error(
                    "missing tensor 'token_embd.weight' (is this a vocabulary-only file?)".into(),
                )
                .into());
        }
        if let Some(t) = g
            .tensors
            .iter()
            .find(|t| UNSUPPORTED_TENSORS.iter().any(|u| t.name.contains(u)))
        {
            return Err(g
                .error(format!(
                    "tensor '{}': mixture-of-experts models are not supported",
                    t.name
                ))
                .into());
        }
        let n_tensors = 3 + 9 * hp.n_layer + 1;
        let ctx = Context::new(n_tensors * crate::ggml::tensor_overhead(), true)?;
        let data_len = (g.file_size - g.data_offset) as usize;
        // SAFETY: the buffer points into `file.mmap`, which `Model` owns and drops after it.
        let buffer = unsafe {
            BackendBuffer::from_host_memory(
                file.mmap.as_ptr().add(g.data_offset as usize),
                data_len,
            )
        }
        .with_context(|| format!("{}: cannot use the tensor data in place", g.path.display()))?;

        let (e, q, kv, ff, v) = (
            hp.n_embd as u64,
            (hp.n_head * hp.head_dim) as u64,
            hp.kv_row() as u64,
            hp.n_ff as u64,
            hp.n_vocab as u64,
        );
        let load = |name: &str, ne: &[u64], norm: bool| -> anyhow::Result<Tensor<'static>> {
            let info = g
                .tensor(name)
                .ok_or_else(|| g.error(format!("missing tensor '{name}'")))?;
            check_tensor(g, info, ne, norm)?;
            let dims: Vec<i64> = ne.iter().map(|&d| d as i64).collect();
            let t = ctx.new_tensor(info.ty, &dims).set_name(name);
            buffer.place(t, info.offset as usize)?;
            // SAFETY: `ctx` moves into the returned `Model` together with these handles.
            Ok(unsafe { t.detach() })
        };
        let tok_embd = load("token_embd.weight", &[e, v], false)?;
        let output_norm = load("output_norm.weight", &[e], true)?;
        let output = if g.tensor("output.weight").is_some() {
            load("output.weight", &[e, v], false)?
        } else {
            tok_embd
        };
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: load(&n("attn_norm"), &[e], true)?,
                wq: load(&n("attn_q"), &[e, q], false)?,
                wk: load(&n("attn_k"), &[e, kv], false)?,
                wv: load(&n("attn_v"), &[e, kv], false)?,
                wo: load(&n("attn_output"), &[q, e], false)?,
                ffn_norm: load(&n("ffn_norm"), &[e], true)?,
                w_gate: load(&n("ffn_gate"), &[e, ff], false)?,
                w_up: load(&n("ffn_up"), &[e, ff], false)?,
                w_down: load(&n("ffn_down"), &[ff, e], false)?,
            });
        }
        if let Some(extra) = g
            .tensors
            .iter()
            .find(|t| t.name.starts_with(&format!("blk.{}.", hp.n_layer)))
        {
            return Err(g
                .error(format!(
                    "tensor '{}' belongs to a block beyond block_count {}",
                    extra.name, hp.n_layer
                ))
                .into());
        }
        Ok(Model {
            hparams: hp,
            weights: Weights {
                tok_embd,
                layers,
                output_norm,
                output,
            },
            _ctx: ctx,
            _buffer: buffer,
            file,
        })
    }

    /// The weight tensors.
    pub fn weights(&self) -> &Weights<'_> {
        &self.weights
    }

    /// The parsed GGUF header (metadata for the tokenizer and chat template).
    pub fn gguf(&self) -> &GgufFile {
        &self.file.info
    }

    /// Bytes of tensor data (mapped, not copied).
    pub fn weight_bytes(&self) -> u64 {
        self.file.info.tensors.iter().map(|t| t.size).sum()
    }

    /// The most common weight type among the matrices (the file's quantization).
    pub fn main_weight_type(&self) -> GgmlType {
        let mut by_type: Vec<(GgmlType, u64)> = Vec::new();
        for t in &self.file.info.tensors {
            match by_type.iter_mut().find(|(ty, _)| *ty == t.ty) {
                Some((_, n)) => *n += t.size,
                None => by_type.push((t.ty, t.size)),
            }
        }
        by_type
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(t, _)| t)
            .unwrap_or(GgmlType::F32)
    }
}

fn check_tensor(g: &GgufFile, info: &TensorInfo, ne: &[u64], norm: bool) -> anyhow::Result<()> {
    let mut want = [1u64; 4];
    want[..ne.len()].copy_from_slice(ne);
    if info.ne != want {
        return Err(g
            .error(format!(
                "tensor '{}' has shape {:?}, expected {:?} for this model's hyper-parameters",
                info.name,
                &info.ne[..info.n_dims as usize],
                ne
            ))
            .into());
    }
    if norm && info.ty != GgmlType::F32 {
        return Err(g
            .error(format!(
                "tensor '{}' has type {}, norm weights must be f32",
                info.name, info.ty
            ))
            .into());
    }
    Ok(())
}
