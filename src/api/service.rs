//! The transport-agnostic request path, behind one [`Service`] that every front end calls:
//!
//! ```text
//! submit(ApiRequest)
//!   ├─ limits and parameter checks                      (InvalidRequest)
//!   ├─ on-prompt plugins on the prompt / each user and system message  (Rejected, PluginFault)
//!   ├─ chat template, tokenization, context check       (ContextTooLong)
//!   └─ scheduler queue                                   (Busy at once when full)
//! per request, on a blocking thread: engine events → on-chunk plugins (streams) →
//!   on-complete plugins → Event::Delta… Event::Done, one log line, metrics
//! ```
//!
//! Plugins run on blocking threads, never on the engine thread or a runtime worker: a slow or
//! hostile plugin delays only its own request.

use super::{
    ApiError, ApiRequest, Event, Finish, PromptInput, Status, TokenLogprob, Usage, MAX_TOP_LOGPROBS,
};
use crate::chat::ChatTemplate;
use crate::engine::scheduler::{SchedulerHandle, SeqEvent, SeqRequest, SubmitError};
use crate::generation::{FinishReason, GenerationParams, TokenProb};
use crate::metrics::Metrics;
use crate::plugins::{PluginChain, PluginError, PluginHost, RequestInfo};
use crate::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Limits the front ends enforce (reloadable with SIGHUP).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceLimits {
    /// Largest HTTP request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_body_bytes: 4 << 20,
            default_max_tokens: 512,
            max_tokens_limit: 32768,
            max_stop_strings: 16,
        }
    }
}

/// What the service needs once the model is loaded.
pub struct ReadyParts {
    /// The running scheduler.
    pub scheduler: SchedulerHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub template: ChatTemplate,
    /// Sliding window (`None`: full attention).
    pub window: Option<usize>,
    /// Most positions per request.
    pub context: usize,
    /// KV cache type name.
    pub kv_type: String,
}

/// The daemon's request path, shared (cheaply cloned) by every front end.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    model_id: String,
    model_path: String,
    created_unix: u64,
    started: Instant,
    ready: RwLock<Option<Arc<ReadyParts>>>,
    plugins: Option<Arc<PluginHost>>,
    limits: RwLock<ServiceLimits>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    requests_total: AtomicU64,
}

