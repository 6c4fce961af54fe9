//! The scheduler: continuous batching of many requests over one [`Engine`].
//!
//! One engine thread owns the engine, every sequence and the prompt cache. Front ends submit
//! [`SeqRequest`]s (prompt tokens, generation parameters, an event sink) through a
//! [`SchedulerHandle`]; the bounded queue refuses at once when full. The thread runs steps:
//!
//! 1. drop cancelled requests (their sequences go to the prompt cache), admit queued ones in
//!    FIFO order while fewer than `parallel` run — each continues the prompt-cache entry that
//!    shares the longest prefix with it, or takes a fresh sequence;
//! 2. build one batch: one token for every decoding sequence, then prompt chunks for
//!    sequences still prefilling, in admission order, while the per-step token budget lasts
//!    (the first prefilling sequence always gets at least one token), so a long prompt holds
//!    running streams up for at most one chunk;
//! 3. run [`Engine::step`], then sample each sequence that produced logits through its
//!    [`Generation`] and send the text to its sink; finished sequences leave the batch and
//!    are kept in the prompt cache.
//!
//! Nothing here knows about sockets, JSON or plugins.

use super::prompt_cache::{PromptCache, PromptCacheConfig};
use super::{BatchItem, Engine, Logits, Sequence};
use crate::generation::{FinishReason, Generation, GenerationParams, TokenProb};
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Settings of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences processed at once.
    pub parallel: usize,
    /// Most requests waiting for a sequence; more are refused.
    pub queue_capacity: usize,
    /// Most tokens one step processes over all sequences (decode tokens + prompt chunks).
    pub step_tokens: usize,
    /// Most positions one request may use (prompt + output); the engine's context length
    /// when that is smaller.
    pub max_context: usize,
    /// Bounds of the prompt cache.
    pub prompt_cache: PromptCacheConfig,
}

/// What the engine thread reports for a request, in order: `Started`, `Token`s, then `Done`
/// or `Failed`.
#[derive(Clone, Debug)]
pub enum SeqEvent {
    /// Admitted; its prompt is being processed.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Of those, taken from the prompt cache.
        cached_tokens: usize,
    },
    /// One sampled token and the text it releases (often empty while a character or a
    /// possible stop string is incomplete).
    Token {
        /// The token.
        token: u32,
        /// Text released.
        text: String,
        /// Its log-probability, when asked for.
        prob: Option<TokenProb>,
    },
    /// Finished.
    Done(SeqSummary),
    /// Failed (engine error, or ended by shutdown); the message says why.
    Failed(String),
}

/// Counts and timings of a finished request.
#[derive(Clone, Debug)]
pub struct SeqSummary {
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prompt cache.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent in the queue.
    pub queued: Duration,
    /// From admission to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// From the first to the last generated token.
    pub decode: Duration,
}

/// Receives a request's events on the engine thread; returns false when nobody listens any
/// more (the request is then cancelled). Must not block.
pub type EventSink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

/// A request for the scheduler.
pub struct SeqRequest {
    /// Daemon-unique id (for logs).
    pub id: u64,
    /// Prompt tokens (BOS included when wanted).
    pub prompt: Vec<u32>,
    /// How to generate.
    pub params: GenerationParams,
    /// Where its events go.
    pub sink: EventSink,
    /// Set to cancel it; checked before every step.
    pub cancel: Arc<AtomicBool>,
}

/// Why a request was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the queue is full ({queued} requests waiting)")]
    QueueFull {
        /// Requests waiting.
        queued: usize,
    },
    /// The scheduler no longer accepts requests.
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    /// The prompt cannot be processed (empty, too long, token outside the vocabulary).
    #[error("{0}")]
    Invalid(String),
}

/// A snapshot of the scheduler.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    /// Requests waiting.
    pub queued: usize,
    /// Requests being processed.
    pub active: usize,
    /// Prompt-cache entries.
    pub cache_entries: usize,
    /// Bytes of KV memory in the prompt cache.
    pub cache_bytes: usize,
    /// Tokens generated per second over the last [`RATE_WINDOW`].
    pub tokens_per_second: f64,
    /// Requests finished (any outcome) since start.
    pub finished: u64,
    /// Engine steps run.
    pub steps: u64,
}

/// Span over which `tokens_per_second` is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// How often the idle engine thread wakes up (for its heartbeat).
const IDLE_WAKE: Duration = Duration::from_millis(500);

struct Queue {
    waiting: VecDeque<(SeqRequest, Instant)>,
    closed: bool,
    abort: Option<String>,
}

