//! The daemon's front ends and what they share.
//!
//! Both front ends (HTTP on the Unix socket / TCP in [`http`], D-Bus in [`dbus`]) turn
//! their wire format into one [`ApiRequest`], hand it to the [`Service`] and turn the
//! [`Event`]s of the returned [`RequestStream`] back into their wire format. Everything else —
//! plugins (`on-prompt`, `on-chunk`, `on-complete`), the chat template, tokenization, limits,
//! the scheduler — is implemented once, behind [`Service`], so both front ends behave alike.

pub mod dbus;
pub mod http;
pub mod openai;
mod service;
pub mod socket;

pub use service::{ReadyParts, RequestStream, Service, ServiceLimits};

use crate::chat::ChatMessage;
use crate::sampler::SamplerConfig;

/// A sampling option both front ends accept (an HTTP body field, a D-Bus `a{sv}` option):
/// its name, range and where its value goes. Both parse from [`SAMPLING_OPTIONS`], so the
/// two cannot accept different ranges.
#[derive(Clone, Copy)]
pub enum SamplingOption {
    /// A number from `lo` (included when `lo_inclusive`) to `hi` (included).
    Number {
        /// The field / option name.
        name: &'static str,
        /// Lower bound.
        lo: f64,
        /// Whether `lo` itself is allowed.
        lo_inclusive: bool,
        /// Upper bound (included).
        hi: f64,
        /// Stores the checked value.
        set: fn(&mut SamplerConfig, f32),
    },
    /// An integer in `min..=max`.
    Integer {
        /// The field / option name.
        name: &'static str,
        /// Smallest value.
        min: u64,
        /// Largest value.
        max: u64,
        /// Stores the checked value.
        set: fn(&mut SamplerConfig, u64),
    },
}

impl SamplingOption {
    /// The field / option name.
    pub fn name(&self) -> &'static str {
        match self {
            SamplingOption::Number { name, .. } | SamplingOption::Integer { name, .. } => name,
        }
    }

    /// The option called `name`, if it is a sampling option.
    pub fn find(name: &str) -> Option<&'static SamplingOption> {
        SAMPLING_OPTIONS.iter().find(|o| o.name() == name)
    }
}

/// The sampling options of a request, with OpenAI's ranges where it has them (`temperature`
/// 0–2, `top_p` (0, 1], penalties −2–2) and the extensions' (`top_k`, `min_p`,
/// `repeat_penalty`). Every range lies within [`SamplerConfig::validate`]'s.
pub const SAMPLING_OPTIONS: [SamplingOption; 8] = [
    SamplingOption::Number {
        name: "temperature",
        lo: 0.0,
        lo_inclusive: true,
        hi: 2.0,
        set: |s, v| s.temperature = v,
    },
    SamplingOption::Number {
        name: "top_p",
        lo: 0.0,
        lo_inclusive: false,
        hi: 1.0,
        set: |s, v| s.top_p = v,
    },
    SamplingOption::Integer {
        name: "top_k",
        min: 0,
        max: u32::MAX as u64,
        set: |s, v| s.top_k = v as usize,
    },
    SamplingOption::Number {
        name: "min_p",
        lo: 0.0,
        lo_inclusive: true,
        hi: 1.0,
        set: |s, v| s.min_p = v,
    },
    SamplingOption::Number {
        name: "repeat_penalty",
        lo: 0.0,
        lo_inclusive: false,
        hi: 10.0,
        set: |s, v| s.repeat_penalty = v,
    },
    SamplingOption::Number {
        name: "presence_penalty",
        lo: -2.0,
        lo_inclusive: true,
        hi: 2.0,
        set: |s, v| s.presence_penalty = v,
    },
    SamplingOption::Number {
        name: "frequency_penalty",
        lo: -2.0,
        lo_inclusive: true,
        hi: 2.0,
        set: |s, v| s.frequency_penalty = v,
    },
    SamplingOption::Integer {
        name: "seed",
        min: 0,
        max: u64::MAX,
        set: |s, v| s.seed = Some(v),
    },
];

/// Who sent a request (for logs and for plugins' `request-info.client`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The peer's user id (SO_PEERCRED on the Unix socket, the bus's answer on D-Bus).
    pub uid: Option<u32>,
    /// The peer's process id, when known.
    pub pid: Option<i32>,
    /// How plugins see the client: `uid:1000`, `tcp:127.0.0.1:5000`, a D-Bus name, or "".
    pub label: String,
}

impl Peer {
    /// A peer known by its Unix credentials (`label` = `uid:<uid>`).
    pub fn unix(uid: u32, pid: Option<i32>) -> Peer {
        Peer {
            uid: Some(uid),
            pid,
            label: format!("uid:{uid}"),
        }
    }
}

/// The prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Raw text, tokenized with BOS (a completion).
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One generation request, as both front ends describe it.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    /// The prompt.
    pub input: PromptInput,
    /// Most tokens to generate (`None`: up to the configured default).
    pub max_tokens: Option<usize>,
    /// Generation ends before the first of these strings.
    pub stop: Vec<String>,
    /// Sampling settings (already range-checked by the front end; checked again here).
    pub sampler: SamplerConfig,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely
    /// alternatives (`k` ≤ [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Whether the client receives the output as a stream (plugins see this).
    pub stream: bool,
    /// Keep generating past the end-of-sequence token (benchmarks; llama.cpp's extension).
    pub ignore_eos: bool,
    /// Who sent it.
    pub peer: Peer,
}

