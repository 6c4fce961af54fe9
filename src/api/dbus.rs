//! The D-Bus front end: the interface `org.mistrald.Mistrald1` at `/org/mistrald/Mistrald1`,
//! under the well-known name `org.mistrald.Mistrald1` on the session or the system bus
//! (`server.dbus`, `mistrald serve --dbus`), for desktop applications.
//!
//! The contract for application authors is the introspection XML checked into the repository,
//! `systemd/dbus/org.mistrald.Mistrald1.xml` ([`INTROSPECTION_XML`]); the tests check that the live
//! object matches it.
//!
//! | member | what it does |
//! | --- | --- |
//! | `Generate(s prompt, a{sv} options) → t request_id` | a completion, streamed as `Token` signals and one `Done` |
//! | `Chat(a(ss) messages, a{sv} options) → t request_id` | the same for (role, content) messages, through the chat template |
//! | `Complete(s prompt, a{sv} options) → (s text, s finish_reason)` | a blocking completion, for scripts |
//! | `Cancel(t request_id)` | cancels a request the calling connection started |
//! | signal `Token(t request_id, s text)` | new output text |
//! | signal `Done(t request_id, s text, s finish_reason, a{sv} usage)` | the end of a request |
//! | properties `Model` s, `Window` u, `Ready` b, `QueueLength` u, `ActiveRequests` u | `PropertiesChanged` at most every [`PROPERTIES_INTERVAL`] |
//!
//! Like the HTTP front end ([`http`](super::http)), this module only translates: every request
//! goes through [`Service::submit`], so limits, plugins, the prompt cache and the scheduler
//! behave the same whichever front end a client uses. What is particular to D-Bus:
//!
//! - **Unicast signals.** `Token` and `Done` are addressed to the unique name of the connection
//!   that started the request (never broadcast), so other connections on the bus cannot read
//!   someone else's text. A request's signals are sent only after its method reply, so a client
//!   always knows the id before the first `Token`.
//! - **Owners.** Each request is recorded with its caller's unique name: only that connection may
//!   `Cancel` it, and when it leaves the bus (`NameOwnerChanged` with no new owner, watched with a
//!   match rule per connection that has requests) its requests are cancelled at once.
//! - **The caller.** The bus's `GetConnectionUnixUser` and `GetConnectionUnixProcessID` give the
//!   [`Peer`] (`uid:1000`) that the request log and the plugins' `request-info.client` show.
//! - **Readiness.** The object is served as soon as the daemon starts (calls made to the unique
//!   name while the model loads get `NotReady`), but the well-known name is requested only once
//!   the model is loaded ([`DbusServer::claim_name`]), so bus activation makes the first caller
//!   wait for a ready daemon. At shutdown new calls get `ShuttingDown`; the name is released
//!   after the last `Done` signals are out (clients that follow the name's owner would miss
//!   signals from a former owner).
//!
//! Errors are named D-Bus errors ([`Error`], `org.mistrald.Mistrald1.Error.*`) with readable
//! messages. The options a{sv} accept any D-Bus integer or floating type for numbers
//! (`y n q i u x t d`), since stock clients differ in what they send ([`parse_options`]).

use super::{
    ApiError, ApiRequest, Event, Peer, PromptInput, RequestStream, SamplingOption, Service,
};
use crate::chat::ChatMessage;
use crate::config::DbusBus;
use crate::sampler::SamplerConfig;
use anyhow::Context as _;
use futures_util::StreamExt as _;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, OnceCell};
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};
use zbus::message::Header;
use zbus::names::{BusName, InterfaceName, UniqueName, WellKnownName};
use zbus::object_server::{ResponseDispatchNotifier, SignalEmitter};
use zbus::zvariant::{OwnedValue, Value};
use zbus::Connection;

/// The well-known bus name.
pub const BUS_NAME: &str = "org.mistrald.Mistrald1";
/// The object path of the service object.
pub const OBJECT_PATH: &str = "/org/mistrald/Mistrald1";
/// The interface name.
pub const INTERFACE: &str = "org.mistrald.Mistrald1";
/// The prefix of the interface's error names (`org.mistrald.Mistrald1.Error.Busy`, …).
pub const ERROR_PREFIX: &str = "org.mistrald.Mistrald1.Error";
/// Shortest time between two `PropertiesChanged` signals.
pub const PROPERTIES_INTERVAL: Duration = Duration::from_millis(250);
/// The introspection XML checked into the repository: the interface's contract.
pub const INTROSPECTION_XML: &str = include_str!("../../systemd/dbus/org.mistrald.Mistrald1.xml");

/// The options a request accepts, in the order error messages list them: `max_tokens`, the
/// sampling options of [`super::SAMPLING_OPTIONS`] (a test checks the two agree), `stop` and
/// `ignore_eos`.
pub const OPTION_NAMES: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The interface's errors: each variant is the D-Bus error `org.mistrald.Mistrald1.Error.<Name>`
/// and carries a readable message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.mistrald.Mistrald1.Error")]
pub enum Error {
    /// A failure of the bus connection itself (sent as zbus's own error names).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The queue is full: retry later (the message says when).
    Busy(String),
    /// The model is still loading.
    NotReady(String),
    /// The daemon is shutting down.
    ShuttingDown(String),
    /// A bad option, message or prompt; the message names it.
    InvalidArgument(String),
    /// A plugin refused the prompt (or, for `Complete`, the output).
    Rejected(String),
    /// `Cancel` of a request that does not exist (or has finished).
    NotFound(String),
    /// `Cancel` of a request another connection started.
    AccessDenied(String),
    /// A `Complete` request was cancelled.
    Cancelled(String),
    /// A plugin failed (trap, time or memory limit, bad output).
    PluginFailed(String),
    /// Any other failure.
    Failed(String),
}

