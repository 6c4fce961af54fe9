//! End-to-end tests on the trained model `fortunes-22m` (tests/data/, models/): mistrald's
//! greedy output must equal the reference implementation's (Hugging Face transformers'
//! `MistralForCausalLM`, f32) token for token, the bundled Q8_0 file must stay close to the
//! F16 original, and perplexity over text several windows long must not depend on how the
//! text is split into steps.

mod common;

use mistrald::engine::{self, Engine, EngineConfig, Logits};
use mistrald::generation::{generate, FinishReason, GenerationParams};
use mistrald::kv_cache::KvType;
use mistrald::model::LoadOptions;
use mistrald::sampler::SamplerConfig;
use mistrald::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fortunes-22m-q8_0.gguf")
}

fn open(path: &Path, kv_type: KvType, batch_size: usize) -> (Engine, Tokenizer) {
    let cfg = EngineConfig {
        n_threads: 2,
        kv_type,
        batch_size,
        ..EngineConfig::default()
    };
    engine::open(path, LoadOptions::default(), cfg).expect("open the trained model")
}

struct Case {
    prompt: String,
    prompt_tokens: Vec<u32>,
    greedy_tokens: Vec<u32>,
    greedy_text: String,
}

fn reference_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(data("fortunes-22m-reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            prompt_tokens: ids(&c["prompt_tokens"]),
            greedy_tokens: ids(&c["greedy_tokens"]),
            greedy_text: c["greedy_text"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Greedy decoding through `generation::generate`, the code path of `mistrald generate`.
fn greedy(
    engine: &mut Engine,
    tok: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, String, FinishReason) {
    let params = GenerationParams {
        max_tokens,
        stop: Vec::new(),
        sampler: SamplerConfig::greedy(),
        logprobs: None,
        ignore_eos: false,
    };
    let mut seq = engine.new_sequence().unwrap();
    let mut text = String::new();
    let stats = generate(engine, tok, &mut seq, prompt, &params, |piece| {
        text.push_str(piece);
        true
    })
    .unwrap();
    (stats.tokens, text, stats.finish)
}

fn check_reference(kv_type: KvType) {
    let (mut engine, tok) = open(&data("fortunes-22m-f16.gguf"), kv_type, 512);
    assert_eq!(
        engine.window(),
        Some(128),
        "the file's sliding window is used"
    );
    let cases = reference_cases();
    assert_eq!(cases.len(), 6);
    for case in &cases {
        let mut prompt: Vec<u32> = tok.bos().into_iter().collect();
        prompt.extend(tok.encode(&case.prompt).unwrap());
        assert_eq!(
            prompt, case.prompt_tokens,
            "tokenization of {:?}",
            case.prompt
        );
        let (ids, text, finish) = greedy(&mut engine, &tok, &prompt, 48);
        assert_eq!(
            ids, case.greedy_tokens,
            "{kv_type:?} cache: greedy continuation of {:?}",
            case.prompt
        );
        let expected_text = case.greedy_text.trim_end_matches("</s>");
        assert_eq!(
            text.trim_start(),
            expected_text.trim_start(),
            "text of {:?}",
            case.prompt
        );
        let expected_finish = if ids.last() == Some(&2) {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(finish, expected_finish);
    }
}

#[test]
fn greedy_decoding_reproduces_the_reference_token_ids_f32_cache() {
    check_reference(KvType::F32);
}

#[test]
fn greedy_decoding_reproduces_the_reference_token_ids_default_f16_cache() {
    check_reference(KvType::F16);
}

/// About 350 tokens of fortune-style text (written for this test), over two windows long.
const FORTUNE_TEXT: &str = "You will be successful in everything you do today, except for the \
things that matter. A friend is someone who knows all about you and likes you anyway. The \
best way to keep a secret is to forget it at once. Never put off until tomorrow what you can \
put off until the day after tomorrow. Every man has his price, but some of them are on sale. \
If at first you do not succeed, read the instructions again. The early bird gets the worm, \
but the second mouse gets the cheese. A clean desk is a sign of a cluttered drawer. There is \
no time like the present for postponing what you ought to be doing. He who laughs last \
thinks slowest. You have an unusual talent for making the simple things complicated. Money \
cannot buy happiness, but it can rent it for a while. The trouble with doing nothing is that \
you never know when you are finished. Experience is what you get when you did not get what \
you wanted. A day without sunshine is like night. Always remember that you are unique, just \
like everybody else. The only thing worse than being talked about is not being talked about. \
Be careful what you wish for, because the world has a strange sense of humor. Do not take \
life too seriously; you will never get out of it alive. Behind every great man there is a \
woman who is surprised. A journey of a thousand miles begins with a wrong turn. Your lucky \
number is seven, but only on days that end in y. Time flies like an arrow, and fruit flies \
like a banana. Wisdom comes with age, but sometimes age comes alone.";

fn fortune_tokens(tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.bos().into_iter().collect();
    ids.extend(tok.encode(FORTUNE_TEXT).unwrap());
    ids
}

/// Perplexity of `ids` fed to a fresh sequence in steps of at most `chunk` tokens.
fn perplexity(engine: &mut Engine, ids: &[u32], chunk: usize) -> f64 {
    let n_vocab = engine.hparams().n_vocab;
    let mut seq = engine.new_sequence().unwrap();
    let mut logits = Vec::new();
    for part in ids.chunks(chunk) {
        logits.extend(engine.feed(&mut seq, part, Logits::All).unwrap());
    }
    mistrald::sampler::perplexity(&logits, ids, n_vocab)
}

#[test]
fn perplexity_does_not_depend_on_how_the_text_is_split() {
    let (mut engine, tok) = open(&data("fortunes-22m-f16.gguf"), KvType::F32, 512);
    let ids = fortune_tokens(&tok);
    assert!(
        ids.len() > 2 * 128,
        "{} tokens: over two windows long",
        ids.len()
    );
    // `feed` of the whole text: steps as large as the ring allows (128 positions).
    let whole = perplexity(&mut engine, &ids, ids.len());
    let sevens = perplexity(&mut engine, &ids, 7);
    let singles = perplexity(&mut engine, &ids, 1);
    eprintln!("perplexity: whole {whole:.4}, chunks of 7 {sevens:.4}, token by token {singles:.4}");
    for (name, p) in [("chunks of 7", sevens), ("token by token", singles)] {
        assert!(
            ((p - whole) / whole).abs() < 1e-3,
            "{name}: perplexity {p} vs {whole} in one feed"
        );
    }
    // A trained model on text like its training data: far better than chance (32000).
    assert!(whole < 300.0, "perplexity {whole}");
}

#[test]
fn bundled_q8_0_model_stays_close_to_the_f16_original() {
    let (mut f16, tok) = open(&data("fortunes-22m-f16.gguf"), KvType::F32, 512);
    let (mut q8, _) = open(&bundled(), KvType::F32, 512);
    let ids = fortune_tokens(&tok);
    let n_vocab = f16.hparams().n_vocab;
    let mut a_seq = f16.new_sequence().unwrap();
    let mut b_seq = q8.new_sequence().unwrap();
    let a = f16.feed(&mut a_seq, &ids, Logits::All).unwrap();
    let b = q8.feed(&mut b_seq, &ids, Logits::All).unwrap();
    let mut worst = 0f32;
    let mut same_argmax = 0;
    for (ra, rb) in a.chunks(n_vocab).zip(b.chunks(n_vocab)) {
        worst = worst.max(common::max_abs_diff(ra, rb));
        same_argmax += (common::argmax(ra) == common::argmax(rb)) as usize;
    }
    let n = ids.len();
    eprintln!(
        "Q8_0 vs F16 over {n} positions: max |logit difference| {worst:.4}, same argmax at {same_argmax}"
    );
    // Tolerance (README): every logit within 0.5 of the F16 file's (logits span about 30),
    // and the same most likely token at 95% of positions or more.
    assert!(worst < 0.5, "max logit difference {worst}");
    assert!(
        same_argmax * 100 >= 95 * n,
        "same argmax at {same_argmax} of {n}"
    );
    let p16 = perplexity(&mut f16, &ids, 512);
    let p8 = perplexity(&mut q8, &ids, 512);
    assert!(
        ((p8 - p16) / p16).abs() < 0.02,
        "perplexity Q8_0 {p8} vs F16 {p16}"
    );
}

#[test]
fn ignore_eos_generates_past_the_end_of_sequence_token() {
    let (mut engine, tok) = open(&data("fortunes-22m-f16.gguf"), KvType::F32, 512);
    let case = &reference_cases()[0];
    assert_eq!(
        case.greedy_tokens.last(),
        Some(&2),
        "the reference ends at </s>"
    );
    let params = GenerationParams {
        max_tokens: case.greedy_tokens.len() + 4,
        stop: Vec::new(),
        sampler: SamplerConfig::greedy(),
        logprobs: Some(3),
        ignore_eos: true,
    };
    let mut seq = engine.new_sequence().unwrap();
    let stats = generate(
        &mut engine,
        &tok,
        &mut seq,
        &case.prompt_tokens,
        &params,
        |_| true,
    )
    .unwrap();
    assert_eq!(stats.finish, FinishReason::Length);
    assert_eq!(stats.tokens.len(), case.greedy_tokens.len() + 4);
    assert_eq!(
        &stats.tokens[..case.greedy_tokens.len()],
        &case.greedy_tokens[..]
    );
}