/// The events of one accepted request. Dropping it cancels the request (a client that
/// disconnects frees its sequence before the next engine step).
pub struct RequestStream {
    id: u64,
    prompt_tokens: usize,
    events: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestStream {
    /// The daemon-unique request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tokens of the rendered prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event; `None` after `Done` or `Error`.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Cancels the request (as dropping the stream does).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A flag that cancels the request when set (for front ends that cancel from elsewhere,
    /// such as a D-Bus `Cancel` call).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Service {
    /// A service for the model at `model_path`, not ready yet (requests get
    /// [`ApiError::NotReady`] until [`Service::set_ready`]).
    pub fn new(
        model_path: &std::path::Path,
        plugins: Option<Arc<PluginHost>>,
        limits: ServiceLimits,
        metrics: Arc<Metrics>,
    ) -> Service {
        let model_id = model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Service {
            inner: Arc::new(Inner {
                model_id,
                model_path: model_path.display().to_string(),
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                started: Instant::now(),
                ready: RwLock::new(None),
                plugins,
                limits: RwLock::new(limits),
                metrics,
                next_id: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                requests_total: AtomicU64::new(0),
            }),
        }
    }

    /// The model is loaded and the scheduler runs: requests are accepted from now on.
    pub fn set_ready(&self, parts: ReadyParts) {
        *self.inner.ready.write().unwrap() = Some(Arc::new(parts));
    }

    /// Refuse new requests from now on ([`ApiError::ShuttingDown`]); running ones continue.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        if let Some(r) = self.ready() {
            r.scheduler.close();
        }
    }

    /// Replaces the limits (SIGHUP).
    pub fn set_limits(&self, limits: ServiceLimits) {
        *self.inner.limits.write().unwrap() = limits;
    }

    /// The plugin host, when plugins are configured.
    pub fn plugins(&self) -> Option<&Arc<PluginHost>> {
        self.inner.plugins.as_ref()
    }

    /// The scheduler, once ready.
    pub fn scheduler(&self) -> Option<SchedulerHandle> {
        self.ready().map(|r| r.scheduler.clone())
    }

    fn ready(&self) -> Option<Arc<ReadyParts>> {
        self.inner.ready.read().unwrap().clone()
    }

    /// Runs `on-prompt`, renders and tokenizes the prompt, checks it against the limits and
    /// queues it. Fails at once when the queue is full ([`ApiError::Busy`]), the model is
    /// loading, the input is invalid or a plugin refuses the prompt.
    pub async fn submit(&self, req: ApiRequest) -> Result<RequestStream, ApiError> {
        let result = self.submit_inner(req).await;
        if let Err(e) = &result {
            self.inner.metrics.count_request(outcome_of_error(e));
        }
        result
    }

    async fn submit_inner(&self, req: ApiRequest) -> Result<RequestStream, ApiError> {
        if self.inner.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::ShuttingDown);
        }
        let ready = self.ready().ok_or(ApiError::NotReady)?;
        let params = self.generation_params(&req)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let info = RequestInfo {
            id,
            model: self.inner.model_id.clone(),
            client: req.peer.label.clone(),
            streaming: req.stream,
        };
        let chain = self
            .inner
            .plugins
            .as_ref()
            .map(|h| h.chain())
            .unwrap_or_else(|| Arc::new(PluginChain::empty()));
        // Plugins and tokenization off the runtime's workers.
        let prompt = {
            let ready = ready.clone();
            let chain = chain.clone();
            let info = info.clone();
            let input = req.input.clone();
            tokio::task::spawn_blocking(move || prepare_prompt(&ready, &chain, &info, input))
                .await
                .map_err(|e| ApiError::Internal(format!("prompt preparation panicked: {e}")))??
        };
        if prompt.len() >= ready.context {
            return Err(ApiError::ContextTooLong {
                prompt_tokens: prompt.len(),
                limit: ready.context,
            });
        }
        let prompt_tokens = prompt.len();
        let (seq_tx, seq_rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let submitted = ready.scheduler.submit(SeqRequest {
            id,
            prompt,
            params,
            sink: Box::new(move |ev| seq_tx.send(ev).is_ok()),
            cancel: cancel.clone(),
        });
        match submitted {
            Ok(()) => {}
            Err(SubmitError::QueueFull { queued }) => {
                return Err(ApiError::Busy {
                    queued,
                    retry_after_secs: retry_after(&ready.scheduler),
                })
            }
            Err(SubmitError::ShuttingDown) => return Err(ApiError::ShuttingDown),
            Err(SubmitError::Invalid(m)) => {
                return Err(ApiError::InvalidRequest {
                    message: m,
                    param: None,
                })
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let pipeline = Pipeline {
            service: self.clone(),
            ready,
            chain,
            info,
            peer: req.peer,
            stream: req.stream,
            cancel: cancel.clone(),
            out: tx,
            submitted: Instant::now(),
        };
        tokio::task::spawn_blocking(move || pipeline.run(seq_rx));
        Ok(RequestStream {
            id,
            prompt_tokens,
            events: rx,
            cancel,
        })
    }

    fn generation_params(&self, req: &ApiRequest) -> Result<GenerationParams, ApiError> {
        let limits = self.limits();
        let max_tokens = req.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_tokens_limit {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens must be between 1 and {} (got {max_tokens})",
                    limits.max_tokens_limit
                ),
            ));
        }
        if req.stop.len() > limits.max_stop_strings {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {} stop strings are allowed (got {})",
                    limits.max_stop_strings,
                    req.stop.len()
                ),
            ));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        if let Some(k) = req.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
        }
        req.sampler.validate().map_err(|m| {
            let param = m.split_whitespace().next().unwrap_or("").to_string();
            ApiError::InvalidRequest {
                message: m,
                param: Some(param),
            }
        })?;
        Ok(GenerationParams {
            max_tokens,
            stop: req.stop.clone(),
            sampler: req.sampler.clone(),
            logprobs: req.logprobs,
            ignore_eos: req.ignore_eos,
        })
    }

    /// A snapshot for `/v1/status`, `/health` and the D-Bus properties.
    pub fn status(&self) -> Status {
        let mut s = Status {
            model: self.inner.model_id.clone(),
            model_path: self.inner.model_path.clone(),
            requests_total: self.inner.requests_total.load(Ordering::Relaxed),
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            ..Status::default()
        };
        if let Some(r) = self.ready() {
            let st = r.scheduler.stats();
            let cfg = r.scheduler.config();
            s.ready = !self.inner.shutting_down.load(Ordering::Relaxed);
            s.window = r.window;
            s.context = r.context;
            s.kv_type = r.kv_type.clone();
            s.parallel = cfg.parallel;
            s.queue_capacity = cfg.queue_capacity;
            s.queued = st.queued;
            s.active = st.active;
            s.prompt_cache_entries = st.cache_entries;
            s.prompt_cache_bytes = st.cache_bytes;
            s.tokens_per_second = st.tokens_per_second;
        }
        s
    }

    /// Whether the model is loaded and requests are accepted.
    pub fn is_ready(&self) -> bool {
        self.ready().is_some() && !self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// The model id clients name (`/v1/models`): the model file's name without `.gguf`.
    pub fn model_id(&self) -> String {
        self.inner.model_id.clone()
    }

    /// Unix time the service started (`created` in `/v1/models`).
    pub fn created_unix(&self) -> u64 {
        self.inner.created_unix
    }

    /// Token ids of `text` (with BOS first when `add_bos`).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ApiError> {
        let ready = self.ready().ok_or(ApiError::NotReady)?;
        let tok = &ready.tokenizer;
        let mut ids: Vec<u32> = if add_bos {
            tok.bos().into_iter().collect()
        } else {
            Vec::new()
        };
        ids.extend(
            tok.encode(text)
                .map_err(|e| ApiError::invalid("content", format!("{e:#}")))?,
        );
        Ok(ids)
    }

    /// Text of token ids; ids outside the vocabulary are an [`ApiError::InvalidRequest`].
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, ApiError> {
        let ready = self.ready().ok_or(ApiError::NotReady)?;
        ready
            .tokenizer
            .decode(ids)
            .map_err(|e| ApiError::invalid("tokens", format!("{e:#}")))
    }

    /// The Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The limits in force now.
    pub fn limits(&self) -> ServiceLimits {
        self.inner.limits.read().unwrap().clone()
    }
}