/// The name (after [`ERROR_PREFIX`]) of the D-Bus error an [`ApiError`] becomes.
pub fn error_kind(e: &ApiError) -> &'static str {
    match e {
        ApiError::InvalidRequest { .. } | ApiError::ContextTooLong { .. } => "InvalidArgument",
        ApiError::Rejected { .. } => "Rejected",
        ApiError::Busy { .. } => "Busy",
        ApiError::NotReady => "NotReady",
        ApiError::ShuttingDown => "ShuttingDown",
        ApiError::Cancelled => "Cancelled",
        ApiError::PluginFault { .. } => "PluginFailed",
        ApiError::AccessDenied(_) => "AccessDenied",
        ApiError::NotFound(_) => "NotFound",
        ApiError::Internal(_) => "Failed",
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        let message = e.to_string();
        match e {
            ApiError::InvalidRequest { .. } | ApiError::ContextTooLong { .. } => {
                Error::InvalidArgument(message)
            }
            ApiError::Rejected { .. } => Error::Rejected(message),
            ApiError::Busy { .. } => Error::Busy(message),
            ApiError::NotReady => Error::NotReady(message),
            ApiError::ShuttingDown => Error::ShuttingDown(message),
            ApiError::Cancelled => Error::Cancelled(message),
            ApiError::PluginFault { .. } => Error::PluginFailed(message),
            ApiError::AccessDenied(_) => Error::AccessDenied(message),
            ApiError::NotFound(_) => Error::NotFound(message),
            ApiError::Internal(_) => Error::Failed(message),
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

// ---------------------------------------------------------------------------------------------
// Options and messages
// ---------------------------------------------------------------------------------------------

/// The settings of one request, from its a{sv} options.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOptions {
    /// `max_tokens` (`None`: the configured default).
    pub max_tokens: Option<usize>,
    /// `stop` strings.
    pub stop: Vec<String>,
    /// Sampling settings; defaults as the HTTP API's (OpenAI's): temperature 1, no top-p,
    /// top-k, min-p or penalties.
    pub sampler: SamplerConfig,
    /// `ignore_eos`.
    pub ignore_eos: bool,
}

/// A number as a client sent it.
enum Number {
    Int(i128),
    Float(f64),
}

/// The D-Bus type of a value, for error messages (`s`, `as`, `a{sv}`, …).
fn type_of(v: &Value<'_>) -> String {
    v.value_signature().to_string()
}

/// A number of any D-Bus integer or floating type (`y n q i u x t d`), looking through a
/// variant inside the variant.
fn number(name: &str, v: &Value<'_>) -> Result<Number, Error> {
    Ok(match v {
        Value::U8(x) => Number::Int((*x).into()),
        Value::I16(x) => Number::Int((*x).into()),
        Value::U16(x) => Number::Int((*x).into()),
        Value::I32(x) => Number::Int((*x).into()),
        Value::U32(x) => Number::Int((*x).into()),
        Value::I64(x) => Number::Int((*x).into()),
        Value::U64(x) => Number::Int((*x).into()),
        Value::F64(x) => Number::Float(*x),
        Value::Value(inner) => return number(name, inner),
        other => {
            return Err(invalid(format!(
                "option {name}: expected a number (D-Bus type y, n, q, i, u, x, t or d), got \
                 type '{}'",
                type_of(other)
            )))
        }
    })
}

/// An integer option in `min..=max`; a floating value must be integral.
fn uint_option(name: &str, v: &Value<'_>, min: u64, max: u64) -> Result<u64, Error> {
    let value: i128 = match number(name, v)? {
        Number::Int(i) => i,
        Number::Float(f) => {
            if !f.is_finite() || f.fract() != 0.0 {
                return Err(invalid(format!(
                    "option {name}: expected an integer, got {f}"
                )));
            }
            // Integral and finite: in range of i128 for every value that can pass the bound
            // check below (larger ones saturate and fail it).
            f as i128
        }
    };
    if value < i128::from(min) || value > i128::from(max) {
        return Err(invalid(format!(
            "option {name}: {value} is out of range ({min}..={max})"
        )));
    }
    // In range of u64 by the check above.
    Ok(value as u64)
}

/// A floating option between `min` (inclusive or not) and `max` (inclusive).
fn float_option(
    name: &str,
    v: &Value<'_>,
    min: f64,
    min_inclusive: bool,
    max: f64,
) -> Result<f32, Error> {
    let value = match number(name, v)? {
        Number::Int(i) => i as f64,
        Number::Float(f) => f,
    };
    let above_min = if min_inclusive {
        value >= min
    } else {
        value > min
    };
    if !value.is_finite() || !above_min || value > max {
        let open = if min_inclusive { "" } else { " exclusive" };
        return Err(invalid(format!(
            "option {name}: {value} is out of range ({min}{open} ..= {max})"
        )));
    }
    Ok(value as f32)
}

/// `stop`: a string or an array of strings, none empty, at most `max`.
fn stop_option(v: &Value<'_>, max: usize) -> Result<Vec<String>, Error> {
    let list: Vec<String> = match v {
        Value::Str(s) => vec![s.to_string()],
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.inner().iter().enumerate() {
                match item {
                    Value::Str(s) => out.push(s.to_string()),
                    other => {
                        return Err(invalid(format!(
                            "option stop[{i}]: expected a string (s), got type '{}'",
                            type_of(other)
                        )))
                    }
                }
            }
            out
        }
        Value::Value(inner) => return stop_option(inner, max),
        other => {
            return Err(invalid(format!(
                "option stop: expected a string (s) or an array of strings (as), got type '{}'",
                type_of(other)
            )))
        }
    };
    if list.len() > max {
        return Err(invalid(format!(
            "option stop: at most {max} stop strings are allowed, got {}",
            list.len()
        )));
    }
    if list.iter().any(String::is_empty) {
        return Err(invalid("option stop: stop strings must not be empty"));
    }
    Ok(list)
}

/// A boolean option (`b`).
fn bool_option(name: &str, v: &Value<'_>) -> Result<bool, Error> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Value(inner) => bool_option(name, inner),
        other => Err(invalid(format!(
            "option {name}: expected a boolean (b), got type '{}'",
            type_of(other)
        ))),
    }
}

/// Checks a request's a{sv} options against the limits in force; an unknown option, a wrong
/// type or a value out of range is [`Error::InvalidArgument`] naming the option.
pub fn parse_options<V>(
    options: &HashMap<String, V>,
    limits: &super::ServiceLimits,
) -> Result<RequestOptions, Error>
where
    V: std::ops::Deref<Target = Value<'static>>,
{
    let mut out = RequestOptions {
        max_tokens: None,
        stop: Vec::new(),
        sampler: SamplerConfig::api_default(),
        ignore_eos: false,
    };
    // Sorted, so that the first of several bad options is reported the same way each time.
    let mut names: Vec<&String> = options.keys().collect();
    names.sort();
    for name in names {
        let v: &Value<'_> = &options[name];
        match name.as_str() {
            "max_tokens" => {
                let limit = limits.max_tokens_limit as u64;
                out.max_tokens = Some(uint_option(name, v, 1, limit)? as usize);
            }
            "stop" => out.stop = stop_option(v, limits.max_stop_strings)?,
            "ignore_eos" => out.ignore_eos = bool_option(name, v)?,
            other => match SamplingOption::find(other) {
                Some(&SamplingOption::Number {
                    lo,
                    lo_inclusive,
                    hi,
                    set,
                    ..
                }) => set(
                    &mut out.sampler,
                    float_option(name, v, lo, lo_inclusive, hi)?,
                ),
                Some(&SamplingOption::Integer { min, max, set, .. }) => {
                    set(&mut out.sampler, uint_option(name, v, min, max)?)
                }
                None => {
                    return Err(invalid(format!(
                        "unknown option '{}' (known options: {})",
                        other.escape_debug(),
                        OPTION_NAMES.join(", ")
                    )))
                }
            },
        }
    }
    out.sampler.validate().map_err(Error::InvalidArgument)?;
    Ok(out)
}

