//! The `mistrald` command line, run as a real process.

mod common;

use common::{tempdir, tiny_model};
use mistrald::ggml::GgmlType;
use std::path::Path;
use std::process::{Command, Output};

fn mistrald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mistrald"))
        .args(args)
        .output()
        .expect("run mistrald")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn vocab() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ggml-vocab-llama-spm.gguf")
        .display()
        .to_string()
}

#[test]
fn tokenize_works_on_a_vocabulary_only_file() {
    let out = stdout(&mistrald(&[
        "tokenize",
        "--model",
        &vocab(),
        "--json",
        " Hello, world!",
    ]));
    assert_eq!(out.trim(), r#"{"tokens":[29871,15043,29892,3186,29991]}"#);
    let out = stdout(&mistrald(&[
        "tokenize",
        "--model",
        &vocab(),
        "--bos",
        "Hello world",
    ]));
    assert_eq!(out.trim(), "1 15043 3186");
}

#[test]
fn generate_is_reproducible_with_a_seed_and_eval_dumps_logits() {
    let dir = tempdir();
    let model = tiny_model(dir.path(), GgmlType::Q8_0);
    let m = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--seed",
        "5",
        "--threads",
        "1",
    ];
    let a = stdout(&mistrald(&args));
    let b = stdout(&mistrald(&args));
    assert_eq!(a, b);
    assert!(!a.trim().is_empty());
    let chat = mistrald(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(chat.status.success());

    let dump = dir.path().join("logits.bin");
    let out = stdout(&mistrald(&[
        "eval",
        "--model",
        m,
        "--tokens",
        "1,450,4996,17354",
        "--json",
        "--dump-logits",
        dump.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["n_tokens"], 4);
    assert!(v["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(std::fs::metadata(&dump).unwrap().len(), 4 * 32000 * 4);
}

#[test]
fn bench_and_info_report() {
    let dir = tempdir();
    let model = tiny_model(dir.path(), GgmlType::Q4_0);
    let m = model.to_str().unwrap();
    let out = stdout(&mistrald(&[
        "bench",
        "--model",
        m,
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--threads",
        "1",
        "--json",
        "--bandwidth",
        "--bandwidth-mib",
        "8",
        "--bandwidth-every",
        "3",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_bytes",
        "read_gbs",
        "read_gbs_min",
        "read_gbs_max",
        "decode_read_gbs",
        "decode_bound_fraction",
        "decode_bound_fraction_median",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {out}");
    }
    // 4 tokens, a sample every 3: before the first, before the fourth and at the end, of the
    // buffer asked for; the intervals between them hold 3 tokens and 1.
    assert_eq!(v["read_samples"], 3, "{out}");
    assert_eq!(v["read_probe_bytes"], 8 << 20, "{out}");
    let intervals = v["intervals"].as_array().unwrap();
    let tokens: Vec<u64> = intervals
        .iter()
        .map(|i| i["tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, [3, 1], "{out}");
    for i in intervals {
        for key in ["decode_read_gbs", "read_gbs_before", "read_gbs_after"] {
            assert!(i[key].as_f64().unwrap() > 0.0, "{key} in {out}");
        }
    }
    assert_eq!(
        intervals[0]["read_gbs_after"], intervals[1]["read_gbs_before"],
        "{out}"
    );
    // Decode reads every tensor of the file but the token embeddings.
    let bytes = std::fs::read(&model).unwrap();
    let info = mistrald::ggml::gguf::GgufFile::parse(&bytes, &model).unwrap();
    let expected: u64 = info
        .tensors
        .iter()
        .filter(|t| t.name != "token_embd.weight")
        .map(|t| t.size)
        .sum();
    assert!(expected > 0 && expected < bytes.len() as u64);
    assert_eq!(v["decode_read_bytes"].as_u64().unwrap(), expected, "{out}");
    let out = stdout(&mistrald(&[
        "info",
        "--model",
        m,
        "--sliding-window",
        "64",
        "--kv-type",
        "q8_0",
    ]));
    assert!(out.contains("window:          64"), "{out}");
    assert!(out.contains("quantization:    q4_0"), "{out}");
    assert!(out.contains("4 query, 2 key/value"), "{out}");
}

#[test]
fn bench_attention_reports_every_path_and_ggml() {
    // Small and quick: 2 layers' caches of 64 positions, 2 threads (the decode step's
    // key-range split and merge run), 1 ms per configuration.
    let out = stdout(&mistrald(&[
        "bench-attention",
        "--history",
        "64",
        "--threads",
        "2",
        "--kv-type",
        "f16,q8_0",
        "--min-ms",
        "1",
        "--layers",
        "2",
    ]));
    let paths = mistrald::kernels::available_paths();
    for ty in ["f16", "q8_0"] {
        for p in &paths {
            let row = format!("| {} | {ty} | 64 | slot-major | 2 |", p.description());
            assert!(out.contains(&row), "no row {row} in\n{out}");
        }
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("| {ty} | 64 | 2 |"))),
            "no ggml comparison for {ty} in\n{out}"
        );
    }
    let bad = mistrald(&["bench-attention", "--kv-type", "q4_0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("q4_0"));
}

#[test]
fn bench_matmul_reports_every_path_and_ggml() {
    // Small and quick: a 48x512 matrix, 2 copies, 1 and 3 rows, 2 threads, 1 ms each in
    // three alternating slices.
    let out = stdout(&mistrald(&[
        "bench-matmul",
        "--shapes",
        "48x512",
        "--types",
        "q4_0,q6_k",
        "--rows",
        "1,3",
        "--threads",
        "2",
        "--copies",
        "2",
        "--min-ms",
        "1",
        "--rounds",
        "3",
    ]));
    let paths: Vec<_> = mistrald::kernels::matmul::available_matmul_paths()
        .into_iter()
        .filter(|p| *p != mistrald::kernels::matmul::MatmulPath::Scalar)
        .collect();
    for ty in ["q4_0", "q6_k"] {
        let header = out
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{ty} 48×512")))
            .find(|l| l.starts_with("| weights |"))
            .unwrap_or_else(|| panic!("no table for {ty} in\n{out}"));
        for p in &paths {
            assert!(header.contains(&format!(" {} |", p.name())), "{header}");
        }
        assert!(
            header.contains(
                " ggml | ggml repack | read | best native vs ggml | best native of read |"
            ),
            "{header}"
        );
    }
    assert!(out.contains("| memory (2 copies) | 3 | 2 |"), "{out}");
    let bad = mistrald(&["bench-matmul", "--types", "q5_0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("q5_0"));
    let bad = mistrald(&["bench-matmul", "--rounds", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--rounds"));
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let o = mistrald(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot open model file /nonexistent/model.gguf"),
        "{err}"
    );
    let o = mistrald(&["info", "--model", &vocab(), "--kv-type", "q4"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown KV cache type 'q4'"));
    let o = mistrald(&["generate", "--model", &vocab(), "--prompt", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("vocabulary-only"));
}

#[test]
fn without_a_model_the_bundled_trained_model_is_used_and_says_so() {
    let o = mistrald(&[
        "generate",
        "--prompt",
        "The meaning of life is",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ]);
    let text = stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("using the bundled model") && err.contains("fortunes-22m-q8_0.gguf"),
        "stderr: {err}"
    );
    // A trained model writes words, not random tokens: mostly letters and spaces.
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(
        text.split_whitespace().count() >= 8 && letters * 10 >= text.len() * 8,
        "readable text: {text:?}"
    );
    let info = stdout(&mistrald(&["info"]));
    assert!(info.contains("window:          128"), "{info}");
}