struct Shared {
    cfg: SchedulerConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Mutex<SchedulerStats>,
    rate: Mutex<VecDeque<(Instant, usize)>>,
    heartbeat: AtomicU64,
    /// Called by the engine loop on every iteration (the service manager's watchdog).
    on_heartbeat: OnceLock<Box<dyn Fn() + Send + Sync>>,
    started: Instant,
    metrics: Arc<Metrics>,
    n_vocab: usize,
}

/// The front ends' handle on the engine thread (cheap to clone).
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Facts about the engine the scheduler runs, for logs and status.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Sliding window (`None`: full attention).
    pub window: Option<usize>,
    /// Context length of the engine.
    pub n_ctx: usize,
    /// Most positions one request may use (the configured bound, at most `n_ctx`).
    pub max_context: usize,
    /// Bytes of one sequence's KV cache.
    pub kv_bytes_per_sequence: usize,
    /// Compute threads.
    pub n_threads: usize,
    /// The attention implementation in use.
    pub attention: String,
    /// The matrix products in use.
    pub matmul: String,
    /// What runs on a GPU, in words (`None`: the CPU only).
    pub offload: Option<String>,
}

/// Starts the engine thread: it runs `load` (ggml objects stay on the thread that owns them)
/// and then serves requests. Returns once the engine is loaded, or with `load`'s error.
pub fn start(
    load: impl FnOnce() -> anyhow::Result<Engine> + Send + 'static,
    tokenizer: Arc<Tokenizer>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(SchedulerHandle, EngineInfo)> {
    anyhow::ensure!(cfg.parallel >= 1, "parallel must be at least 1");
    anyhow::ensure!(
        cfg.queue_capacity >= 1,
        "the queue needs room for one request"
    );
    anyhow::ensure!(
        cfg.max_context >= 2,
        "the context must hold at least 2 positions"
    );
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<anyhow::Result<(Arc<Shared>, EngineInfo)>>();
    let thread = std::thread::Builder::new()
        .name("mistrald-engine".into())
        .spawn(move || {
            let mut cfg = cfg;
            let engine = match load() {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            cfg.max_context = cfg.max_context.min(engine.n_ctx());
            if cfg.max_context < 2 {
                let _ = ready_tx.send(Err(anyhow::anyhow!(
                    "the context must hold at least 2 positions"
                )));
                return;
            }
            let info = EngineInfo {
                n_vocab: engine.hparams().n_vocab,
                window: engine.window(),
                n_ctx: engine.n_ctx(),
                max_context: cfg.max_context,
                kv_bytes_per_sequence: engine.kv_shape().total_bytes(),
                n_threads: engine.config().n_threads,
                attention: engine.attention().describe(),
                matmul: engine.matmul().map_or("ggml mul_mat".to_string(), |m| {
                    format!("native {}", m.describe())
                }),
                offload: engine
                    .gpu_usage()
                    .map(|g| g.describe(engine.hparams().n_layer)),
            };
            let shared = Arc::new(Shared {
                n_vocab: info.n_vocab,
                cfg,
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    closed: false,
                    abort: None,
                }),
                wake: Condvar::new(),
                stats: Mutex::new(SchedulerStats::default()),
                rate: Mutex::new(VecDeque::new()),
                heartbeat: AtomicU64::new(0),
                on_heartbeat: OnceLock::new(),
                started: Instant::now(),
                metrics,
            });
            let worker = Worker {
                shared: shared.clone(),
                cache: PromptCache::new(shared.cfg.prompt_cache),
                engine,
                tokenizer,
                active: Vec::new(),
                pool: Vec::new(),
            };
            if ready_tx.send(Ok((shared, info))).is_ok() {
                worker.run();
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok((shared, info))) => Ok((
            SchedulerHandle {
                shared,
                thread: Arc::new(Mutex::new(Some(thread))),
            },
            info,
        )),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            anyhow::bail!("the engine thread ended while loading the model")
        }
    }
}

