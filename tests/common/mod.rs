//! Shared test helpers: synthetic model files and an independent reference forward pass.
#![allow(dead_code)]

#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod dbus;
#[cfg(feature = "plugins")]
pub mod plugins;
pub mod reference;

use mistrald::engine::{AttentionChoice, BatchItem, Engine, EngineConfig, Logits};
use mistrald::ggml::GgmlType;
use mistrald::kv_cache::KvType;
use mistrald::model::synthetic::{write_synthetic_model, SyntheticSpec};
use mistrald::model::{MappedGguf, Model};
use std::path::{Path, PathBuf};

/// A temporary directory that lives as long as the returned value.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Writes a tiny model of `ty` weights into `dir` and returns its path.
/// K-quants need rows of 256 values, so their tiny model is twice as wide.
pub fn tiny_model(dir: &Path, ty: GgmlType) -> PathBuf {
    let path = dir.join(format!("tiny-{}.gguf", ty.name()));
    if !path.exists() {
        let mut spec = SyntheticSpec::tiny(ty);
        if ty.block_size() == 256 {
            spec.n_embd = 256;
            spec.n_head = 8;
            spec.n_head_kv = 2;
            spec.n_ff = 512;
        }
        write_synthetic_model(&path, &spec).expect("write tiny model");
    }
    path
}

/// Loads `path` into an engine with the default (native) attention.
pub fn engine(path: &Path, kv: KvType, window: Option<usize>, batch: usize) -> Engine {
    engine_with(path, kv, window, batch, AttentionChoice::Native)
}

/// Loads `path` into an engine with the given attention implementation.
pub fn engine_with(
    path: &Path,
    kv: KvType,
    window: Option<usize>,
    batch: usize,
    attention: AttentionChoice,
) -> Engine {
    let model = Model::load(MappedGguf::open(path).unwrap()).unwrap();
    let cfg = EngineConfig {
        attention,
        n_threads: 1,
        kv_type: kv,
        sliding_window: Some(window.unwrap_or(0)),
        ctx_size: Some(256),
        batch_size: batch,
    };
    Engine::new(model, cfg).unwrap()
}

/// Feeds `a` and `b` to two new sequences of `eng` in the same steps, `chunk_a(done)` and
/// `chunk_b(done)` tokens at a time (`done`: tokens of that sequence fed so far; the last chunk
/// is cut to what remains); returns every token's logits of each.
pub fn interleave(
    eng: &mut Engine,
    a: &[u32],
    b: &[u32],
    chunk_a: impl Fn(usize) -> usize,
    chunk_b: impl Fn(usize) -> usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut sa = eng.new_sequence().unwrap();
    let mut sb = eng.new_sequence().unwrap();
    let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
    let (mut ia, mut ib) = (0, 0);
    while ia < a.len() || ib < b.len() {
        let na = chunk_a(ia).min(a.len() - ia);
        let nb = chunk_b(ib).min(b.len() - ib);
        let mut items = Vec::new();
        if na > 0 {
            items.push(BatchItem {
                seq: &mut sa,
                tokens: &a[ia..ia + na],
                logits: Logits::All,
            });
        }
        if nb > 0 {
            items.push(BatchItem {
                seq: &mut sb,
                tokens: &b[ib..ib + nb],
                logits: Logits::All,
            });
        }
        let mut res = eng.step(&mut items).unwrap().into_iter();
        if na > 0 {
            out_a.extend(res.next().unwrap());
        }
        if nb > 0 {
            out_b.extend(res.next().unwrap());
        }
        ia += na;
        ib += nb;
    }
    (out_a, out_b)
}

/// A deterministic token sequence of length `n` drawn from the ordinary vocabulary.
pub fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 300 + (i.wrapping_mul(7919).wrapping_add(seed * 104729)) % 31000)
        .collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}