/// Checks `Chat`'s (role, content) pairs as the HTTP API checks `messages`: roles `system`
/// (`developer` is taken as `system`), `user` and `assistant`; at least one user message, the
/// last of which is not empty.
pub fn parse_messages(messages: &[(String, String)]) -> Result<Vec<ChatMessage>, Error> {
    if messages.is_empty() {
        return Err(invalid("messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, (role, content)) in messages.iter().enumerate() {
        let role = match role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(invalid(format!(
                    "messages[{i}]: unknown role '{}' (expected system, user or assistant)",
                    shown.escape_debug()
                )));
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    match out.iter().rposition(|m| m.role == "user") {
        None => Err(invalid("messages must contain a user message")),
        Some(i) if out[i].content.is_empty() => Err(invalid(format!(
            "messages[{i}]: the last user message must not be empty"
        ))),
        Some(_) => Ok(out),
    }
}

/// The prompt's size against `server.max_body_bytes`, the HTTP API's bound on a request.
fn check_size(input: &PromptInput, limit: usize) -> Result<(), Error> {
    let bytes = match input {
        PromptInput::Text(text) => text.len(),
        PromptInput::Chat(messages) => messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum(),
    };
    if bytes > limit {
        return Err(invalid(format!(
            "the prompt is {bytes} bytes; at most {limit} are accepted (server.max_body_bytes)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// From events to signals
// ---------------------------------------------------------------------------------------------

/// What `Done` reports besides the text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DoneInfo {
    /// `stop`, `length`, `content_filter`, `cancelled` or `error`.
    pub finish_reason: String,
    /// Prompt tokens (0 when the request failed before it started).
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prompt cache.
    pub cached_tokens: usize,
    /// Tokens generated (`None` for a failed or cancelled request).
    pub completion_tokens: Option<usize>,
    /// A plugin's reason for refusing the output.
    pub refusal: Option<String>,
    /// For a cancelled or failed request: the D-Bus error name and message.
    pub error: Option<(String, String)>,
}

impl DoneInfo {
    /// The `usage` a{sv} of the `Done` signal.
    pub fn usage(&self) -> HashMap<&'static str, Value<'_>> {
        let count = |n: usize| Value::from(u32::try_from(n).unwrap_or(u32::MAX));
        let mut usage = HashMap::new();
        usage.insert("prompt_tokens", count(self.prompt_tokens));
        usage.insert("cached_tokens", count(self.cached_tokens));
        if let Some(n) = self.completion_tokens {
            usage.insert("completion_tokens", count(n));
        }
        if let Some(refusal) = &self.refusal {
            usage.insert("refusal", Value::from(refusal.as_str()));
        }
        if let Some((name, message)) = &self.error {
            usage.insert("error", Value::from(name.as_str()));
            usage.insert("error_message", Value::from(message.as_str()));
        }
        usage
    }
}

/// A signal to send for a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Signal {
    /// `Token(id, text)`.
    Token(String),
    /// `Done(id, text, finish_reason, usage)`: the last signal of a request.
    Done {
        /// The whole output (or, for a cancelled or failed request, the text sent so far).
        text: String,
        /// The rest.
        info: DoneInfo,
    },
}

/// Turns a streamed request's [`Event`]s into its signals.
#[derive(Debug, Default)]
pub struct Relay {
    sent: String,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl Relay {
    /// The signal for one event, if any.
    pub fn event(&mut self, event: Event) -> Option<Signal> {
        match event {
            Event::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                self.prompt_tokens = prompt_tokens;
                self.cached_tokens = cached_tokens;
                None
            }
            Event::Delta { text, .. } if text.is_empty() => None,
            Event::Delta { text, .. } => {
                self.sent.push_str(&text);
                Some(Signal::Token(text))
            }
            Event::Done {
                finish,
                text,
                refusal,
                usage,
            } => Some(Signal::Done {
                text,
                info: DoneInfo {
                    finish_reason: finish.as_str().to_string(),
                    prompt_tokens: usage.prompt_tokens,
                    cached_tokens: usage.cached_tokens,
                    completion_tokens: Some(usage.completion_tokens),
                    refusal,
                    error: None,
                },
            }),
            Event::Error(e) => Some(self.failed(&e)),
        }
    }

    /// The `Done` of a request whose events ended without a result.
    pub fn ended(&mut self) -> Signal {
        self.failed(&ApiError::Internal(
            "the request ended without a result".into(),
        ))
    }

    fn failed(&mut self, e: &ApiError) -> Signal {
        let finish = if matches!(e, ApiError::Cancelled) {
            "cancelled"
        } else {
            "error"
        };
        Signal::Done {
            text: std::mem::take(&mut self.sent),
            info: DoneInfo {
                finish_reason: finish.to_string(),
                prompt_tokens: self.prompt_tokens,
                cached_tokens: self.cached_tokens,
                completion_tokens: None,
                refusal: None,
                error: Some((format!("{ERROR_PREFIX}.{}", error_kind(e)), e.to_string())),
            },
        }
    }
}

/// An event of a request this front end cancelled (`Cancel`, or its caller left): the
/// scheduler reports a request cancelled before it started as a failure; it is a cancellation.
fn settle(event: Event, cancelled: &AtomicBool) -> Event {
    match event {
        Event::Error(ApiError::Internal(_)) if cancelled.load(Ordering::Relaxed) => {
            Event::Error(ApiError::Cancelled)
        }
        other => other,
    }
}

/// The answer of `Complete` from a non-streamed request's events.
async fn collect(stream: &mut RequestStream) -> Result<(String, String), Error> {
    let cancelled = stream.cancel_flag();
    while let Some(event) = stream.next_event().await {
        let event = settle(event, &cancelled);
        match event {
            Event::Started { .. } | Event::Delta { .. } => {}
            Event::Done {
                refusal: Some(reason),
                ..
            } => {
                return Err(Error::Rejected(format!(
                    "the output was refused by a plugin: {reason}"
                )))
            }
            Event::Done { finish, text, .. } => return Ok((text, finish.as_str().to_string())),
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(Error::Failed("the request ended without a result".into()))
}

// ---------------------------------------------------------------------------------------------
// Requests and their owners
// ---------------------------------------------------------------------------------------------

/// One request started over the bus.
struct Entry {
    /// The unique name of the connection that started it.
    owner: String,
    /// Cancels it.
    cancel: Arc<AtomicBool>,
}

/// The watch on one connection that has requests.
struct OwnerWatch {
    /// Its requests still running.
    requests: usize,
    /// Dropped (ending the watcher task) when the last request ends.
    _stop: oneshot::Sender<()>,
}

/// The requests started over the bus, by id, and the connections that own them.
#[derive(Default)]
struct Registry {
    requests: HashMap<u64, Entry>,
    owners: HashMap<String, OwnerWatch>,
}

impl Registry {
    /// Records a request. When its owner had no other request, returns the receiver its
    /// watcher task ends on (the caller starts the watcher).
    fn add(
        &mut self,
        id: u64,
        owner: &str,
        cancel: Arc<AtomicBool>,
    ) -> Option<oneshot::Receiver<()>> {
        self.requests.insert(
            id,
            Entry {
                owner: owner.to_string(),
                cancel,
            },
        );
        if let Some(watch) = self.owners.get_mut(owner) {
            watch.requests += 1;
            return None;
        }
        let (stop, stopped) = oneshot::channel();
        self.owners.insert(
            owner.to_string(),
            OwnerWatch {
                requests: 1,
                _stop: stop,
            },
        );
        Some(stopped)
    }

    /// Forgets a finished request (and its owner's watch after its last request).
    fn remove(&mut self, id: u64) {
        let Some(entry) = self.requests.remove(&id) else {
            return;
        };
        if let Some(watch) = self.owners.get_mut(&entry.owner) {
            watch.requests = watch.requests.saturating_sub(1);
            if watch.requests == 0 {
                self.owners.remove(&entry.owner);
            }
        }
    }

    /// `Cancel(id)` from `caller`.
    fn cancel(&self, id: u64, caller: &str) -> Result<(), Error> {
        match self.requests.get(&id) {
            None => Err(Error::NotFound(format!(
                "there is no request {id} (it may have finished)"
            ))),
            Some(entry) if entry.owner != caller => Err(Error::AccessDenied(format!(
                "request {id} was started by another connection; only it may cancel the request"
            ))),
            Some(entry) => {
                entry.cancel.store(true, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// `owner` left the bus: cancels its requests; returns how many.
    fn owner_gone(&mut self, owner: &str) -> usize {
        self.owners.remove(owner);
        let mut cancelled = 0;
        for entry in self.requests.values().filter(|e| e.owner == owner) {
            entry.cancel.store(true, Ordering::Relaxed);
            cancelled += 1;
        }
        cancelled
    }
}

// ---------------------------------------------------------------------------------------------
// The interface
// ---------------------------------------------------------------------------------------------

/// The properties that change, as last published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Props {
    window: u32,
    ready: bool,
    queue_length: u32,
    active_requests: u32,
}

impl Props {
    fn of(service: &Service) -> Props {
        let s = service.status();
        Props {
            window: clamp_u32(s.window.unwrap_or(0)),
            ready: s.ready,
            queue_length: clamp_u32(s.queued),
            active_requests: clamp_u32(s.active),
        }
    }
}

/// What the interface object and the server share.
struct Shared {
    service: Service,
    registry: Mutex<Registry>,
    /// The bus driver's proxy (credentials, name owners), made on first use.
    bus_driver: OnceCell<DBusProxy<'static>>,
    /// Wakes the property publisher before its next tick.
    props_changed: Notify,
    /// The properties as last published, and when.
    published: Mutex<(Props, Option<Instant>)>,
}

/// Forgets a request when dropped (also when a `Complete` call's future is dropped).
struct Forget {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.shared.registry().remove(self.id);
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Shared {
    fn new(service: Service) -> Shared {
        Shared {
            published: Mutex::new((Props::of(&service), None)),
            service,
            registry: Mutex::new(Registry::default()),
            bus_driver: OnceCell::new(),
            props_changed: Notify::new(),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the maps consistent (no multi-step updates).
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn props(&self) -> Props {
        Props::of(&self.service)
    }

    async fn bus_driver(&self, conn: &Connection) -> Result<&DBusProxy<'static>, Error> {
        self.bus_driver
            .get_or_try_init(|| async {
                DBusProxy::builder(conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
            })
            .await
            .map_err(|e| Error::Failed(format!("cannot reach the bus driver: {e}")))
    }

    /// Who sent a method call: its unique name, uid and pid, from the bus.
    async fn caller(
        &self,
        conn: &Connection,
        header: &Header<'_>,
    ) -> Result<(UniqueName<'static>, Peer), Error> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::Failed("the call has no sender".into()))?
            .to_owned();
        let driver = self.bus_driver(conn).await?;
        let name = BusName::Unique(sender.as_ref());
        let (uid, pid) = tokio::join!(
            driver.get_connection_unix_user(name.clone()),
            driver.get_connection_unix_process_id(name.clone()),
        );
        let uid = uid.map_err(|e| {
            Error::Failed(format!(
                "cannot identify the caller {sender} on the bus: {e}"
            ))
        })?;
        let pid = pid.ok().and_then(|p| i32::try_from(p).ok());
        Ok((sender, Peer::unix(uid, pid)))
    }

    /// The [`ApiRequest`] of a call, after the checks that need no model.
    fn request(
        &self,
        input: PromptInput,
        options: &HashMap<String, OwnedValue>,
        stream: bool,
        peer: Peer,
    ) -> Result<ApiRequest, Error> {
        let limits = self.service.limits();
        let options = parse_options(options, &limits)?;
        check_size(&input, limits.max_body_bytes)?;
        Ok(ApiRequest {
            input,
            max_tokens: options.max_tokens,
            stop: options.stop,
            sampler: options.sampler,
            logprobs: None,
            stream,
            ignore_eos: options.ignore_eos,
            peer,
        })
    }

    /// Records a request and, for a connection seen for the first time, watches it leave.
    fn track(
        self: &Arc<Self>,
        conn: &Connection,
        id: u64,
        owner: &UniqueName<'_>,
        cancel: Arc<AtomicBool>,
    ) {
        let stopped = self.registry().add(id, owner.as_str(), cancel);
        if let Some(stopped) = stopped {
            let shared = self.clone();
            let conn = conn.clone();
            let owner = owner.to_owned();
            tokio::spawn(async move { shared.watch_owner(conn, owner, stopped).await });
        }
        self.props_changed.notify_one();
    }

    /// Waits for `owner` to leave the bus (then cancels its requests) or for `stopped` (its
    /// last request ended).
    async fn watch_owner(
        self: Arc<Self>,
        conn: Connection,
        owner: UniqueName<'static>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let driver = match self.bus_driver(&conn).await {
            Ok(driver) => driver.clone(),
            Err(e) => {
                log::warn!("D-Bus: cannot watch {owner}: {e}");
                return;
            }
        };
        let mut changes = match driver
            .receive_name_owner_changed_with_args(&[(0, owner.as_str())])
            .await
        {
            Ok(changes) => changes,
            Err(e) => {
                log::warn!("D-Bus: cannot watch {owner}: {e}");
                return;
            }
        };
        // The caller may have left before the match rule was in place.
        let present = driver
            .name_has_owner(BusName::Unique(owner.as_ref()))
            .await
            .unwrap_or(true);
        if present {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    change = changes.next() => match change {
                        None => return,
                        Some(change) => {
                            let gone = change
                                .args()
                                .map(|a| a.new_owner().is_none())
                                .unwrap_or(false);
                            if gone {
                                break;
                            }
                        }
                    },
                }
            }
        }
        let cancelled = self.registry().owner_gone(owner.as_str());
        if cancelled > 0 {
            log::info!(
                "D-Bus: {owner} left the bus; cancelled its {cancelled} request{}",
                if cancelled == 1 { "" } else { "s" }
            );
        }
    }

    /// `Generate` and `Chat`: submits a streamed request; its signals go to the caller after the
    /// reply (with its id) has been sent.
    async fn start_stream(
        self: &Arc<Self>,
        conn: &Connection,
        header: &Header<'_>,
        input: PromptInput,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<u64>, Error> {
        let (caller, peer) = self.caller(conn, header).await?;
        let request = self.request(input, options, true, peer)?;
        let emitter = SignalEmitter::new(conn, OBJECT_PATH)?
            .set_destination(BusName::Unique(caller.clone()))
            .into_owned();
        let stream = self.service.submit(request).await?;
        let id = stream.id();
        self.track(conn, id, &caller, stream.cancel_flag());
        let (reply, sent) = ResponseDispatchNotifier::new(id);
        tokio::spawn(self.clone().relay(stream, emitter, sent));
        Ok(reply)
    }

    /// Sends a request's events as signals to its owner, once `sent` says the reply is out.
    async fn relay(
        self: Arc<Self>,
        mut stream: RequestStream,
        emitter: SignalEmitter<'static>,
        sent: impl Future<Output = ()>,
    ) {
        let id = stream.id();
        let _forget = Forget {
            shared: self.clone(),
            id,
        };
        sent.await;
        let cancelled = stream.cancel_flag();
        let mut relay = Relay::default();
        loop {
            let signal = match stream.next_event().await {
                Some(event) => match relay.event(settle(event, &cancelled)) {
                    Some(signal) => signal,
                    None => continue,
                },
                None => relay.ended(),
            };
            let last = matches!(signal, Signal::Done { .. });
            let sent = match &signal {
                Signal::Token(text) => Mistrald1Server::token(&emitter, id, text).await,
                Signal::Done { text, info } => {
                    Mistrald1Server::done(&emitter, id, text, &info.finish_reason, info.usage())
                        .await
                }
            };
            if let Err(e) = sent {
                log::warn!("D-Bus: request {id}: cannot send a signal ({e}); cancelling it");
                stream.cancel();
                break;
            }
            if last {
                break;
            }
        }
        drop(stream);
        self.props_changed.notify_one();
    }
}

/// The object at [`OBJECT_PATH`].
struct Mistrald1Server {
    shared: Arc<Shared>,
}

/// `org.mistrald.Mistrald1`. The full contract, with the options, errors and signal contents,
/// is `systemd/dbus/org.mistrald.Mistrald1.xml`.
#[zbus::interface(name = "org.mistrald.Mistrald1")]
impl Mistrald1Server {
    /// Starts a completion of the prompt; its text follows as Token signals, then one Done.
    #[zbus(out_args("request_id"))]
    async fn generate(
        &self,
        prompt: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ResponseDispatchNotifier<u64>, Error> {
        self.shared
            .start_stream(conn, &header, PromptInput::Text(prompt), &options)
            .await
    }

    /// Starts a chat reply to (role, content) messages; signals as Generate.
    #[zbus(out_args("request_id"))]
    async fn chat(
        &self,
        messages: Vec<(String, String)>,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ResponseDispatchNotifier<u64>, Error> {
        let messages = parse_messages(&messages)?;
        self.shared
            .start_stream(conn, &header, PromptInput::Chat(messages), &options)
            .await
    }

    /// A blocking completion: the whole text and the finish reason.
    #[zbus(out_args("text", "finish_reason"))]
    async fn complete(
        &self,
        prompt: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, String), Error> {
        let shared = &self.shared;
        let (caller, peer) = shared.caller(conn, &header).await?;
        let request = shared.request(PromptInput::Text(prompt), &options, false, peer)?;
        let mut stream = shared.service.submit(request).await?;
        let id = stream.id();
        shared.track(conn, id, &caller, stream.cancel_flag());
        let _forget = Forget {
            shared: shared.clone(),
            id,
        };
        let answer = collect(&mut stream).await;
        drop(stream);
        shared.props_changed.notify_one();
        answer
    }

    /// Cancels a request this connection started.
    async fn cancel(
        &self,
        request_id: u64,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), Error> {
        let caller = header
            .sender()
            .ok_or_else(|| Error::Failed("the call has no sender".into()))?;
        self.shared.registry().cancel(request_id, caller.as_str())?;
        log::debug!("D-Bus: request {request_id} cancelled by {caller}");
        Ok(())
    }

    /// New output text of a request.
    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, request_id: u64, text: &str) -> zbus::Result<()>;

    /// The end of a request.
    #[zbus(signal)]
    async fn done(
        emitter: &SignalEmitter<'_>,
        request_id: u64,
        text: &str,
        finish_reason: &str,
        usage: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<()>;

    /// The served model's id.
    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        self.shared.service.model_id()
    }

    /// The sliding window in positions; 0 for full attention.
    #[zbus(property)]
    fn window(&self) -> u32 {
        self.shared.props().window
    }

    /// Whether requests are served.
    #[zbus(property)]
    fn ready(&self) -> bool {
        self.shared.props().ready
    }

    /// Requests waiting for a sequence.
    #[zbus(property)]
    fn queue_length(&self) -> u32 {
        self.shared.props().queue_length
    }

    /// Requests being processed.
    #[zbus(property)]
    fn active_requests(&self) -> u32 {
        self.shared.props().active_requests
    }
}

/// Publishes `PropertiesChanged` for the properties that changed, at most every
/// [`PROPERTIES_INTERVAL`]: checked at that interval, and sooner (still rate-limited) when a
/// request starts or ends.
async fn publish_properties(shared: Arc<Shared>, conn: Connection) {
    let mut tick = tokio::time::interval(PROPERTIES_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.props_changed.notified() => {}
            _ = conn.closed() => {
                log::error!("D-Bus: the connection to the bus closed; the D-Bus interface is gone");
                return;
            }
        }
        shared.publish_changes(&conn).await;
    }
}

impl Shared {
    /// Sends `PropertiesChanged` for the properties that changed since the last one, once
    /// [`PROPERTIES_INTERVAL`] has passed since it.
    async fn publish_changes(&self, conn: &Connection) {
        let (last, at) = *self.published.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = at {
            tokio::time::sleep_until((at + PROPERTIES_INTERVAL).into()).await;
        }
        let now = self.props();
        if now == last {
            return;
        }
        let mut changed: HashMap<&str, Value<'_>> = HashMap::new();
        if now.window != last.window {
            changed.insert("Window", now.window.into());
        }
        if now.ready != last.ready {
            changed.insert("Ready", now.ready.into());
        }
        if now.queue_length != last.queue_length {
            changed.insert("QueueLength", now.queue_length.into());
        }
        if now.active_requests != last.active_requests {
            changed.insert("ActiveRequests", now.active_requests.into());
        }
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = (now, Some(Instant::now()));
        let sent = match SignalEmitter::new(conn, OBJECT_PATH) {
            Ok(emitter) => {
                zbus::fdo::Properties::properties_changed(
                    &emitter,
                    InterfaceName::from_static_str_unchecked(INTERFACE),
                    changed,
                    Cow::Borrowed(&[]),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            log::warn!("D-Bus: cannot send PropertiesChanged: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The bus behind a [`DbusBus`] setting, in words ("the session bus").
fn bus_words(bus: DbusBus) -> &'static str {
    match bus {
        DbusBus::System => "the system bus",
        DbusBus::Session => "the session bus",
        DbusBus::None => "no bus",
    }
}

/// The D-Bus front end of a running daemon: its bus connection, the served object and the
/// property publisher.
pub struct DbusServer {
    conn: Connection,
    bus: DbusBus,
    shared: Arc<Shared>,
    publisher: tokio::task::JoinHandle<()>,
}

impl DbusServer {
    /// Connects to `bus`, serves the object (requests get `NotReady` until the service is
    /// ready) and checks that no other process owns [`BUS_NAME`]. The name itself is requested
    /// by [`DbusServer::claim_name`] once the model is loaded.
    pub async fn start(bus: DbusBus, service: Service) -> anyhow::Result<DbusServer> {
        let builder = match bus {
            DbusBus::Session => zbus::connection::Builder::session(),
            DbusBus::System => zbus::connection::Builder::system(),
            DbusBus::None => anyhow::bail!("no D-Bus bus configured"),
        }
        .with_context(|| format!("cannot connect to {}", bus_words(bus)))?;
        let shared = Arc::new(Shared::new(service));
        let object = Mistrald1Server {
            shared: shared.clone(),
        };
        let conn = builder
            .serve_at(OBJECT_PATH, object)
            .context("cannot serve the D-Bus object")?
            .build()
            .await
            .with_context(|| format!("cannot connect to {}", bus_words(bus)))?;
        let name = WellKnownName::from_static_str_unchecked(BUS_NAME);
        let driver = shared
            .bus_driver(&conn)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let taken = driver
            .name_has_owner(BusName::WellKnown(name))
            .await
            .with_context(|| format!("cannot query {}", bus_words(bus)))?;
        if taken {
            anyhow::bail!(
                "{BUS_NAME} is already owned on {} (is another mistrald running?)",
                bus_words(bus)
            );
        }
        let publisher = tokio::spawn(publish_properties(shared.clone(), conn.clone()));
        log::info!(
            "D-Bus: connected to {} as {}; {BUS_NAME} is requested once the model is loaded",
            bus_words(bus),
            conn.unique_name()
                .map_or("?".to_string(), |n| n.to_string())
        );
        Ok(DbusServer {
            conn,
            bus,
            shared,
            publisher,
        })
    }

    /// Requests [`BUS_NAME`] (the service is ready): from now on clients reach it by name.
    pub async fn claim_name(&self) -> anyhow::Result<()> {
        let name = WellKnownName::from_static_str_unchecked(BUS_NAME);
        let reply = self
            .conn
            .request_name_with_flags(name, RequestNameFlags::DoNotQueue.into())
            .await;
        match reply {
            Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {
                log::info!("D-Bus: serving {BUS_NAME} on {}", bus_words(self.bus));
                self.shared.props_changed.notify_one();
                Ok(())
            }
            Ok(RequestNameReply::Exists | RequestNameReply::InQueue) => anyhow::bail!(
                "{BUS_NAME} is already owned on {} (is another mistrald running?)",
                bus_words(self.bus)
            ),
            Err(zbus::Error::MethodError(error, message, _))
                if error.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
            {
                anyhow::bail!(
                    "{} does not allow this user to own {BUS_NAME}: {}{}",
                    bus_words(self.bus),
                    message.unwrap_or_default(),
                    if self.bus == DbusBus::System {
                        " (install systemd/dbus/system/org.mistrald.Mistrald1.conf in \
                         /usr/share/dbus-1/system.d/ and run mistrald as user mistrald)"
                    } else {
                        ""
                    }
                )
            }
            Err(e) => Err(anyhow::anyhow!(
                "cannot request {BUS_NAME} on {}: {e}",
                bus_words(self.bus)
            )),
        }
    }

    /// Shutdown begins: publishes `Ready` = false; new calls get `ShuttingDown` from the
    /// service, requests in flight go on. The name is kept until [`DbusServer::finish`]: clients
    /// that follow the signals of the name's owner (zbus proxies, GDBus subscriptions naming
    /// the service) would miss the last `Done` signals of a former owner.
    pub async fn begin_shutdown(&self) {
        self.shared.props_changed.notify_one();
    }

    /// Requests started over the bus that have not ended.
    pub fn requests_in_flight(&self) -> usize {
        self.shared.registry().requests.len()
    }

    /// The end: waits up to `limit` for the last `Done` signals to be sent (the scheduler has
    /// ended every request by now), releases the name and closes the connection.
    pub async fn finish(self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.requests_in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.requests_in_flight();
        if left > 0 {
            log::warn!("D-Bus: {left} requests still sending when the connection closed");
        }
        // The last changes (Ready = false), while the name is still ours.
        self.publisher.abort();
        self.shared.publish_changes(&self.conn).await;
        let name = WellKnownName::from_static_str_unchecked(BUS_NAME);
        if let Err(e) = self.conn.release_name(name).await {
            log::debug!("D-Bus: releasing {BUS_NAME}: {e}");
        }
        if let Err(e) = self.conn.close().await {
            log::debug!("D-Bus: closing the connection: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing introspection documents
// ---------------------------------------------------------------------------------------------

/// The members of the `org.mistrald.Mistrald1` interface in an introspection document, one
/// string per method, signal or property (with its arguments in order, its attributes sorted
/// and its annotations), sorted: two documents describe the same interface when these are
/// equal, whatever their formatting, comments and member order. `Err` names what is missing.
pub fn interface_members(xml: &str) -> Result<Vec<String>, String> {
    // Comments out.
    let mut text = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        let end = rest[start..]
            .find("-->")
            .ok_or("an XML comment is not closed")?;
        rest = &rest[start + end + 3..];
    }
    text.push_str(rest);
    let open = format!("<interface name=\"{INTERFACE}\">");
    let start = text
        .find(&open)
        .ok_or_else(|| format!("no {open} element"))?;
    let body = &text[start + open.len()..];
    let end = body
        .find("</interface>")
        .ok_or("the interface element is not closed")?;
    let body = &body[..end];
    // Tags, normalized: `<name a="1" b="2">`, `</name>`; `<x/>` becomes `<x>` `</x>`.
    let mut tags: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').ok_or("a tag is not closed")? + start;
        let inner = rest[start + 1..end].trim();
        rest = &rest[end + 1..];
        if let Some(name) = inner.strip_prefix('/') {
            tags.push(format!("</{}>", name.trim()));
            continue;
        }
        let (inner, empty) = match inner.strip_suffix('/') {
            Some(inner) => (inner.trim(), true),
            None => (inner, false),
        };
        let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
        let name = &inner[..name_end];
        let mut attributes = Vec::new();
        let mut attrs = inner[name_end..].trim();
        while !attrs.is_empty() {
            let eq = attrs
                .find('=')
                .ok_or_else(|| format!("bad attributes in <{inner}>"))?;
            let key = attrs[..eq].trim();
            let value = attrs[eq + 1..].trim_start();
            let quote = value
                .chars()
                .next()
                .filter(|c| *c == '"' || *c == '\'')
                .ok_or_else(|| format!("unquoted attribute in <{inner}>"))?;
            let close = value[1..]
                .find(quote)
                .ok_or_else(|| format!("unclosed attribute in <{inner}>"))?;
            attributes.push(format!("{key}=\"{}\"", &value[1..1 + close]));
            attrs = value[close + 2..].trim_start();
        }
        attributes.sort();
        let mut tag = format!("<{name}");
        for a in &attributes {
            tag.push(' ');
            tag.push_str(a);
        }
        tag.push('>');
        tags.push(tag);
        if empty {
            tags.push(format!("</{name}>"));
        }
    }
    // Members: from a top-level opening tag to its closing tag.
    let mut members = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for tag in tags {
        let closing = tag.starts_with("</");
        if !closing {
            depth += 1;
        }
        current.push_str(&tag);
        if closing {
            depth = depth
                .checked_sub(1)
                .ok_or_else(|| format!("unbalanced {tag}"))?;
            if depth == 0 {
                members.push(std::mem::take(&mut current));
            }
        }
    }
    if depth != 0 {
        return Err("unbalanced tags in the interface".into());
    }
    members.sort();
    Ok(members)
}

// ---------------------------------------------------------------------------------------------
// A client proxy
// ---------------------------------------------------------------------------------------------

/// A client proxy of the interface (for `mistralctl --dbus` and the tests); the generated type
/// is `Mistrald1Proxy`. Application authors can copy this trait (see `examples/dbus_client.rs`).
#[zbus::proxy(
    interface = "org.mistrald.Mistrald1",
    default_service = "org.mistrald.Mistrald1",
    default_path = "/org/mistrald/Mistrald1",
    gen_blocking = false
)]
pub trait Mistrald1 {
    /// Starts a completion; returns the request id.
    fn generate(&self, prompt: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<u64>;

    /// Starts a chat reply; returns the request id.
    fn chat(
        &self,
        messages: &[(&str, &str)],
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<u64>;

    /// A blocking completion: (text, finish reason).
    fn complete(
        &self,
        prompt: &str,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(String, String)>;

    /// Cancels a request this connection started.
    fn cancel(&self, request_id: u64) -> zbus::Result<()>;

    /// New output text of a request.
    #[zbus(signal)]
    fn token(&self, request_id: u64, text: &str) -> zbus::Result<()>;

    /// The end of a request.
    #[zbus(signal)]
    fn done(
        &self,
        request_id: u64,
        text: &str,
        finish_reason: &str,
        usage: HashMap<String, OwnedValue>,
    ) -> zbus::Result<()>;

    /// The served model's id.
    #[zbus(property)]
    fn model(&self) -> zbus::Result<String>;

    /// The sliding window (0: full attention).
    #[zbus(property)]
    fn window(&self) -> zbus::Result<u32>;

    /// Whether requests are served.
    #[zbus(property)]
    fn ready(&self) -> zbus::Result<bool>;

    /// Requests waiting for a sequence.
    #[zbus(property)]
    fn queue_length(&self) -> zbus::Result<u32>;

    /// Requests being processed.
    #[zbus(property)]
    fn active_requests(&self) -> zbus::Result<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Finish, ServiceLimits, Usage};
    use crate::metrics::Metrics;
    use zbus::object_server::Interface as _;
    use zbus::DBusError as _;

    fn options(pairs: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    fn parse(pairs: Vec<(&str, Value<'static>)>) -> Result<RequestOptions, Error> {
        parse_options(&options(pairs), &ServiceLimits::default())
    }

    fn invalid_message(r: Result<RequestOptions, Error>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn option_names_list_every_sampling_option() {
        let mut expected = vec!["max_tokens"];
        expected.extend(crate::api::SAMPLING_OPTIONS.iter().map(|o| o.name()));
        expected.extend(["stop", "ignore_eos"]);
        assert_eq!(OPTION_NAMES, expected.as_slice());
    }

    /// Both front ends read the same table: at each bound and just outside it, the D-Bus
    /// option and the HTTP field are accepted or refused alike, and set the same value.
    #[test]
    fn dbus_and_http_agree_on_every_sampling_range() {
        use crate::api::openai::{parse_json, parse_request, Endpoint};
        let http = |name: &str, v: &str| {
            let body = format!(r#"{{"prompt":"x","{name}":{v}}}"#);
            parse_request(
                Endpoint::Completions,
                &parse_json(body.as_bytes()).unwrap(),
                &ServiceLimits::default(),
                Peer::default(),
            )
            .map(|r| format!("{:?}", r.request.sampler))
        };
        let dbus = |name: &str, v: Value<'static>| {
            parse(vec![(name, v)]).map(|o| format!("{:?}", o.sampler))
        };
        for option in &crate::api::SAMPLING_OPTIONS {
            let name = option.name();
            let cases: Vec<(String, Value<'static>, bool)> = match *option {
                SamplingOption::Number {
                    lo,
                    lo_inclusive,
                    hi,
                    ..
                } => vec![
                    (format!("{lo}"), Value::F64(lo), lo_inclusive),
                    (format!("{}", lo - 0.5), Value::F64(lo - 0.5), false),
                    (format!("{hi}"), Value::F64(hi), true),
                    (format!("{}", hi + 0.5), Value::F64(hi + 0.5), false),
                ],
                SamplingOption::Integer { min, max, .. } => {
                    let mut c = vec![
                        (format!("{min}"), Value::U64(min), true),
                        (format!("{max}"), Value::U64(max), true),
                    ];
                    if max < u64::MAX {
                        c.push((format!("{}", max + 1), Value::U64(max + 1), false));
                    }
                    if min == 0 {
                        c.push(("-1".to_string(), Value::I64(-1), false));
                    }
                    c
                }
            };
            for (json, value, ok) in cases {
                let (h, d) = (http(name, &json), dbus(name, value));
                assert_eq!(h.is_ok(), ok, "HTTP {name}={json}: {h:?}");
                assert_eq!(d.is_ok(), ok, "D-Bus {name}={json}: {d:?}");
                if ok {
                    assert_eq!(
                        h.unwrap(),
                        d.unwrap(),
                        "{name}={json} sets the same sampler"
                    );
                }
            }
        }
    }

    #[test]
    fn every_api_error_becomes_a_named_error_with_its_message() {
        let cases = [
            ApiError::invalid("max_tokens", "max_tokens must be between 1 and 8"),
            ApiError::ContextTooLong {
                prompt_tokens: 9,
                limit: 8,
            },
            ApiError::Rejected {
                plugin: "moderation".into(),
                reason: "no".into(),
            },
            ApiError::Busy {
                queued: 3,
                retry_after_secs: 2,
            },
            ApiError::NotReady,
            ApiError::ShuttingDown,
            ApiError::Cancelled,
            ApiError::PluginFault {
                plugin: "p".into(),
                message: "trap".into(),
            },
            ApiError::AccessDenied("not yours".into()),
            ApiError::NotFound("no such request".into()),
            ApiError::Internal("boom".into()),
        ];
        for e in cases {
            let want = format!("{ERROR_PREFIX}.{}", error_kind(&e));
            let message = e.to_string();
            let d = Error::from(e);
            assert_eq!(d.name().as_str(), want);
            assert_eq!(d.description(), Some(message.as_str()));
        }
        let busy = Error::from(ApiError::Busy {
            queued: 3,
            retry_after_secs: 2,
        });
        assert_eq!(busy.name().as_str(), "org.mistrald.Mistrald1.Error.Busy");
        assert_eq!(
            busy.description(),
            Some("the server is busy (3 requests queued); retry in 2 s")
        );
    }

    #[test]
    fn defaults_are_the_http_apis() {
        let ours = parse(vec![]).unwrap();
        let body = serde_json::json!({"prompt": "x"});
        let http = crate::api::openai::parse_request(
            crate::api::openai::Endpoint::Completions,
            &body,
            &ServiceLimits::default(),
            Peer::default(),
        )
        .unwrap()
        .request;
        assert_eq!(ours.sampler, http.sampler);
        assert_eq!(ours.max_tokens, None);
        assert!(ours.stop.is_empty());
        assert!(!ours.ignore_eos);
    }

    #[test]
    fn numbers_of_every_dbus_type_are_accepted() {
        let ints: Vec<Value<'static>> = vec![
            Value::U8(7),
            Value::I16(7),
            Value::U16(7),
            Value::I32(7),
            Value::U32(7),
            Value::I64(7),
            Value::U64(7),
            Value::F64(7.0),
            Value::Value(Box::new(Value::I32(7))),
        ];
        for v in ints {
            let sig = v.value_signature().to_string();
            let o = parse(vec![
                ("max_tokens", v.try_clone().unwrap()),
                ("top_k", v.try_clone().unwrap()),
                ("seed", v),
            ])
            .unwrap_or_else(|e| panic!("type {sig}: {e:?}"));
            assert_eq!(o.max_tokens, Some(7), "{sig}");
            assert_eq!(o.sampler.top_k, 7, "{sig}");
            assert_eq!(o.sampler.seed, Some(7), "{sig}");
        }
        for v in [Value::U8(0), Value::I32(0), Value::U64(0), Value::F64(0.0)] {
            assert_eq!(
                parse(vec![("temperature", v)]).unwrap().sampler.temperature,
                0.0
            );
        }
        let o = parse(vec![
            ("temperature", Value::F64(0.5)),
            ("top_p", Value::F64(0.9)),
            ("min_p", Value::F64(0.05)),
            ("repeat_penalty", Value::U16(2)),
            ("presence_penalty", Value::I16(-2)),
            ("frequency_penalty", Value::F64(1.5)),
            ("seed", Value::U64(u64::MAX)),
            ("ignore_eos", Value::Bool(true)),
        ])
        .unwrap();
        assert_eq!(o.sampler.temperature, 0.5);
        assert_eq!(o.sampler.top_p, 0.9);
        assert_eq!(o.sampler.min_p, 0.05);
        assert_eq!(o.sampler.repeat_penalty, 2.0);
        assert_eq!(o.sampler.presence_penalty, -2.0);
        assert_eq!(o.sampler.frequency_penalty, 1.5);
        assert_eq!(o.sampler.seed, Some(u64::MAX));
        assert!(o.ignore_eos);
    }

    #[test]
    fn bad_options_are_invalid_arguments_naming_the_option() {
        let cases: Vec<(Vec<(&str, Value<'static>)>, &str)> = vec![
            (
                vec![("temprature", Value::F64(0.0))],
                "unknown option 'temprature'",
            ),
            (
                vec![("temperature", Value::from("hot"))],
                "option temperature: expected a number",
            ),
            (vec![("temperature", Value::Bool(true))], "got type 'b'"),
            (
                vec![("temperature", Value::F64(2.5))],
                "option temperature: 2.5 is out of range",
            ),
            (
                vec![("temperature", Value::F64(f64::NAN))],
                "option temperature",
            ),
            (
                vec![("top_p", Value::F64(0.0))],
                "option top_p: 0 is out of range (0 exclusive",
            ),
            (
                vec![("max_tokens", Value::I32(0))],
                "option max_tokens: 0 is out of range (1..=32768)",
            ),
            (
                vec![("max_tokens", Value::U64(40000))],
                "option max_tokens: 40000 is out of range",
            ),
            (
                vec![("max_tokens", Value::F64(3.5))],
                "option max_tokens: expected an integer, got 3.5",
            ),
            (
                vec![("max_tokens", Value::from("8"))],
                "option max_tokens: expected a number",
            ),
            (
                vec![("seed", Value::I64(-1))],
                "option seed: -1 is out of range",
            ),
            (
                vec![("top_k", Value::F64(f64::INFINITY))],
                "option top_k: expected an integer",
            ),
            (
                vec![("stop", Value::U32(1))],
                "option stop: expected a string (s) or an array",
            ),
            (
                vec![("stop", Value::from(vec![1u32, 2]))],
                "option stop[0]: expected a string",
            ),
            (
                vec![("stop", Value::from(""))],
                "stop strings must not be empty",
            ),
            (
                vec![("ignore_eos", Value::U8(1))],
                "option ignore_eos: expected a boolean (b)",
            ),
        ];
        for (pairs, want) in cases {
            let shown = format!("{pairs:?}");
            let message = invalid_message(parse(pairs));
            assert!(
                message.contains(want),
                "{shown}: {message:?} lacks {want:?}"
            );
        }
        let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let message = invalid_message(parse(vec![("stop", Value::from(many))]));
        assert!(message.contains("at most 16 stop strings"), "{message}");
        let message = invalid_message(parse(vec![("bogus", Value::U8(1))]));
        assert!(
            message.contains("known options: max_tokens, temperature"),
            "{message}"
        );
    }

    #[test]
    fn stop_is_a_string_or_an_array_of_strings() {
        let o = parse(vec![("stop", Value::from("\n"))]).unwrap();
        assert_eq!(o.stop, vec!["\n".to_string()]);
        let o = parse(vec![("stop", Value::from(vec!["a", "bc"]))]).unwrap();
        assert_eq!(o.stop, vec!["a".to_string(), "bc".to_string()]);
        let limits = ServiceLimits {
            max_stop_strings: 1,
            max_tokens_limit: 8,
            ..ServiceLimits::default()
        };
        let two = options(vec![("stop", Value::from(vec!["a", "b"]))]);
        assert!(parse_options(&two, &limits).is_err());
        let nine = options(vec![("max_tokens", Value::U32(9))]);
        assert!(parse_options(&nine, &limits).is_err());
    }

    #[test]
    fn chat_messages_are_checked_like_the_http_apis() {
        let m = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(r, c)| (r.to_string(), c.to_string()))
                .collect()
        };
        let ok = parse_messages(&m(&[
            ("developer", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Tell me a fortune"),
        ]))
        .unwrap();
        assert_eq!(ok[0].role, "system");
        assert_eq!(ok[3].content, "Tell me a fortune");
        for (messages, want) in [
            (m(&[]), "at least one message"),
            (m(&[("system", "x")]), "must contain a user message"),
            (
                m(&[("user", "a"), ("user", "")]),
                "messages[1]: the last user message",
            ),
            (
                m(&[("tool", "x"), ("user", "a")]),
                "messages[0]: unknown role 'tool'",
            ),
        ] {
            match parse_messages(&messages) {
                Err(Error::InvalidArgument(message)) => {
                    assert!(message.contains(want), "{message:?} lacks {want:?}")
                }
                other => panic!("{messages:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn prompts_over_max_body_bytes_are_refused() {
        let input = PromptInput::Text("x".repeat(100));
        assert!(check_size(&input, 100).is_ok());
        match check_size(&input, 99) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("server.max_body_bytes"), "{m}"),
            other => panic!("{other:?}"),
        }
        let chat = PromptInput::Chat(vec![ChatMessage::new("user", &"y".repeat(200))]);
        assert!(check_size(&chat, 100).is_err());
    }

    #[test]
    fn events_become_tokens_and_one_done() {
        let mut relay = Relay::default();
        let started = Event::Started {
            prompt_tokens: 5,
            cached_tokens: 2,
        };
        assert_eq!(relay.event(started), None);
        let delta = |t: &str| Event::Delta {
            text: t.into(),
            logprobs: Vec::new(),
        };
        assert_eq!(relay.event(delta("")), None);
        assert_eq!(relay.event(delta("Hel")), Some(Signal::Token("Hel".into())));
        assert_eq!(relay.event(delta("lo")), Some(Signal::Token("lo".into())));
        let done = relay.event(Event::Done {
            finish: Finish::Length,
            text: "Hello".into(),
            refusal: None,
            usage: Usage {
                prompt_tokens: 5,
                cached_tokens: 2,
                completion_tokens: 2,
            },
        });
        let Some(Signal::Done { text, info }) = done else {
            panic!("{done:?}")
        };
        assert_eq!(text, "Hello");
        assert_eq!(info.finish_reason, "length");
        let usage = info.usage();
        assert_eq!(usage["prompt_tokens"], Value::U32(5));
        assert_eq!(usage["cached_tokens"], Value::U32(2));
        assert_eq!(usage["completion_tokens"], Value::U32(2));
        assert!(!usage.contains_key("error"));

        // A refusal by on-complete.
        let mut relay = Relay::default();
        let done = relay.event(Event::Done {
            finish: Finish::ContentFilter,
            text: String::new(),
            refusal: Some("no cats".into()),
            usage: Usage::default(),
        });
        let Some(Signal::Done { info, .. }) = done else {
            panic!("{done:?}")
        };
        assert_eq!(info.finish_reason, "content_filter");
        assert_eq!(info.usage()["refusal"], Value::from("no cats"));
    }

    #[test]
    fn cancelled_and_failed_requests_end_with_a_done_naming_the_error() {
        let mut relay = Relay::default();
        relay.event(Event::Started {
            prompt_tokens: 4,
            cached_tokens: 0,
        });
        relay.event(Event::Delta {
            text: "Never".into(),
            logprobs: Vec::new(),
        });
        let Some(Signal::Done { text, info }) = relay.event(Event::Error(ApiError::Cancelled))
        else {
            panic!()
        };
        assert_eq!(text, "Never", "the text sent so far");
        assert_eq!(info.finish_reason, "cancelled");
        let usage = info.usage();
        assert_eq!(
            usage["error"],
            Value::from("org.mistrald.Mistrald1.Error.Cancelled")
        );
        assert_eq!(
            usage["error_message"],
            Value::from("the request was cancelled")
        );
        assert_eq!(usage["prompt_tokens"], Value::U32(4));
        assert!(!usage.contains_key("completion_tokens"));

        let mut relay = Relay::default();
        let Some(Signal::Done { info, .. }) = relay.event(Event::Error(ApiError::ShuttingDown))
        else {
            panic!()
        };
        assert_eq!(info.finish_reason, "error");
        assert_eq!(
            info.error.unwrap().0,
            "org.mistrald.Mistrald1.Error.ShuttingDown"
        );
        let Signal::Done { info, .. } = Relay::default().ended() else {
            panic!()
        };
        assert_eq!(info.error.unwrap().0, "org.mistrald.Mistrald1.Error.Failed");
    }

    #[test]
    fn only_the_owner_cancels_and_a_departed_owner_cancels_everything() {
        let mut registry = Registry::default();
        let flag = || Arc::new(AtomicBool::new(false));
        let (a1, a2, b1) = (flag(), flag(), flag());
        assert!(
            registry.add(1, ":1.10", a1.clone()).is_some(),
            "first: watch it"
        );
        assert!(
            registry.add(2, ":1.10", a2.clone()).is_none(),
            "already watched"
        );
        let mut b_watch = registry.add(3, ":1.11", b1.clone()).unwrap();

        match registry.cancel(1, ":1.11") {
            Err(Error::AccessDenied(m)) => assert!(m.contains("another connection"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!a1.load(Ordering::Relaxed));
        match registry.cancel(99, ":1.10") {
            Err(Error::NotFound(m)) => assert!(m.contains("no request 99"), "{m}"),
            other => panic!("{other:?}"),
        }
        registry.cancel(1, ":1.10").unwrap();
        assert!(a1.load(Ordering::Relaxed));

        assert_eq!(registry.owner_gone(":1.10"), 2);
        assert!(a2.load(Ordering::Relaxed));
        assert!(
            !b1.load(Ordering::Relaxed),
            "another connection's request goes on"
        );

        // The watch ends with the owner's last request.
        assert!(b_watch.try_recv().is_err());
        registry.remove(3);
        assert!(matches!(
            b_watch.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        registry.remove(1);
        registry.remove(2);
        registry.remove(2);
        assert!(registry.requests.is_empty());
        assert!(registry.owners.is_empty());
    }

    #[test]
    fn the_served_interface_is_the_checked_in_xml() {
        let service = Service::new(
            std::path::Path::new("/models/m.gguf"),
            None,
            ServiceLimits::default(),
            Arc::new(Metrics::new()),
        );
        let object = Mistrald1Server {
            shared: Arc::new(Shared::new(service)),
        };
        let mut live = String::new();
        object.introspect_to_writer(&mut live, 2);
        let live = format!("<node>\n{live}</node>\n");
        let served = interface_members(&live).unwrap();
        let contract = interface_members(INTROSPECTION_XML).unwrap();
        assert_eq!(served, contract, "the live introspection:\n{live}");
        assert_eq!(contract.len(), 4 + 2 + 5);
        assert_eq!(object.model(), "m");
        assert!(!object.ready(), "not ready before the model is loaded");
    }

    #[test]
    fn interface_members_ignore_formatting_comments_and_order() {
        let a = r#"<node><interface name="org.mistrald.Mistrald1">
              <!-- a comment with <tags> -->
              <method name="Cancel"><arg type="t" name="request_id" direction="in"/></method>
              <property name="Ready" type="b" access="read"/>
            </interface></node>"#;
        let b = r#"<node>
          <interface name="org.mistrald.Mistrald1">
            <property access="read" name="Ready" type="b"></property>
            <method name="Cancel">
              <arg name="request_id" type="t" direction="in" />
            </method>
          </interface>
        </node>"#;
        assert_eq!(interface_members(a).unwrap(), interface_members(b).unwrap());
        let c = b.replace("type=\"t\"", "type=\"u\"");
        assert_ne!(
            interface_members(a).unwrap(),
            interface_members(&c).unwrap()
        );
        assert!(interface_members("<node/>").is_err());
    }
}