impl SchedulerHandle {
    /// Queues `req`, or refuses it at once.
    pub fn submit(&self, req: SeqRequest) -> Result<(), SubmitError> {
        let cfg = &self.shared.cfg;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        if req.prompt.len() >= cfg.max_context {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the context holds {} (prompt and output)",
                req.prompt.len(),
                cfg.max_context
            )));
        }
        if let Some(bad) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.shared.n_vocab)
        {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.shared.n_vocab
            )));
        }
        req.params
            .sampler
            .validate()
            .map_err(SubmitError::Invalid)?;
        let mut q = self.shared.queue.lock().unwrap();
        if q.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if q.waiting.len() >= cfg.queue_capacity {
            return Err(SubmitError::QueueFull {
                queued: q.waiting.len(),
            });
        }
        q.waiting.push_back((req, Instant::now()));
        self.shared.metrics.queue_length.set(q.waiting.len() as i64);
        self.shared.stats.lock().unwrap().queued = q.waiting.len();
        drop(q);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// A snapshot of queue, batch, prompt cache and throughput.
    pub fn stats(&self) -> SchedulerStats {
        let mut s = self.shared.stats.lock().unwrap().clone();
        let now = Instant::now();
        let rate = self.shared.rate.lock().unwrap();
        let tokens: usize = rate
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        let span = RATE_WINDOW.min(now.duration_since(self.shared.started));
        s.tokens_per_second = tokens as f64 / span.as_secs_f64().max(1e-3);
        s
    }

    /// The configuration the scheduler runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.cfg
    }

    /// Milliseconds since start at the engine thread's last loop (it loops at least every
    /// half second even when idle), for a watchdog that checks the engine, not just the process.
    pub fn heartbeat_ms(&self) -> u64 {
        self.shared.heartbeat.load(Ordering::Relaxed)
    }

    /// Has the engine loop call `f` on every iteration (at least every half second when idle,
    /// after every step when busy): a watchdog fed by it sees a hung engine, not just a live
    /// process. Only the first hook set is kept.
    pub fn on_heartbeat(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_heartbeat.set(Box::new(f));
    }

    /// Milliseconds since the scheduler started.
    pub fn uptime_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    /// Stops accepting requests; queued and running ones still finish.
    pub fn close(&self) {
        self.shared.queue.lock().unwrap().closed = true;
        self.shared.wake.notify_all();
    }

    /// Ends every queued and running request with [`SeqEvent::Failed`]`(reason)` before the
    /// next step, and stops accepting new ones.
    pub fn abort_all(&self, reason: &str) {
        let mut q = self.shared.queue.lock().unwrap();
        q.closed = true;
        q.abort = Some(reason.to_string());
        drop(q);
        self.shared.wake.notify_all();
    }

    /// Whether the engine thread has exited (after [`close`](Self::close) and the last
    /// request).
    pub fn is_finished(&self) -> bool {
        self.thread
            .lock()
            .unwrap()
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Waits for the engine thread to exit (call [`close`](Self::close) or
    /// [`abort_all`](Self::abort_all) first).
    pub fn join(&self) {
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("the engine thread panicked");
            }
        }
    }
}

/// A request being processed.
struct Active {
    id: u64,
    sink: EventSink,
    cancel: Arc<AtomicBool>,
    seq: Sequence,
    prompt: Vec<u32>,
    /// Prompt tokens in the cache so far.
    fed: usize,
    /// Every token whose keys/values the sequence holds, in order.
    history: Vec<u32>,
    generation: Generation,
    /// The sampled token to feed in the next step.
    pending: Option<u32>,
    cached: usize,
    queued: Duration,
    admitted: Instant,
    first_token: Option<Instant>,
    done: bool,
    failed: bool,
}

struct Worker {
    shared: Arc<Shared>,
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    cache: PromptCache,
    active: Vec<Active>,
    /// Reset sequences ready for reuse.
    pool: Vec<Sequence>,
}

impl Worker {
    fn run(mut self) {
        loop {
            self.beat();
            let (admitted, abort) = {
                let mut q = self.shared.queue.lock().unwrap();
                if q.waiting.is_empty() && self.active.is_empty() && q.abort.is_none() {
                    if q.closed {
                        break;
                    }
                    q = self.shared.wake.wait_timeout(q, IDLE_WAKE).unwrap().0;
                }
                let abort = q.abort.clone();
                let free = self.shared.cfg.parallel.saturating_sub(self.active.len());
                let mut admitted = Vec::new();
                if abort.is_some() {
                    admitted.extend(q.waiting.drain(..));
                } else {
                    while admitted.len() < free {
                        match q.waiting.pop_front() {
                            Some(r) => admitted.push(r),
                            None => break,
                        }
                    }
                }
                self.shared.metrics.queue_length.set(q.waiting.len() as i64);
                self.shared.stats.lock().unwrap().queued = q.waiting.len();
                (admitted, abort)
            };
            if let Some(reason) = abort {
                for (mut req, _) in admitted {
                    (req.sink)(SeqEvent::Failed(reason.clone()));
                }
                for a in std::mem::take(&mut self.active) {
                    self.fail(a, &reason);
                }
                let mut q = self.shared.queue.lock().unwrap();
                q.abort = None;
                if q.closed && q.waiting.is_empty() {
                    break;
                }
                continue;
            }
            let admitting = !admitted.is_empty();
            for (req, t) in admitted {
                self.admit(req, t);
            }
            if admitting {
                // Status counts a request as active before any of its tokens is sent.
                self.publish();
            }
            self.drop_cancelled();
            if self.active.is_empty() {
                self.publish();
                continue;
            }
            self.step();
            self.publish();
        }
        for a in std::mem::take(&mut self.active) {
            self.fail(a, "the server is shutting down");
        }
        self.publish();
    }

