//! A naive, independent f32 forward pass of a Mistral model, written plainly (no ggml):
//! every position attends to the keys of the last `window` positions (itself included).

use mistrald::ggml::gguf::GgufFile;
use mistrald::ggml::gguf_writer::dequantize;
use mistrald::model::HParams;
use std::path::Path;

/// A matrix `rows x cols`, row-major (`cols` = the input width, as GGUF stores weights).
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.cols);
        (0..self.rows)
            .map(|r| {
                self.data[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

pub struct Layer {
    attn_norm: Vec<f32>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    ffn_norm: Vec<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
}

/// All weights, dequantized to f32.
pub struct Reference {
    pub hp: HParams,
    embd: Mat,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Mat,
}

impl Reference {
    /// Reads every weight of the GGUF file at `path` (dequantizing quantized ones).
    pub fn load(path: &Path) -> Reference {
        let bytes = std::fs::read(path).unwrap();
        let g = GgufFile::parse(&bytes, path).unwrap();
        let hp = HParams::from_gguf(&g).unwrap();
        let mat = |name: &str| -> Mat {
            let t = g.tensor(name).unwrap_or_else(|| panic!("missing {name}"));
            let start = (g.data_offset + t.offset) as usize;
            let n = (t.ne[0] * t.ne[1]) as usize;
            let data = dequantize(t.ty, &bytes[start..start + t.size as usize], n).unwrap();
            Mat {
                rows: t.ne[1] as usize,
                cols: t.ne[0] as usize,
                data,
            }
        };
        let vec = |name: &str| mat(name).data;
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                Layer {
                    attn_norm: vec(&n("attn_norm")),
                    wq: mat(&n("attn_q")),
                    wk: mat(&n("attn_k")),
                    wv: mat(&n("attn_v")),
                    wo: mat(&n("attn_output")),
                    ffn_norm: vec(&n("ffn_norm")),
                    gate: mat(&n("ffn_gate")),
                    up: mat(&n("ffn_up")),
                    down: mat(&n("ffn_down")),
                }
            })
            .collect();
        Reference {
            embd: mat("token_embd.weight"),
            out_norm: vec("output_norm.weight"),
            output: mat("output.weight"),
            layers,
            hp,
        }
    }

    /// Logits of every position of `tokens` (positions 0..), with an attention window of
    /// `window` positions (`None`: full causal attention).
    pub fn forward(&self, tokens: &[u32], window: Option<usize>) -> Vec<Vec<f32>> {
        let hp = &self.hp;
        let (hd, nh, nkv) = (hp.head_dim, hp.n_head, hp.n_head_kv);
        let group = nh / nkv;
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| self.embd.data[t as usize * hp.n_embd..(t as usize + 1) * hp.n_embd].to_vec())
            .collect();
        for layer in &self.layers {
            let mut keys = Vec::new();
            let mut values = Vec::new();
            let mut queries = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = rms_norm(x, &layer.attn_norm, hp.rms_eps);
                queries.push(rope(
                    &layer.wq.apply(&h),
                    pos,
                    hd,
                    hp.n_rot,
                    hp.rope_freq_base,
                ));
                keys.push(rope(
                    &layer.wk.apply(&h),
                    pos,
                    hd,
                    hp.n_rot,
                    hp.rope_freq_base,
                ));
                values.push(layer.wv.apply(&h));
            }
            for (i, x) in xs.iter_mut().enumerate() {
                let lo = match window {
                    Some(w) => (i + 1).saturating_sub(w),
                    None => 0,
                };
                let mut attn = vec![0f32; nh * hd];
                for head in 0..nh {
                    let kvh = head / group;
                    let q = &queries[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (lo..=i)
                        .map(|j| {
                            let k = &keys[j][kvh * hd..(kvh + 1) * hd];
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| (*a as f64) * (*b as f64))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    for (e, j) in exps.iter().zip(lo..=i) {
                        let v = &values[j][kvh * hd..(kvh + 1) * hd];
                        for d in 0..hd {
                            attn[head * hd + d] += (e / sum * v[d] as f64) as f32;
                        }
                    }
                }
                let o = layer.wo.apply(&attn);
                for (a, b) in x.iter_mut().zip(o) {
                    *a += b;
                }
                let h = rms_norm(x, &layer.ffn_norm, hp.rms_eps);
                let g = layer.gate.apply(&h);
                let u = layer.up.apply(&h);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let d = layer.down.apply(&act);
                for (a, b) in x.iter_mut().zip(d) {
                    *a += b;
                }
            }
        }
        xs.iter()
            .map(|x| self.output.apply(&rms_norm(x, &self.out_norm, hp.rms_eps)))
            .collect()
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, w)| (*v as f64 * scale) as f32 * w)
        .collect()
}

/// Rotates adjacent pairs (x[2i], x[2i+1]) of each head by pos * base^(-2i/n_rot).
fn rope(x: &[f32], pos: usize, hd: usize, n_rot: usize, base: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for head in out.chunks_mut(hd) {
        for i in (0..n_rot).step_by(2) {
            let theta = pos as f64 * (base as f64).powf(-(i as f64) / n_rot as f64);
            let (s, c) = theta.sin_cos();
            let (a, b) = (head[i] as f64, head[i + 1] as f64);
            head[i] = (a * c - b * s) as f32;
            head[i + 1] = (a * s + b * c) as f32;
        }
    }
    out
}