/// A suggested wait for a refused request: about how long the running requests take to make
/// room, between 1 and 30 seconds.
fn retry_after(scheduler: &SchedulerHandle) -> u64 {
    let st = scheduler.stats();
    let per_request = if st.tokens_per_second > 0.0 {
        64.0 / st.tokens_per_second * (st.active.max(1) as f64)
    } else {
        2.0
    };
    (per_request * (st.queued as f64 / scheduler.config().parallel as f64).max(1.0))
        .ceil()
        .clamp(1.0, 30.0) as u64
}

fn outcome_of_error(e: &ApiError) -> &'static str {
    match e {
        ApiError::Busy { .. } => "busy",
        ApiError::Rejected { .. } => "rejected",
        ApiError::InvalidRequest { .. } | ApiError::ContextTooLong { .. } => "invalid",
        ApiError::NotReady | ApiError::ShuttingDown => "unavailable",
        ApiError::PluginFault { .. } => "plugin_error",
        _ => "error",
    }
}

fn plugin_error(e: PluginError) -> ApiError {
    match e {
        PluginError::Rejected { plugin, reason, .. } => ApiError::Rejected { plugin, reason },
        PluginError::Failed {
            plugin,
            hook,
            fault,
        } => ApiError::PluginFault {
            plugin,
            message: format!("{fault} (in {hook})"),
        },
    }
}

/// `on-prompt` (on a plain prompt, or on each user and system message of a chat), then the
/// chat template and tokenization.
fn prepare_prompt(
    ready: &ReadyParts,
    chain: &PluginChain,
    info: &RequestInfo,
    input: PromptInput,
) -> Result<Vec<u32>, ApiError> {
    let tok = &ready.tokenizer;
    match input {
        PromptInput::Text(text) => {
            let text = if chain.is_empty() {
                text
            } else {
                chain.on_prompt(&text, info).map_err(plugin_error)?
            };
            tok.encode_prompt(&text)
                .map_err(|e| ApiError::invalid("prompt", format!("{e:#}")))
        }
        PromptInput::Chat(mut messages) => {
            if !chain.is_empty() {
                for m in &mut messages {
                    if m.role == "user" || m.role == "system" {
                        m.content = chain.on_prompt(&m.content, info).map_err(plugin_error)?;
                    }
                }
            }
            ready
                .template
                .encode(tok, &messages)
                .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))
        }
    }
}

