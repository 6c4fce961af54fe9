//! Mistral hyper-parameters read from GGUF metadata, validated.

use crate::ggml::gguf::{GgufError, GgufFile};

/// Architectures whose GGUF layout mistrald runs (Mistral 7B ships labelled `llama`).
pub const SUPPORTED_ARCHS: [&str; 2] = ["llama", "mistral"];

/// The shape of a Mistral-architecture model.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    /// `general.architecture` (`llama` or `mistral`).
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Model (embedding) width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_head_kv: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Dimensions of each head rotated by RoPE (normally `head_dim`).
    pub n_rot: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub n_ff: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub n_vocab: usize,
    /// RoPE base frequency.
    pub rope_freq_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    /// Sliding attention window stored in the file (`<arch>.attention.sliding_window`), if any.
    pub sliding_window: Option<usize>,
}

fn key(arch: &str, k: &str) -> String {
    format!("{arch}.{k}")
}

impl HParams {
    /// Reads and validates the hyper-parameters. `n_vocab` comes from the embedding tensor.
    pub fn from_gguf(g: &GgufFile) -> Result<HParams, GgufError> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(g.error(format!(
                "unsupported architecture '{arch}' (mistrald runs Mistral-architecture models: {})",
                SUPPORTED_ARCHS.join(", ")
            )));
        }
        let req = |k: &str| -> Result<usize, GgufError> {
            let full = key(&arch, k);
            match g.get_u64_opt(&full)? {
                Some(v) if v > 0 && v <= 1 << 24 => Ok(v as usize),
                Some(v) => Err(g.error(format!("absurd value {v} for '{full}'"))),
                None => Err(g.error(format!("missing metadata key '{full}'"))),
            }
        };
        let n_layer = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_ff = req("feed_forward_length")?;
        let n_ctx_train = req("context_length")?;
        let n_head_kv = match g.get_u64_opt(&key(&arch, "attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => n_head,
        };
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(g.error(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            )));
        }
        let head_dim = match g.get_u64_opt(&key(&arch, "attention.key_length"))? {
            Some(v) => v as usize,
            None => {
                if n_embd % n_head != 0 {
                    return Err(g.error(format!(
                        "embedding_length {n_embd} is not a multiple of head_count {n_head}"
                    )));
                }
                n_embd / n_head
            }
        };
        if let Some(vl) = g.get_u64_opt(&key(&arch, "attention.value_length"))? {
            if vl as usize != head_dim {
                return Err(g.error(format!(
                    "value_length {vl} differs from key_length {head_dim} (unsupported)"
                )));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(g.error(format!("unsupported head dimension {head_dim}")));
        }
        let n_rot = match g.get_u64_opt(&key(&arch, "rope.dimension_count"))? {
            Some(v) => v as usize,
            None => head_dim,
        };
        if n_rot == 0 || n_rot > head_dim || n_rot % 2 != 0 {
            return Err(g.error(format!(
                "invalid rope.dimension_count {n_rot} for head dimension {head_dim}"
            )));
        }
        if n_layer > 1024 || n_head > 1024 {
            return Err(g.error(format!(
                "absurd model shape: {n_layer} layers, {n_head} heads"
            )));
        }
        let rope_freq_base = g
            .get_f64_opt(&key(&arch, "rope.freq_base"))?
            .unwrap_or(10000.0) as f32;
        let rms_eps = g
            .get_f64_opt(&key(&arch, "attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32;
        if !(rope_freq_base.is_finite() && rope_freq_base > 0.0) {
            return Err(g.error(format!("invalid rope.freq_base {rope_freq_base}")));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(g.error(format!("invalid layer_norm_rms_epsilon {rms_eps}")));
        }
        let sliding_window = g
            .get_u64_opt(&key(&arch, "attention.sliding_window"))?
            .map(|v| v as usize)
            .filter(|&v| v > 0);
        let n_vocab = match g.tensor("token_embd.weight") {
            Some(t) => t.ne[1] as usize,
            None => 0,
        };
        Ok(HParams {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            n_ff,
            n_vocab,
            rope_freq_base,
            rms_eps,
            n_ctx_train,
            sliding_window,
        })
    }

    /// Number of query heads sharing one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Elements of one position's keys (or values) across all KV heads.
    pub fn kv_row(&self) -> usize {
        self.head_dim * self.n_head_kv
    }
}
