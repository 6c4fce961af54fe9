//! The scheduler (continuous batching, chunked prefill under a step budget, prompt cache,
//! queue bound, cancellation) on the bundled trained model, with its events recorded in the
//! exact order the engine thread sends them.
#![cfg(feature = "daemon")]

use mistrald::engine::prompt_cache::PromptCacheConfig;
use mistrald::engine::scheduler::{
    self, SchedulerConfig, SchedulerHandle, SeqEvent, SeqRequest, SubmitError,
};
use mistrald::engine::{self, EngineConfig};
use mistrald::generation::{generate, FinishReason, GenerationParams};
use mistrald::kv_cache::KvType;
use mistrald::metrics::Metrics;
use mistrald::model::LoadOptions;
use mistrald::sampler::SamplerConfig;
use mistrald::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fortunes-22m-q8_0.gguf")
}

fn engine_cfg(batch_size: usize) -> EngineConfig {
    EngineConfig {
        n_threads: 2,
        kv_type: KvType::F32,
        batch_size,
        ..EngineConfig::default()
    }
}

fn start(
    parallel: usize,
    queue: usize,
    step_tokens: usize,
    cache_entries: usize,
) -> (SchedulerHandle, Arc<Tokenizer>) {
    let (_, tok) = engine::open(&model(), LoadOptions::default(), engine_cfg(64)).unwrap();
    let tok = Arc::new(tok);
    let (handle, info) = scheduler::start(
        || Ok(engine::open(&model(), LoadOptions::default(), engine_cfg(64))?.0),
        tok.clone(),
        SchedulerConfig {
            parallel,
            queue_capacity: queue,
            step_tokens,
            max_context: 2048,
            prompt_cache: PromptCacheConfig {
                max_entries: cache_entries,
                max_bytes: 1 << 30,
            },
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    assert_eq!(info.window, Some(128));
    (handle, tok)
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        stop: Vec::new(),
        sampler: SamplerConfig::greedy(),
        logprobs: None,
        ignore_eos: false,
    }
}

/// Every event of every request, in the order the engine thread sent them.
type Log = Arc<Mutex<Vec<(u64, SeqEvent)>>>;

struct Submitted {
    done: mpsc::Receiver<()>,
    cancel: Arc<AtomicBool>,
}

fn submit(
    h: &SchedulerHandle,
    log: &Log,
    id: u64,
    prompt: Vec<u32>,
    params: GenerationParams,
) -> Result<Submitted, SubmitError> {
    let (tx, rx) = mpsc::channel();
    let log = log.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    h.submit(SeqRequest {
        id,
        prompt,
        params,
        cancel: cancel.clone(),
        sink: Box::new(move |ev| {
            let end = matches!(ev, SeqEvent::Done(_) | SeqEvent::Failed(_));
            log.lock().unwrap().push((id, ev));
            if end {
                let _ = tx.send(());
            }
            true
        }),
    })?;
    Ok(Submitted { done: rx, cancel })
}

fn wait(s: &Submitted) {
    s.done
        .recv_timeout(Duration::from_secs(120))
        .expect("request finished");
}

fn tokens_of(log: &Log, id: u64) -> Vec<u32> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|(i, e)| match e {
            SeqEvent::Token { token, .. } if *i == id => Some(*token),
            _ => None,
        })
        .collect()
}