/// Largest `top_logprobs` accepted (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log-probability of one generated token and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (its vocabulary piece, decoded).
    pub token: String,
    /// The token's bytes in UTF-8 (a piece may be part of a character).
    pub bytes: Vec<u8>,
    /// Natural-log probability under the model's distribution (before sampling filters).
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first: (text, bytes, logprob).
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Why a request's generation ended, as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string (OpenAI's `stop`).
    Stop,
    /// The token limit or the context limit (OpenAI's `length`).
    Length,
    /// A plugin refused or ended the output (OpenAI's `content_filter`).
    ContentFilter,
}

impl Finish {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ContentFilter => "content_filter",
        }
    }
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (after the template, with BOS).
    pub prompt_tokens: usize,
    /// Of those, how many were taken from the prompt cache instead of computed.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What a request produces, in order: one `Started`, any number of `Delta`s, then exactly one
/// of `Done` or `Error`.
#[derive(Clone, Debug)]
pub enum Event {
    /// The scheduler admitted the request and is processing its prompt.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Prompt tokens found in the prompt cache.
        cached_tokens: usize,
    },
    /// New output text (already through the `on-chunk` plugins when streaming), with the
    /// log-probabilities of the tokens that produced it when they were asked for.
    Delta {
        /// The text.
        text: String,
        /// One entry per token (empty unless `logprobs` was asked for).
        logprobs: Vec<TokenLogprob>,
    },
    /// The request finished.
    Done {
        /// Why.
        finish: Finish,
        /// The whole output after `on-complete` (for non-streamed responses). For streamed
        /// requests the deltas already carried the text; a rewrite by `on-complete` that only
        /// appends is sent as a last delta, other rewrites are logged and not applied.
        text: String,
        /// When a plugin refused the output: its reason.
        refusal: Option<String>,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed after it was accepted (plugin fault, engine error, shutdown).
    Error(ApiError),
}

/// Why a request was refused or failed. Each kind maps to an HTTP status and a D-Bus error.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a value is out of range; `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        /// Readable message naming the problem.
        message: String,
        /// The offending field (`max_tokens`, `messages[1].role`, …), when there is one.
        param: Option<String>,
    },
    /// The prompt does not fit the context.
    #[error("the prompt has {prompt_tokens} tokens; the context holds {limit}")]
    ContextTooLong {
        /// Tokens of the rendered prompt.
        prompt_tokens: usize,
        /// The context limit.
        limit: usize,
    },
    /// A plugin's `on-prompt` refused the prompt.
    #[error("the prompt was refused by plugin '{plugin}': {reason}")]
    Rejected {
        /// The plugin.
        plugin: String,
        /// Its reason.
        reason: String,
    },
    /// The queue is full: try again later.
    #[error("the server is busy ({queued} requests queued); retry in {retry_after_secs} s")]
    Busy {
        /// Requests waiting.
        queued: usize,
        /// Suggested wait.
        retry_after_secs: u64,
    },
    /// The model is still loading.
    #[error("the model is still loading")]
    NotReady,
    /// The daemon is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request was cancelled (its client went away or asked to cancel it).
    #[error("the request was cancelled")]
    Cancelled,
    /// A plugin failed (trap, time or memory limit, bad output) and is configured to fail the
    /// request.
    #[error("plugin '{plugin}' failed: {message}")]
    PluginFault {
        /// The plugin.
        plugin: String,
        /// What happened.
        message: String,
    },
    /// A request the caller may not act on (D-Bus `Cancel` of someone else's request).
    #[error("{0}")]
    AccessDenied(String),
    /// Unknown request id or route.
    #[error("{0}")]
    NotFound(String),
    /// Anything else (logged by the service).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An [`ApiError::InvalidRequest`] naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }
}

/// A snapshot of the service for `/v1/status`, `/health`, D-Bus properties and logs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Status {
    /// Model id (the file's stem).
    pub model: String,
    /// Path of the model file.
    pub model_path: String,
    /// Sliding window in positions (`None`: full attention).
    pub window: Option<usize>,
    /// Most positions a request may use (prompt + output).
    pub context: usize,
    /// KV cache element type (`f16`, …).
    pub kv_type: String,
    /// Sequences generating at once.
    pub parallel: usize,
    /// Whether the model is loaded and requests are served.
    pub ready: bool,
    /// Requests waiting for a sequence.
    pub queued: usize,
    /// Queue capacity.
    pub queue_capacity: usize,
    /// Requests being processed.
    pub active: usize,
    /// Entries in the prompt cache.
    pub prompt_cache_entries: usize,
    /// Bytes of KV memory held by the prompt cache.
    pub prompt_cache_bytes: usize,
    /// Generated tokens per second over the last few seconds (all sequences).
    pub tokens_per_second: f64,
    /// Requests finished since start.
    pub requests_total: u64,
    /// Seconds since the service started.
    pub uptime_seconds: f64,
}