/// The per-request consumer of engine events (runs on a blocking thread).
struct Pipeline {
    service: Service,
    ready: Arc<ReadyParts>,
    chain: Arc<PluginChain>,
    info: RequestInfo,
    peer: super::Peer,
    stream: bool,
    cancel: Arc<AtomicBool>,
    out: mpsc::UnboundedSender<Event>,
    submitted: Instant,
}

impl Pipeline {
    fn send(&self, ev: Event) {
        if self.out.send(ev).is_err() {
            // The client is gone: stop generating (the engine reports Done soon).
            self.cancel.store(true, Ordering::Relaxed);
        }
    }

    fn logprob(&self, p: &TokenProb) -> TokenLogprob {
        let tok = &self.ready.tokenizer;
        let text = |id: u32| -> (String, Vec<u8>) {
            let s = tok.decode(&[id]).unwrap_or_default();
            let bytes = s.as_bytes().to_vec();
            (s, bytes)
        };
        let (token, bytes) = text(p.token);
        TokenLogprob {
            token,
            bytes,
            logprob: p.logprob,
            top: p
                .top
                .iter()
                .map(|&(id, lp)| {
                    let (t, b) = text(id);
                    (t, b, lp)
                })
                .collect(),
        }
    }

    fn run(self, mut events: mpsc::UnboundedReceiver<SeqEvent>) {
        let mut filter =
            (self.stream && !self.chain.is_empty()).then(|| self.chain.chunk_filter(&self.info));
        // What the client has received (streams) or the raw output (otherwise).
        let mut text = String::new();
        let mut plugin_stopped = false;
        let mut generated = 0usize;
        let mut usage = Usage::default();
        let outcome = loop {
            let Some(ev) = events.blocking_recv() else {
                break Outcome::Error(ApiError::Internal("the engine dropped the request".into()));
            };
            match ev {
                SeqEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                } => {
                    usage.prompt_tokens = prompt_tokens;
                    usage.cached_tokens = cached_tokens;
                    self.send(Event::Started {
                        prompt_tokens,
                        cached_tokens,
                    });
                }
                SeqEvent::Token {
                    text: piece, prob, ..
                } => {
                    generated += 1;
                    let logprobs: Vec<TokenLogprob> =
                        prob.iter().map(|p| self.logprob(p)).collect();
                    if plugin_stopped {
                        continue;
                    }
                    let piece = match &mut filter {
                        Some(f) if !piece.is_empty() => match f.push(&piece) {
                            Ok(o) => {
                                if o.stop {
                                    plugin_stopped = true;
                                    self.cancel.store(true, Ordering::Relaxed);
                                }
                                o.text
                            }
                            Err(e) => {
                                self.cancel.store(true, Ordering::Relaxed);
                                break Outcome::Error(plugin_error(e));
                            }
                        },
                        _ => piece,
                    };
                    text.push_str(&piece);
                    if self.stream && (!piece.is_empty() || !logprobs.is_empty()) {
                        self.send(Event::Delta {
                            text: piece,
                            logprobs,
                        });
                    } else if !self.stream && !logprobs.is_empty() {
                        // Non-streamed: logprobs travel with the text in one delta at the end.
                        self.send(Event::Delta {
                            text: String::new(),
                            logprobs,
                        });
                    }
                }
                SeqEvent::Done(summary) => {
                    usage.completion_tokens = summary.generated_tokens;
                    break Outcome::Done(summary);
                }
                SeqEvent::Failed(message) => {
                    break Outcome::Error(
                        if self.service.inner.shutting_down.load(Ordering::Relaxed) {
                            ApiError::ShuttingDown
                        } else {
                            ApiError::Internal(message)
                        },
                    )
                }
            }
        };
        usage.completion_tokens = usage.completion_tokens.max(generated);
        match outcome {
            Outcome::Error(e) => {
                self.log_line(&usage, None, e.to_string().as_str());
                self.service
                    .inner
                    .metrics
                    .count_request(outcome_of_error(&e));
                self.service
                    .inner
                    .requests_total
                    .fetch_add(1, Ordering::Relaxed);
                self.send(Event::Error(e));
            }
            Outcome::Done(summary) => {
                let finished = self.finish(filter, text, plugin_stopped, &summary, usage);
                let label = match &finished {
                    Ok((f, _, _)) => f.as_str(),
                    Err(_) => "plugin_error",
                };
                let label = if summary.finish == FinishReason::Cancelled && !plugin_stopped {
                    "cancelled"
                } else {
                    label
                };
                self.log_line(&usage, Some(&summary), label);
                self.service.inner.metrics.count_request(label);
                self.service
                    .inner
                    .requests_total
                    .fetch_add(1, Ordering::Relaxed);
                match finished {
                    Ok((finish, text, refusal)) => {
                        if summary.finish == FinishReason::Cancelled && !plugin_stopped {
                            self.send(Event::Error(
                                if self.service.inner.shutting_down.load(Ordering::Relaxed) {
                                    ApiError::ShuttingDown
                                } else {
                                    ApiError::Cancelled
                                },
                            ));
                        } else {
                            self.send(Event::Done {
                                finish,
                                text,
                                refusal,
                                usage,
                            });
                        }
                    }
                    Err(e) => self.send(Event::Error(e)),
                }
            }
        }
    }

    /// The end of a request: the stream's held text, `on-complete`, the finish reason.
    fn finish(
        &self,
        filter: Option<crate::plugins::ChunkFilter>,
        mut text: String,
        plugin_stopped: bool,
        summary: &crate::engine::scheduler::SeqSummary,
        _usage: Usage,
    ) -> Result<(Finish, String, Option<String>), ApiError> {
        if let Some(mut f) = filter {
            let tail = f.finish().map_err(plugin_error)?;
            if !tail.is_empty() {
                text.push_str(&tail);
                self.send(Event::Delta {
                    text: tail,
                    logprobs: Vec::new(),
                });
            }
        }
        let mut finish = match summary.finish {
            FinishReason::Eos | FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
            FinishReason::Cancelled => Finish::ContentFilter,
        };
        if plugin_stopped {
            finish = Finish::ContentFilter;
        }
        if self.chain.is_empty() {
            return Ok((finish, text, None));
        }
        match self.chain.on_complete(&text, &self.info) {
            Ok(rewritten) => {
                if self.stream && rewritten != text {
                    if let Some(extra) = rewritten.strip_prefix(text.as_str()) {
                        self.send(Event::Delta {
                            text: extra.to_string(),
                            logprobs: Vec::new(),
                        });
                    } else {
                        log::info!(
                            "request {}: on-complete rewrote a streamed answer; the client already has the streamed text",
                            self.info.id
                        );
                    }
                }
                Ok((finish, rewritten, None))
            }
            Err(PluginError::Rejected { plugin, reason, .. }) => {
                log::info!(
                    "request {}: output refused by plugin '{plugin}': {reason}",
                    self.info.id
                );
                Ok((Finish::ContentFilter, String::new(), Some(reason)))
            }
            Err(e) => Err(plugin_error(e)),
        }
    }

    fn log_line(
        &self,
        usage: &Usage,
        summary: Option<&crate::engine::scheduler::SeqSummary>,
        finish: &str,
    ) {
        let ttft = summary
            .and_then(|s| s.time_to_first_token)
            .map_or("-".to_string(), |d| format!("{} ms", d.as_millis()));
        let rate = summary
            .filter(|s| s.generated_tokens > 1 && !s.decode.is_zero())
            .map_or("-".to_string(), |s| {
                format!(
                    "{:.1}",
                    (s.generated_tokens - 1) as f64 / s.decode.as_secs_f64()
                )
            });
        log::info!(
            "request {} from {} (pid {}): prompt {} tokens ({} cached), generated {}, first token {}, {} tok/s, {:.2} s in all, finish: {}",
            self.info.id,
            if self.peer.label.is_empty() { "?" } else { &self.peer.label },
            self.peer.pid.map_or("?".to_string(), |p| p.to_string()),
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            ttft,
            rate,
            self.submitted.elapsed().as_secs_f64(),
            finish
        );
    }
}

enum Outcome {
    Done(crate::engine::scheduler::SeqSummary),
    Error(ApiError),
}