fn text_of(log: &Log, id: u64) -> String {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|(i, e)| match e {
            SeqEvent::Token { text, .. } if *i == id => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn started(log: &Log, id: u64) -> (usize, usize) {
    log.lock()
        .unwrap()
        .iter()
        .find_map(|(i, e)| match e {
            SeqEvent::Started {
                prompt_tokens,
                cached_tokens,
            } if *i == id => Some((*prompt_tokens, *cached_tokens)),
            _ => None,
        })
        .expect("started")
}

const PROMPTS: [&str; 8] = [
    "The meaning of life is",
    "Computers are",
    "A man walks into a bar",
    "Never",
    "You will be",
    "Love is",
    "The best way to keep a secret",
    "If at first you do not succeed",
];

#[test]
fn eight_concurrent_greedy_requests_equal_one_at_a_time_generation() {
    let (engine_alone, tok) =
        engine::open(&model(), LoadOptions::default(), engine_cfg(64)).unwrap();
    let mut engine_alone = engine_alone;
    let expected: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| {
            let prompt = tok.encode_prompt(p).unwrap();
            let mut seq = engine_alone.new_sequence().unwrap();
            generate(
                &mut engine_alone,
                &tok,
                &mut seq,
                &prompt,
                &greedy(40),
                |_| true,
            )
            .unwrap()
            .tokens
        })
        .collect();
    // One engine at a time (with GPU offload they would share the device from two threads).
    drop(engine_alone);
    let (h, tok) = start(8, 16, 64, 0);
    let log: Log = Default::default();
    let subs: Vec<Submitted> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            submit(
                &h,
                &log,
                i as u64,
                tok.encode_prompt(p).unwrap(),
                greedy(40),
            )
            .unwrap()
        })
        .collect();
    subs.iter().for_each(wait);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(
            &tokens_of(&log, i as u64),
            want,
            "request {i} ({:?})",
            PROMPTS[i]
        );
    }
    // They ran together: some step carried tokens of several requests (events interleave).
    let order: Vec<u64> = log.lock().unwrap().iter().map(|(i, _)| *i).collect();
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches > 40,
        "events of the 8 requests interleave ({switches} switches)"
    );
    assert_eq!(h.stats().active, 0);
    h.close();
    h.join();
}

#[test]
fn a_long_prompt_holds_running_streams_up_for_at_most_one_chunk() {
    // Step budget 16: a 300-token prompt needs many steps to prefill.
    let (h, tok) = start(4, 8, 16, 0);
    let log: Log = Default::default();
    let runner = submit(
        &h,
        &log,
        1,
        tok.encode_prompt("Never").unwrap(),
        // Runs past any EOS, so it is still decoding for the whole prefill.
        GenerationParams {
            ignore_eos: true,
            ..greedy(200)
        },
    )
    .unwrap();
    // Let the first stream start decoding.
    while tokens_of(&log, 1).len() < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let long: Vec<u32> = (0..300).map(|i| 300 + (i * 37 % 20000) as u32).collect();
    let long_req = submit(&h, &log, 2, long, greedy(4)).unwrap();
    wait(&long_req);
    wait(&runner);
    let events = log.lock().unwrap();
    let begin = events
        .iter()
        .position(|(i, e)| *i == 2 && matches!(e, SeqEvent::Started { .. }))
        .unwrap();
    let first = events
        .iter()
        .position(|(i, e)| *i == 2 && matches!(e, SeqEvent::Token { .. }))
        .unwrap();
    let runner_tokens = events[begin..first]
        .iter()
        .filter(|(i, e)| *i == 1 && matches!(e, SeqEvent::Token { .. }))
        .count();
    // 300 tokens at most 15 per step (one token of the budget goes to the running stream):
    // at least 20 steps, each giving the running stream a token.
    assert!(
        runner_tokens >= 19,
        "the running stream got {runner_tokens} tokens while the long prompt prefilled"
    );
    drop(events);
    h.close();
    h.join();
}

#[test]
fn a_follow_up_continues_from_the_prompt_cache_and_matches_a_cold_run() {
    let (h, tok) = start(2, 8, 64, 4);
    let log: Log = Default::default();
    let first_prompt = tok.encode_prompt("A man walks into a bar").unwrap();
    let a = submit(&h, &log, 1, first_prompt.clone(), greedy(20)).unwrap();
    wait(&a);
    let first_out = tokens_of(&log, 1);
    // The follow-up: the whole first exchange plus new text.
    let mut follow = first_prompt.clone();
    follow.extend(&first_out);
    follow.extend(tok.encode(" and then").unwrap());
    let b = submit(&h, &log, 2, follow.clone(), greedy(20)).unwrap();
    wait(&b);
    let (prompt_tokens, cached) = started(&log, 2);
    assert_eq!(prompt_tokens, follow.len());
    // The first request's history: its prompt and every generated token but the last (never fed).
    assert_eq!(
        cached,
        first_prompt.len() + first_out.len() - 1,
        "cached tokens"
    );
    h.close();
    h.join();
    // Cold: a scheduler without a prompt cache.
    let (cold, _) = start(2, 8, 64, 0);
    let c = submit(&cold, &log, 3, follow, greedy(20)).unwrap();
    wait(&c);
    assert_eq!(started(&log, 3).1, 0);
    assert_eq!(
        tokens_of(&log, 2),
        tokens_of(&log, 3),
        "cached and cold runs agree"
    );
    assert_eq!(text_of(&log, 2), text_of(&log, 3));
    cold.close();
    cold.join();
}

