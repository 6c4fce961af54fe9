//! The tokenizer against llama.cpp's reference vectors for the Llama/Mistral SentencePiece
//! vocabulary (tests/data/ggml-vocab-llama-spm.gguf.{inp,out}).

use mistrald::model::MappedGguf;
use mistrald::tokenizer::Tokenizer;
use std::path::Path;

fn vocab() -> Tokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ggml-vocab-llama-spm.gguf");
    let g = MappedGguf::open(&path).unwrap();
    Tokenizer::from_gguf(&g.info).unwrap()
}

fn vectors() -> Vec<(String, Vec<u32>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let inp = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.out")).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    let inputs = &inputs[..expected.len()];
    assert!(expected.len() > 30, "too few test vectors read");
    inputs.iter().map(|s| s.to_string()).zip(expected).collect()
}

#[test]
fn reproduces_every_reference_vector() {
    let tok = vocab();
    assert_eq!(tok.vocab_size(), 32000);
    let mut failures = Vec::new();
    for (text, want) in vectors() {
        let got = tok.encode(&text).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decoding_round_trips_and_streams_whole_characters() {
    let tok = vocab();
    for (text, ids) in vectors() {
        assert_eq!(tok.decode(&ids).unwrap(), text, "decode of {ids:?}");
        let mut stream = tok.stream();
        let mut joined = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece with a broken character for {text:?}"
            );
            joined.push_str(&piece);
        }
        joined.push_str(&stream.finish().unwrap());
        assert_eq!(joined, text, "streamed decode of {ids:?}");
    }
}

#[test]
fn control_tokens_are_parsed_only_when_asked() {
    let tok = vocab();
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    let with = tok
        .encode_with_control_tokens("<s>[INST] hi [/INST]")
        .unwrap();
    assert_eq!(with[0], 1);
    assert!(!tok.encode("<s>").unwrap().contains(&1));
    assert_eq!(tok.decode(&[1, 15043, 2]).unwrap(), "Hello");
}

#[test]
fn a_tokenizer_json_beside_the_model_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ggml-vocab-llama-spm.gguf");
    let g = MappedGguf::open(&path).unwrap();
    let model_path = dir.path().join("model.gguf");
    vocab()
        .save_json(&dir.path().join("tokenizer.json"))
        .unwrap();
    let from_json = Tokenizer::for_model(&g.info, &model_path).unwrap();
    assert_eq!(from_json.vocab_size(), 32000);
    for (text, want) in vectors() {
        assert_eq!(from_json.encode(&text).unwrap(), want, "{text:?}");
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::for_model(&g.info, &model_path)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
