//! Malformed model files get clear errors naming the file and the problem — never a panic or
//! an abort inside ggml.

mod common;

use common::tempdir;
use mistrald::engine::{Engine, EngineConfig};
use mistrald::ggml::GgmlType;
use mistrald::model::synthetic::{synthetic_tensors, write_model, SyntheticSpec};
use mistrald::model::{MappedGguf, Model};
use std::path::{Path, PathBuf};

fn load(path: &Path) -> Result<Model, String> {
    MappedGguf::open(path)
        .and_then(Model::load)
        .map_err(|e| format!("{e:#}"))
}

fn write(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut SyntheticSpec, &mut Vec<(String, GgmlType, Vec<i64>)>),
) -> PathBuf {
    let mut spec = SyntheticSpec::tiny(GgmlType::Q8_0);
    spec.n_layer = 1;
    let mut tensors = synthetic_tensors(&spec);
    edit(&mut spec, &mut tensors);
    let path = dir.join(name);
    write_model(&path, &spec, &tensors).unwrap();
    path
}

fn assert_error(result: Result<Model, String>, path: &Path, needle: &str) {
    let err = match result {
        Ok(_) => panic!(
            "{} loaded, expected an error containing {needle:?}",
            path.display()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains(&path.display().to_string()),
        "error does not name the file: {err}"
    );
    assert!(
        err.contains(needle),
        "error {err:?} does not say {needle:?}"
    );
}

/// Offset of the type field of tensor `name` in the header.
fn tensor_type_offset(bytes: &[u8], name: &str) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap()
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

#[test]
fn a_good_file_loads() {
    let dir = tempdir();
    let path = write(dir.path(), "good.gguf", |_, _| {});
    let model = load(&path).unwrap();
    assert_eq!(model.hparams.n_layer, 1);
    Engine::new(model, EngineConfig::default()).unwrap();
}

#[test]
fn wrong_magic() {
    let dir = tempdir();
    let path = write(dir.path(), "m.gguf", |_, _| {});
    let mut b = std::fs::read(&path).unwrap();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&path, b).unwrap();
    assert_error(load(&path), &path, "bad magic");
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert_error(load(&txt), &txt, "not a GGUF file");
}

#[test]
fn truncated_files() {
    let dir = tempdir();
    let path = write(dir.path(), "t.gguf", |_, _| {});
    let full = std::fs::read(&path).unwrap();
    for keep in [3, 20, 200, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..keep]).unwrap();
        let err = load(&path)
            .err()
            .unwrap_or_else(|| panic!("truncated to {keep} loaded"));
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("truncated") || err.contains("end of file") || err.contains("not a GGUF"),
            "{keep}: {err}"
        );
    }
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert_error(load(&empty), &empty, "empty file");
}

#[test]
fn missing_tensor_and_missing_file() {
    let dir = tempdir();
    let path = write(dir.path(), "mt.gguf", |_, t| {
        t.retain(|(n, ..)| n != "blk.0.ffn_up.weight")
    });
    assert_error(load(&path), &path, "missing tensor 'blk.0.ffn_up.weight'");
    let nowhere = dir.path().join("does-not-exist.gguf");
    assert_error(load(&nowhere), &nowhere, "cannot open model file");
    assert_error(load(dir.path()), dir.path(), "not a regular file");
}

#[test]
fn shape_mismatch() {
    let dir = tempdir();
    let path = write(dir.path(), "shape.gguf", |_, t| {
        let wk = t
            .iter_mut()
            .find(|(n, ..)| n == "blk.0.attn_k.weight")
            .unwrap();
        wk.2 = vec![128, 96];
    });
    assert_error(
        load(&path),
        &path,
        "tensor 'blk.0.attn_k.weight' has shape [128, 96], expected [128, 64]",
    );
}

#[test]
fn unsupported_tensor_type() {
    let dir = tempdir();
    let path = write(dir.path(), "type.gguf", |_, _| {});
    let mut b = std::fs::read(&path).unwrap();
    let at = tensor_type_offset(&b, "blk.0.attn_q.weight");
    b[at..at + 4].copy_from_slice(&16u32.to_le_bytes()); // iq2_xxs
    std::fs::write(&path, b).unwrap();
    assert_error(load(&path), &path, "unsupported tensor type iq2_xxs");
}

#[test]
fn absurd_sizes() {
    let dir = tempdir();
    let path = write(dir.path(), "absurd.gguf", |_, _| {});
    let good = std::fs::read(&path).unwrap();
    // tensor count
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert_error(load(&path), &path, "absurd tensor count");
    // metadata count
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert_error(load(&path), &path, "absurd metadata count");
    // a dimension
    let mut b = good.clone();
    let name = "output_norm.weight";
    let at = b
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap()
        + name.len()
        + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert_error(load(&path), &path, "absurd dimension");
    // a string length
    let mut b = good;
    let key = b"general.architecture";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert_error(load(&path), &path, "unexpected end of file");
}

#[test]
fn wrong_architecture_and_hyper_parameters() {
    let dir = tempdir();
    let path = write(dir.path(), "arch.gguf", |s, _| s.arch = "gpt2".into());
    assert_error(load(&path), &path, "unsupported architecture 'gpt2'");
    let path = write(dir.path(), "heads.gguf", |s, _| s.n_head_kv = 3);
    assert_error(load(&path), &path, "not a multiple of head_count_kv 3");
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ggml-vocab-llama-spm.gguf");
    assert_error(load(&vocab), &vocab, "vocabulary-only");
}