#[test]
fn a_shared_prefix_reuses_a_cut_back_entry() {
    let (h, tok) = start(1, 8, 64, 4);
    let log: Log = Default::default();
    let stem =
        "Never put off until tomorrow what you can put off until the day after tomorrow, said";
    let first = tok
        .encode_prompt(&format!("{stem} the old man to his son"))
        .unwrap();
    let a = submit(&h, &log, 1, first.clone(), greedy(5)).unwrap();
    wait(&a);
    let other = tok.encode_prompt(&format!("{stem} nobody ever")).unwrap();
    let b = submit(&h, &log, 2, other.clone(), greedy(5)).unwrap();
    wait(&b);
    let shared = first.iter().zip(&other).take_while(|(x, y)| x == y).count();
    assert!(shared >= mistrald::engine::prompt_cache::MIN_PARTIAL_REUSE);
    assert_eq!(started(&log, 2).1, shared, "cut back to the shared prefix");
    // Only BOS in common: not worth taking the entry.
    let c = submit(
        &h,
        &log,
        3,
        tok.encode_prompt("Love is").unwrap(),
        greedy(2),
    )
    .unwrap();
    wait(&c);
    assert_eq!(started(&log, 3).1, 0);
    h.close();
    h.join();
}

#[test]
fn a_full_queue_refuses_at_once_and_cancellation_frees_the_sequence() {
    let (h, tok) = start(1, 2, 64, 0);
    let log: Log = Default::default();
    let p = tok.encode_prompt("Never").unwrap();
    let running = submit(&h, &log, 1, p.clone(), greedy(100_000)).unwrap();
    while tokens_of(&log, 1).is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let q1 = submit(&h, &log, 2, p.clone(), greedy(3)).unwrap();
    let q2 = submit(&h, &log, 3, p.clone(), greedy(3)).unwrap();
    assert!(matches!(
        submit(&h, &log, 4, p.clone(), greedy(3)),
        Err(SubmitError::QueueFull { queued: 2 })
    ));
    assert_eq!(h.stats().queued, 2);
    running
        .cancel
        .store(true, std::sync::atomic::Ordering::Relaxed);
    wait(&running);
    let done = log.lock().unwrap().iter().find_map(|(i, e)| match e {
        SeqEvent::Done(s) if *i == 1 => Some(s.finish),
        _ => None,
    });
    assert_eq!(done, Some(FinishReason::Cancelled));
    wait(&q1);
    wait(&q2);
    assert_eq!(tokens_of(&log, 2).len(), 3);
    // Invalid prompts are refused at submission.
    assert!(matches!(
        submit(&h, &log, 5, vec![], greedy(3)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        submit(&h, &log, 6, vec![1; 5000], greedy(3)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        submit(&h, &log, 7, vec![99_999], greedy(3)),
        Err(SubmitError::Invalid(_))
    ));
    // Shutdown: aborting ends a running request with Failed and refuses new ones.
    let long = submit(&h, &log, 8, p.clone(), greedy(100_000)).unwrap();
    while tokens_of(&log, 8).is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    h.abort_all("the server is shutting down");
    wait(&long);
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|(i, e)| *i == 8 && matches!(e, SeqEvent::Failed(m) if m.contains("shutting down"))));
    assert!(matches!(
        submit(&h, &log, 9, p, greedy(3)),
        Err(SubmitError::ShuttingDown)
    ));
    h.join();
    assert!(h.is_finished());
}