    fn beat(&self) {
        self.shared.heartbeat.store(
            self.shared.started.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        if let Some(hook) = self.shared.on_heartbeat.get() {
            hook();
        }
    }

    fn admit(&mut self, mut req: SeqRequest, enqueued: Instant) {
        if req.cancel.load(Ordering::Relaxed) {
            self.count_finished();
            (req.sink)(SeqEvent::Done(SeqSummary {
                finish: FinishReason::Cancelled,
                prompt_tokens: req.prompt.len(),
                cached_tokens: 0,
                generated_tokens: 0,
                queued: enqueued.elapsed(),
                time_to_first_token: None,
                decode: Duration::ZERO,
            }));
            return;
        }
        let generation = match Generation::new(&req.params, &req.prompt) {
            Ok(g) => g,
            Err(e) => {
                (req.sink)(SeqEvent::Failed(format!("{e:#}")));
                self.count_finished();
                return;
            }
        };
        let (seq, cached) = match self.cache.take(&req.prompt) {
            Some(hit) => {
                self.shared.metrics.prompt_cache_hits.inc();
                (hit.seq, hit.reused)
            }
            None => {
                self.shared.metrics.prompt_cache_misses.inc();
                let seq = match self.pool.pop() {
                    Some(s) => Ok(s),
                    None => self.engine.new_sequence(),
                };
                match seq {
                    Ok(s) => (s, 0),
                    Err(e) => {
                        log::error!("request {}: cannot allocate a sequence: {e:#}", req.id);
                        (req.sink)(SeqEvent::Failed(format!(
                            "cannot allocate the sequence's KV cache: {e:#}"
                        )));
                        self.count_finished();
                        return;
                    }
                }
            }
        };
        let metrics = &self.shared.metrics;
        metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
        metrics.cached_prompt_tokens.inc_by(cached as u64);
        let alive = (req.sink)(SeqEvent::Started {
            prompt_tokens: req.prompt.len(),
            cached_tokens: cached,
        });
        if !alive {
            req.cancel.store(true, Ordering::Relaxed);
        }
        self.active.push(Active {
            id: req.id,
            sink: req.sink,
            cancel: req.cancel,
            history: req.prompt[..cached].to_vec(),
            seq,
            prompt: req.prompt,
            fed: cached,
            generation,
            pending: None,
            cached,
            queued: enqueued.elapsed(),
            admitted: Instant::now(),
            first_token: None,
            done: false,
            failed: false,
        });
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].cancel.load(Ordering::Relaxed) {
                let mut a = self.active.remove(i);
                a.generation.cancel();
                log::debug!("request {}: cancelled", a.id);
                self.finish(a, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// One engine step over every active sequence that has work.
    fn step(&mut self) {
        let max_step = self.engine.max_step();
        let mut budget = self.shared.cfg.step_tokens.max(1);
        // Per active sequence: the tokens it contributes and which logits it needs.
        let mut plan: Vec<Option<(Vec<u32>, Logits)>> = vec![None; self.active.len()];
        for (p, a) in plan.iter_mut().zip(&self.active) {
            if let Some(t) = a.pending {
                *p = Some((vec![t], Logits::Last));
                budget = budget.saturating_sub(1);
            }
        }
        let mut first_prefill = true;
        for (p, a) in plan.iter_mut().zip(&self.active) {
            let left = a.prompt.len() - a.fed;
            if a.pending.is_some() || left == 0 {
                continue;
            }
            let allowance = if first_prefill { budget.max(1) } else { budget };
            let n = left.min(max_step).min(allowance);
            if n == 0 {
                break;
            }
            first_prefill = false;
            budget -= n.min(budget);
            let want = if n == left {
                Logits::Last
            } else {
                Logits::None
            };
            *p = Some((a.prompt[a.fed..a.fed + n].to_vec(), want));
        }
        let t0 = Instant::now();
        let result = {
            let mut items: Vec<BatchItem<'_>> = self
                .active
                .iter_mut()
                .zip(&plan)
                .filter_map(|(a, p)| {
                    p.as_ref().map(|(tokens, logits)| BatchItem {
                        seq: &mut a.seq,
                        tokens,
                        logits: *logits,
                    })
                })
                .collect();
            self.engine.step(&mut items)
        };
        let elapsed = t0.elapsed();
        self.shared
            .metrics
            .step_latency
            .observe(elapsed.as_secs_f64());
        self.shared.stats.lock().unwrap().steps += 1;
        let mut rows = match result {
            Ok(rows) => rows.into_iter(),
            Err(e) => {
                log::error!("engine step failed: {e:#}");
                let msg = format!("the engine failed: {e:#}");
                let mut keep = Vec::new();
                for (a, p) in std::mem::take(&mut self.active).into_iter().zip(plan) {
                    if p.is_some() {
                        self.fail(a, &msg);
                    } else {
                        keep.push(a);
                    }
                }
                self.active = keep;
                return;
            }
        };
        let mut generated = 0;
        for (a, p) in self.active.iter_mut().zip(plan) {
            let Some((tokens, want)) = p else { continue };
            let logits = rows.next().unwrap_or_default();
            if a.pending.take().is_some() {
                a.history.extend(&tokens);
            } else {
                a.fed += tokens.len();
                a.history.extend(&tokens);
            }
            if want != Logits::Last {
                continue;
            }
            let room = a.seq.n_past() < self.shared.cfg.max_context as u64
                && a.seq.cache().remaining() != Some(0);
            let step = match a.generation.next(&self.tokenizer, &logits, room) {
                Ok(s) => s,
                Err(e) => {
                    (a.sink)(SeqEvent::Failed(format!("sampling failed: {e:#}")));
                    a.done = true;
                    a.generation.cancel();
                    a.failed = true;
                    continue;
                }
            };
            generated += 1;
            if a.first_token.is_none() {
                a.first_token = Some(Instant::now());
                self.shared
                    .metrics
                    .time_to_first_token
                    .observe(a.admitted.elapsed().as_secs_f64());
            }
            let alive = (a.sink)(SeqEvent::Token {
                token: step.token,
                text: step.text,
                prob: step.prob,
            });
            if !alive {
                a.cancel.store(true, Ordering::Relaxed);
            }
            match step.finish {
                Some(_) => a.done = true,
                None => a.pending = Some(step.token),
            }
        }
        self.shared
            .metrics
            .generated_tokens
            .inc_by(generated as u64);
        if generated > 0 {
            let mut rate = self.shared.rate.lock().unwrap();
            let now = Instant::now();
            rate.push_back((now, generated));
            while rate
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                rate.pop_front();
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done {
                let a = self.active.remove(i);
                match a.generation.finish_reason() {
                    Some(f) if !a.failed => self.finish(a, f),
                    _ => {
                        self.count_finished();
                        self.release(a.seq, None);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// Reports a finished request and keeps its sequence in the prompt cache.
    fn finish(&mut self, mut a: Active, finish: FinishReason) {
        let decode = a.first_token.map(|t| t.elapsed()).unwrap_or(Duration::ZERO);
        let summary = SeqSummary {
            finish,
            prompt_tokens: a.prompt.len(),
            cached_tokens: a.cached,
            generated_tokens: a.generation.tokens().len(),
            queued: a.queued,
            time_to_first_token: a.first_token.map(|t| t.duration_since(a.admitted)),
            decode,
        };
        let history = std::mem::take(&mut a.history);
        debug_assert_eq!(history.len() as u64, a.seq.n_past());
        // The sequence is back and the counts are current before the client hears of it.
        self.release(a.seq, Some(history));
        self.count_finished();
        self.publish();
        (a.sink)(SeqEvent::Done(summary));
    }

    fn fail(&mut self, mut a: Active, reason: &str) {
        self.release(a.seq, None);
        self.count_finished();
        self.publish();
        (a.sink)(SeqEvent::Failed(reason.to_string()));
    }

    /// Returns a sequence: into the prompt cache with its history, or reset into the pool.
    fn release(&mut self, seq: Sequence, history: Option<Vec<u32>>) {
        let spare = match history {
            Some(h) if h.len() as u64 == seq.n_past() => self.cache.insert(h, seq),
            _ => vec![seq],
        };
        for mut s in spare {
            if self.pool.len() < self.shared.cfg.parallel {
                s.reset();
                self.pool.push(s);
            }
        }
    }

    fn count_finished(&self) {
        self.shared.stats.lock().unwrap().finished += 1;
    }

    fn publish(&self) {
        let mut s = self.shared.stats.lock().unwrap();
        s.active = self.active.len();
        s.cache_entries = self.cache.len();
        s.cache_bytes = self.cache.bytes();
        self.shared
            .metrics
            .active_sequences
            .set(self.active.len() as i64);
    }
}
