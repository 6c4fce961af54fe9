//! The OpenAI-compatible wire format: `POST /v1/chat/completions` and `POST /v1/completions`
//! requests turned into [`ApiRequest`]s, and [`Event`]s turned back into `chat.completion` /
//! `text_completion` objects, their streamed chunks and OpenAI-shaped errors.
//!
//! Parsing goes through [`serde_json::Value`] and pulls each known field with a typed helper,
//! so a value of the wrong type or out of range is a 400 that names the field (`param`).
//! Unknown fields are ignored (clients send `user`, `response_format`, …); `null` counts as
//! absent. Defaults follow OpenAI: temperature 1, top_p 1, no top-k, min-p or penalties.
//!
//! # Errors
//!
//! Every error is `{"error": {"message", "type", "param", "code"}}`:
//!
//! | cause | HTTP | `type` | `code` |
//! | --- | --- | --- | --- |
//! | [`ApiError::InvalidRequest`] naming a field (bad JSON type, out of range, …) | 400 | `invalid_request_error` | `invalid_value` |
//! | [`ApiError::InvalidRequest`] without a field (malformed JSON, invalid UTF-8, body not an object) | 400 | `invalid_request_error` | `invalid_request` |
//! | [`ApiError::ContextTooLong`] | 400 | `invalid_request_error` | `context_length_exceeded` |
//! | [`ApiError::Rejected`] (a plugin refused the prompt) | 400 | `invalid_request_error` | `content_filter` |
//! | [`ApiError::AccessDenied`] | 403 | `permission_error` | `access_denied` |
//! | [`ApiError::NotFound`] (unknown model id) | 404 | `invalid_request_error` | `not_found` |
//! | unknown route | 404 | `invalid_request_error` | `unknown_url` |
//! | wrong method for a route | 405 | `invalid_request_error` | `method_not_allowed` |
//! | body over the configured limit | 413 | `invalid_request_error` | `request_too_large` |
//! | [`ApiError::Cancelled`] (the client cancelled it; nginx's "client closed request") | 499 | `invalid_request_error` | `cancelled` |
//! | [`ApiError::PluginFault`] | 500 | `server_error` | `plugin_error` |
//! | [`ApiError::Internal`] | 500 | `server_error` | `internal_error` |
//! | [`ApiError::Busy`] (with `Retry-After`) | 503 | `server_error` | `overloaded` |
//! | [`ApiError::NotReady`] | 503 | `server_error` | `model_not_ready` |
//! | [`ApiError::ShuttingDown`] | 503 | `server_error` | `shutting_down` |
//!
//! An error after a stream has started is sent as a last `data: {"error": …}` event before
//! `data: [DONE]`.
//!
//! # Accepted parameters
//!
//! Both endpoints: `model` (any string; responses name the served model), `max_tokens` /
//! `max_completion_tokens` (1 ..= the configured limit; the latter wins when both are given),
//! `temperature` (0..=2), `top_p` (0 exclusive ..= 1), `seed` (u64), `stop` (a string or up to
//! the configured number of strings, none empty), `presence_penalty` / `frequency_penalty`
//! (-2..=2), `n` (1 only), `stream`, `stream_options.include_usage`, and the extensions `top_k`
//! (≥ 0, 0: off), `min_p` (0..=1), `repeat_penalty` (0 exclusive ..= 10) and `ignore_eos`
//! (bool, as llama.cpp's server: keep generating past the end-of-sequence token; for
//! benchmarks).
//!
//! Chat: `messages` (roles `system`, `user`, `assistant`; `developer` is taken as `system`;
//! content a string or an array of `{"type": "text", "text": …}` parts, joined with newlines;
//! at least one user message, the last of which is not empty), `logprobs` (bool) and
//! `top_logprobs` (0..=20, needs `logprobs: true`).
//!
//! Completions: `prompt` (a string or an array of exactly one string; token arrays are not
//! supported), `logprobs` (integer 0..=5, OpenAI's legacy form), `echo` (false only),
//! `best_of` (1 only), `suffix` (empty only).

use super::{
    ApiError, ApiRequest, Event, Finish, Peer, PromptInput, SamplingOption, ServiceLimits,
    TokenLogprob, Usage, MAX_TOP_LOGPROBS, SAMPLING_OPTIONS,
};
use crate::chat::ChatMessage;
use crate::sampler::SamplerConfig;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

/// Largest `logprobs` of the legacy completions endpoint (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// Which OpenAI endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions` (the legacy text completions).
    Completions,
}

impl Endpoint {
    /// The route.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    /// The response id for request `id`: `chatcmpl-<id>` or `cmpl-<id>`.
    pub fn response_id(self, id: u64) -> String {
        match self {
            Endpoint::ChatCompletions => format!("chatcmpl-{id}"),
            Endpoint::Completions => format!("cmpl-{id}"),
        }
    }
}

/// A request body as understood: the transport-agnostic request plus what only the OpenAI
/// wire format needs.
#[derive(Clone, Debug)]
pub struct ParsedRequest {
    /// The endpoint it came to.
    pub endpoint: Endpoint,
    /// The request for the [`Service`](super::Service).
    pub request: ApiRequest,
    /// `stream_options.include_usage`: send a last chunk with the token counts.
    pub include_usage: bool,
    /// The `model` the client named (informational; responses carry the served model's id).
    pub model: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses a request body as JSON. Invalid UTF-8 and malformed JSON are 400s saying where.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| ApiError::InvalidRequest {
        message: format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ),
        param: None,
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "the request body is empty; expected a JSON object".into(),
            param: None,
        });
    }
    serde_json::from_str(text).map_err(|e| ApiError::InvalidRequest {
        message: format!("the request body is not valid JSON: {e}"),
        param: None,
    })
}

/// Turns a parsed body for `endpoint` into a request, checking every known field against
/// `limits`. `peer` is who sent it.
pub fn parse_request(
    endpoint: Endpoint,
    body: &Value,
    limits: &ServiceLimits,
    peer: Peer,
) -> Result<ParsedRequest, ApiError> {
    let f = Fields::of(body)?;
    let model = f.string("model")?.map(str::to_owned);
    let input = match endpoint {
        Endpoint::ChatCompletions => PromptInput::Chat(parse_messages(f.get("messages"))?),
        Endpoint::Completions => PromptInput::Text(parse_prompt(f.get("prompt"))?),
    };

    let token_limit = limits.max_tokens_limit as u64;
    let max_tokens = f.uint("max_tokens", 1, token_limit)?;
    let max_completion_tokens = f.uint("max_completion_tokens", 1, token_limit)?;
    let max_tokens = max_completion_tokens.or(max_tokens).map(|n| n as usize);

    if let Some(n) = f.uint("n", 1, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n=1 is supported, got {n}"),
            ));
        }
    }
    let stop = parse_stop(f.get("stop"), limits.max_stop_strings)?;
    let sampler = parse_sampler(&f)?;

    let logprobs = match endpoint {
        Endpoint::ChatCompletions => {
            let wanted = f.bool("logprobs")?.unwrap_or(false);
            let top = f.uint("top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
            match (wanted, top) {
                (true, top) => Some(top.unwrap_or(0) as usize),
                (false, Some(k)) if k > 0 => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "top_logprobs requires logprobs to be true",
                    ))
                }
                (false, _) => None,
            }
        }
        Endpoint::Completions => {
            if f.bool("echo")? == Some(true) {
                return Err(ApiError::invalid("echo", "echo is not supported"));
            }
            if let Some(b) = f.uint("best_of", 1, u64::MAX)? {
                if b != 1 {
                    return Err(ApiError::invalid(
                        "best_of",
                        format!("only best_of=1 is supported, got {b}"),
                    ));
                }
            }
            if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
                return Err(ApiError::invalid("suffix", "suffix is not supported"));
            }
            f.uint("logprobs", 0, MAX_COMPLETION_LOGPROBS)?
                .map(|k| k as usize)
        }
    };

    let stream = f.bool("stream")?.unwrap_or(false);
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields {
            obj: o,
            prefix: "stream_options.",
        }
        .bool("include_usage")?
        .unwrap_or(false),
        Some(other) => return Err(type_error("stream_options", "an object", other)),
    };

    Ok(ParsedRequest {
        endpoint,
        request: ApiRequest {
            input,
            max_tokens,
            stop,
            sampler,
            logprobs,
            stream,
            ignore_eos,
            peer,
        },
        include_usage,
        model,
    })
}

fn parse_sampler(f: &Fields) -> Result<SamplerConfig, ApiError> {
    let mut s = SamplerConfig::api_default();
    for option in &SAMPLING_OPTIONS {
        match *option {
            SamplingOption::Number {
                name,
                lo,
                lo_inclusive,
                hi,
                set,
            } => {
                if let Some(v) = f.number(name, lo, lo_inclusive, hi)? {
                    set(&mut s, v);
                }
            }
            SamplingOption::Integer {
                name,
                min,
                max,
                set,
            } => {
                if let Some(v) = f.uint(name, min, max)? {
                    set(&mut s, v);
                }
            }
        }
    }
    // The table's ranges are within the sampler's own; this only guards against drift.
    s.validate().map_err(|message| ApiError::InvalidRequest {
        message,
        param: None,
    })?;
    Ok(s)
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let v = v.ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
    let list = v
        .as_array()
        .ok_or_else(|| type_error("messages", "an array of messages", v))?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| type_error(&at, "an object", m))?;
        let role_param = format!("{at}.role");
        let role = match obj.get("role") {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    &role_param,
                    format!("{role_param} is required"),
                ))
            }
            Some(Value::String(r)) => r.as_str(),
            Some(other) => return Err(type_error(&role_param, "a string", other)),
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => {
                return Err(ApiError::invalid(
                    &role_param,
                    format!(
                        "'{role}' messages are not supported (expected system, user or assistant)"
                    ),
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    &role_param,
                    format!(
                        "unknown role '{}' (expected system, user or assistant)",
                        truncate(other, 64)
                    ),
                ))
            }
        };
        let content_param = format!("{at}.content");
        let content = match obj.get("content") {
            // OpenAI allows an assistant message without content (e.g. one with tool calls).
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    &content_param,
                    format!("{content_param} is required"),
                ))
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(&content_param, parts)?,
            Some(other) => {
                return Err(type_error(
                    &content_param,
                    "a string or an array of text parts",
                    other,
                ))
            }
        };
        out.push(ChatMessage::new(role, &content));
    }
    match out.iter().rposition(|m| m.role == "user") {
        None => Err(ApiError::invalid(
            "messages",
            "messages must contain a user message",
        )),
        Some(i) if out[i].content.is_empty() => Err(ApiError::invalid(
            format!("messages[{i}].content"),
            "the last user message must not be empty",
        )),
        Some(_) => Ok(out),
    }
}

/// The text of an array of content parts (`[{"type": "text", "text": "…"}, …]`).
fn text_parts(param: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{param}[{j}]");
        let obj = part
            .as_object()
            .ok_or_else(|| type_error(&at, "an object", part))?;
        let kind_param = format!("{at}.type");
        match obj.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(ApiError::invalid(
                    &kind_param,
                    format!(
                        "content parts of type '{}' are not supported (only 'text')",
                        truncate(t, 64)
                    ),
                ))
            }
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    &kind_param,
                    format!("{kind_param} is required"),
                ))
            }
            Some(other) => return Err(type_error(&kind_param, "a string", other)),
        }
        let text_param = format!("{at}.text");
        match obj.get("text") {
            Some(Value::String(t)) => texts.push(t.as_str()),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    &text_param,
                    format!("{text_param} is required"),
                ))
            }
            Some(other) => return Err(type_error(&text_param, "a string", other)),
        }
    }
    Ok(texts.join("\n"))
}

fn parse_prompt(v: Option<&Value>) -> Result<String, ApiError> {
    const TOKENS: &str = "token arrays are not supported as prompt; send the prompt as a string";
    match v {
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [] => Err(ApiError::invalid(
                "prompt",
                "prompt must not be an empty array",
            )),
            items if items.iter().all(Value::is_string) => Err(ApiError::invalid(
                "prompt",
                format!(
                    "only one prompt per request is supported, got {}",
                    items.len()
                ),
            )),
            items if items.iter().all(|i| i.is_number() || i.is_array()) => {
                Err(ApiError::invalid("prompt", TOKENS))
            }
            _ => Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or an array of one string",
            )),
        },
        Some(other) => Err(type_error("prompt", "a string", other)),
    }
}

fn parse_stop(v: Option<&Value>, max: usize) -> Result<Vec<String>, ApiError> {
    let list: Vec<(String, &Value)> = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(s @ Value::String(_)) => vec![("stop".to_string(), s)],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("stop[{i}]"), s))
            .collect(),
        Some(other) => return Err(type_error("stop", "a string or an array of strings", other)),
    };
    if list.len() > max {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {max} stop strings are allowed, got {}", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (param, s) in list {
        match s {
            Value::String(s) if s.is_empty() => {
                return Err(ApiError::invalid(param, "stop strings must not be empty"))
            }
            Value::String(s) => out.push(s.clone()),
            other => return Err(type_error(&param, "a string", other)),
        }
    }
    Ok(out)
}

/// Typed access to the fields of a JSON object; every error names the field.
pub(super) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// Prepended to field names in errors (`stream_options.`).
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    /// The fields of `body`, which must be an object.
    pub(super) fn of(body: &'a Value) -> Result<Fields<'a>, ApiError> {
        match body {
            Value::Object(obj) => Ok(Fields { obj, prefix: "" }),
            other => Err(ApiError::InvalidRequest {
                message: format!(
                    "the request body must be a JSON object, not {}",
                    type_name(other)
                ),
                param: None,
            }),
        }
    }

    fn param(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The field's value; `None` when absent or `null`.
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(type_error(&self.param(name), "a boolean", other)),
        }
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(type_error(&self.param(name), "a string", other)),
        }
    }

    /// A number in `lo..=hi` (`lo` excluded unless `lo_inclusive`).
    fn number(
        &self,
        name: &str,
        lo: f64,
        lo_inclusive: bool,
        hi: f64,
    ) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let param = self.param(name);
        let Some(x) = v.as_f64() else {
            return Err(type_error(&param, "a number", v));
        };
        // Checked as the f32 it becomes (1e-50 is 0, 1e300 infinite).
        let x = f64::from(x as f32);
        let above_lo = if lo_inclusive { x >= lo } else { x > lo };
        if !(x.is_finite() && above_lo && x <= hi) {
            let range = if lo_inclusive {
                format!("between {lo} and {hi}")
            } else {
                format!("greater than {lo} and at most {hi}")
            };
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be {range}, got {v}"),
            ));
        }
        Ok(Some(x as f32))
    }

    /// An integer in `min..=max` (integral floats such as `5.0` are accepted).
    pub(super) fn uint(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        uint_value(&self.param(name), v, min, max).map(Some)
    }
}

/// `v` as an integer in `min..=max`; errors name `param`.
pub(super) fn uint_value(param: &str, v: &Value, min: u64, max: u64) -> Result<u64, ApiError> {
    let Value::Number(n) = v else {
        return Err(type_error(param, "an integer", v));
    };
    // `None`: negative.
    let x = if let Some(u) = n.as_u64() {
        Some(u)
    } else if n.is_i64() {
        None
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if !f.is_finite() || f.fract() != 0.0 {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be an integer, got {n}"),
            ));
        }
        // `as` saturates at u64::MAX, which the range check below rejects or accepts.
        (f >= 0.0).then_some(f as u64)
    };
    match x {
        Some(x) if x >= min && x <= max => Ok(x),
        Some(x) if x > max => Err(ApiError::invalid(
            param,
            format!("{param} must be at most {max}, got {n}"),
        )),
        _ => Err(ApiError::invalid(
            param,
            format!("{param} must be at least {min}, got {n}"),
        )),
    }
}

/// "`param` must be `expected`, not a string".
pub(super) fn type_error(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        param,
        format!("{param} must be {expected}, not {}", type_name(got)),
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most `max` characters of `s` (client text echoed in messages).
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error as the HTTP front end sends it (see the table in the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: &'static str,
    /// Readable message.
    pub message: String,
    /// The offending request field, when there is one.
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header.
    pub retry_after_secs: Option<u64>,
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

/// 499, nginx's "client closed request": a request cancelled by its client.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

impl ErrorResponse {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        ErrorResponse {
            status,
            kind,
            code,
            message,
            param: None,
            retry_after_secs: None,
        }
    }

    /// The response for `err`.
    pub fn from_api(err: &ApiError) -> ErrorResponse {
        let message = err.to_string();
        match err {
            ApiError::InvalidRequest { param, .. } => ErrorResponse {
                param: param.clone(),
                ..ErrorResponse::new(
                    StatusCode::BAD_REQUEST,
                    INVALID,
                    if param.is_some() {
                        "invalid_value"
                    } else {
                        "invalid_request"
                    },
                    message,
                )
            },
            ApiError::ContextTooLong { .. } => ErrorResponse::new(
                StatusCode::BAD_REQUEST,
                INVALID,
                "context_length_exceeded",
                message,
            ),
            ApiError::Rejected { .. } => {
                ErrorResponse::new(StatusCode::BAD_REQUEST, INVALID, "content_filter", message)
            }
            ApiError::AccessDenied(_) => ErrorResponse::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "access_denied",
                message,
            ),
            ApiError::NotFound(_) => {
                ErrorResponse::new(StatusCode::NOT_FOUND, INVALID, "not_found", message)
            }
            ApiError::Busy {
                retry_after_secs, ..
            } => ErrorResponse {
                retry_after_secs: Some(*retry_after_secs),
                ..ErrorResponse::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    SERVER,
                    "overloaded",
                    message,
                )
            },
            ApiError::NotReady => ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                "model_not_ready",
                message,
            ),
            ApiError::ShuttingDown => ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                "shutting_down",
                message,
            ),
            ApiError::Cancelled => ErrorResponse::new(CLIENT_CLOSED, INVALID, "cancelled", message),
            ApiError::PluginFault { .. } => ErrorResponse::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER,
                "plugin_error",
                message,
            ),
            ApiError::Internal(_) => ErrorResponse::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER,
                "internal_error",
                message,
            ),
        }
    }

    /// 404 for a path no route serves.
    pub fn unknown_route(method: &str, path: &str) -> ErrorResponse {
        ErrorResponse::new(
            StatusCode::NOT_FOUND,
            INVALID,
            "unknown_url",
            format!("unknown request URL: {method} {}", truncate(path, 200)),
        )
    }

    /// 405 for a route called with a method it does not serve.
    pub fn method_not_allowed(method: &str, path: &str) -> ErrorResponse {
        ErrorResponse::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID,
            "method_not_allowed",
            format!("method {method} is not allowed for {}", truncate(path, 200)),
        )
    }

    /// 413 for a body over `limit` bytes.
    pub fn body_too_large(limit: usize) -> ErrorResponse {
        ErrorResponse::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID,
            "request_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// The `{"error": {...}}` body.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<&ApiError> for ErrorResponse {
    fn from(err: &ApiError) -> Self {
        ErrorResponse::from_api(err)
    }
}

impl From<ApiError> for ErrorResponse {
    fn from(err: ApiError) -> Self {
        ErrorResponse::from_api(&err)
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// A finished request, gathered from its events (non-streamed responses).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The whole output.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// A plugin's reason for refusing the output.
    pub refusal: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Every generated token's log-probabilities (empty unless asked for).
    pub logprobs: Vec<TokenLogprob>,
}

/// Gathers a request's events into a [`Completion`].
#[derive(Debug, Default)]
pub struct Collector {
    logprobs: Vec<TokenLogprob>,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Collector {
        Collector::default()
    }

    /// Takes the next event; the result once the request is over (`Done` or `Error`).
    pub fn push(&mut self, event: Event) -> Option<Result<Completion, ApiError>> {
        match event {
            Event::Started { .. } => None,
            Event::Delta { logprobs, .. } => {
                self.logprobs.extend(logprobs);
                None
            }
            Event::Done {
                finish,
                text,
                refusal,
                usage,
            } => Some(Ok(Completion {
                text,
                finish,
                refusal,
                usage,
                logprobs: std::mem::take(&mut self.logprobs),
            })),
            Event::Error(e) => Some(Err(e)),
        }
    }
}

/// What every response object of one request shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseMeta {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The service's request id.
    pub request_id: u64,
    /// Unix time the request was accepted.
    pub created: u64,
    /// The served model's id.
    pub model: String,
}

/// The non-streamed response body: a `chat.completion` or `text_completion` object.
/// `logprobs` says whether the client asked for them (else the field is `null`).
pub fn completion_json(meta: &ResponseMeta, c: &Completion, logprobs: bool) -> Value {
    let id = meta.endpoint.response_id(meta.request_id);
    let usage = Some(UsageJson::from(c.usage));
    let json = match meta.endpoint {
        Endpoint::ChatCompletions => serde_json::to_value(ChatCompletionJson {
            id: &id,
            object: "chat.completion",
            created: meta.created,
            model: &meta.model,
            choices: [ChatChoiceJson {
                index: 0,
                message: AssistantMessageJson {
                    role: "assistant",
                    content: &c.text,
                    refusal: c.refusal.as_deref(),
                },
                logprobs: logprobs.then(|| chat_logprobs(&c.logprobs)),
                finish_reason: c.finish.as_str(),
            }],
            usage,
        }),
        Endpoint::Completions => serde_json::to_value(TextCompletionJson {
            id: &id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: vec![TextChoiceJson {
                text: &c.text,
                index: 0,
                logprobs: logprobs.then(|| legacy_logprobs(&c.logprobs, &mut 0)),
                finish_reason: Some(c.finish.as_str()),
            }],
            usage: Some(usage),
        }),
    };
    json.unwrap_or_else(|e| internal_error_json(&e))
}

fn internal_error_json(e: &serde_json::Error) -> Value {
    ErrorResponse::from_api(&ApiError::Internal(format!("encoding the response: {e}"))).to_json()
}

#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: PromptTokensDetailsJson,
}

#[derive(Serialize)]
struct PromptTokensDetailsJson {
    cached_tokens: usize,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> Self {
        UsageJson {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetailsJson {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

#[derive(Serialize)]
struct ChatCompletionJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoiceJson<'a>; 1],
    usage: Option<UsageJson>,
}

#[derive(Serialize)]
struct ChatChoiceJson<'a> {
    index: u32,
    message: AssistantMessageJson<'a>,
    logprobs: Option<ChatLogprobsJson<'a>>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessageJson<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatLogprobsJson<'a> {
    content: Vec<ChatTokenLogprobJson<'a>>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ChatTokenLogprobJson<'a> {
    token: &'a str,
    logprob: f32,
    bytes: &'a [u8],
    top_logprobs: Vec<TopLogprobJson<'a>>,
}

#[derive(Serialize)]
struct TopLogprobJson<'a> {
    token: &'a str,
    logprob: f32,
    bytes: &'a [u8],
}

/// OpenAI reports impossible tokens as -9999 rather than -inf (which JSON cannot carry).
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobsJson<'_> {
    ChatLogprobsJson {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprobJson {
                token: &t.token,
                logprob: finite(t.logprob),
                bytes: &t.bytes,
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(token, bytes, logprob)| TopLogprobJson {
                        token,
                        logprob: finite(*logprob),
                        bytes,
                    })
                    .collect(),
            })
            .collect(),
        refusal: None,
    }
}

#[derive(Serialize)]
struct TextCompletionJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<TextChoiceJson<'a>>,
    /// Absent: not asked for; `Some(None)`: `null` (a chunk before the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageJson>>,
}

#[derive(Serialize)]
struct TextChoiceJson<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<LegacyLogprobsJson<'a>>,
    finish_reason: Option<&'static str>,
}

/// The legacy completions `logprobs` object.
#[derive(Serialize)]
struct LegacyLogprobsJson<'a> {
    tokens: Vec<&'a str>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Map<String, Value>>,
    text_offset: Vec<usize>,
}

/// `offset`: characters of output before these tokens (advanced past them).
fn legacy_logprobs<'a>(tokens: &'a [TokenLogprob], offset: &mut usize) -> LegacyLogprobsJson<'a> {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(*offset);
        *offset += t.token.chars().count();
    }
    LegacyLogprobsJson {
        tokens: tokens.iter().map(|t| t.token.as_str()).collect(),
        token_logprobs: tokens.iter().map(|t| finite(t.logprob)).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| {
                t.top
                    .iter()
                    .map(|(token, _, lp)| (token.clone(), Value::from(finite(*lp))))
                    .collect()
            })
            .collect(),
        text_offset,
    }
}

#[derive(Serialize)]
struct ChatChunkJson<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChunkChoiceJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageJson>>,
}

#[derive(Serialize)]
struct ChatChunkChoiceJson<'a> {
    index: u32,
    delta: DeltaJson<'a>,
    logprobs: Option<ChatLogprobsJson<'a>>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// The last event of every stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// One server-sent event carrying `data` (which must not contain a newline; JSON from
/// `serde_json::to_string` never does).
pub fn sse_event(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// Turns a request's events into server-sent events: `chat.completion.chunk` or
/// `text_completion` chunks, then `data: [DONE]`.
///
/// Chat streams begin with a chunk whose delta is `{"role": "assistant", "content": ""}`, send
/// each text as `{"content": …}`, and end with an empty delta (or `{"refusal": …}`) carrying
/// `finish_reason`. With `include_usage`, every chunk has `"usage": null` and a last chunk with
/// `"choices": []` carries the token counts.
#[derive(Debug)]
pub struct StreamEncoder {
    meta: ResponseMeta,
    id: String,
    include_usage: bool,
    logprobs: bool,
    /// Characters sent so far (legacy `text_offset`).
    text_offset: usize,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one request; `logprobs` says whether the client asked for them.
    pub fn new(meta: ResponseMeta, include_usage: bool, logprobs: bool) -> StreamEncoder {
        StreamEncoder {
            id: meta.endpoint.response_id(meta.request_id),
            meta,
            include_usage,
            logprobs,
            text_offset: 0,
            finished: false,
        }
    }

    /// The events to send as soon as the request is accepted.
    pub fn start(&mut self) -> Vec<String> {
        match self.meta.endpoint {
            Endpoint::ChatCompletions => vec![self.chat_chunk(
                DeltaJson {
                    role: Some("assistant"),
                    content: Some(""),
                    refusal: None,
                },
                None,
                None,
            )],
            Endpoint::Completions => Vec::new(),
        }
    }

    /// Whether the stream has ended (`[DONE]` was produced).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The events for `event` (none for `Started`; after `Done` or `Error`, the last ones
    /// including `[DONE]`).
    pub fn event(&mut self, event: Event) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        match event {
            Event::Started { .. } => Vec::new(),
            Event::Delta { text, logprobs } => {
                if text.is_empty() && logprobs.is_empty() {
                    return Vec::new();
                }
                let lp = self.logprobs.then_some(logprobs.as_slice());
                vec![match self.meta.endpoint {
                    Endpoint::ChatCompletions => self.chat_chunk(
                        DeltaJson {
                            content: Some(&text),
                            ..DeltaJson::default()
                        },
                        lp,
                        None,
                    ),
                    Endpoint::Completions => self.text_chunk(&text, lp, None),
                }]
            }
            Event::Done {
                finish,
                refusal,
                usage,
                ..
            } => {
                let mut out = vec![match self.meta.endpoint {
                    Endpoint::ChatCompletions => self.chat_chunk(
                        DeltaJson {
                            refusal: refusal.as_deref(),
                            ..DeltaJson::default()
                        },
                        None,
                        Some(finish),
                    ),
                    Endpoint::Completions => self.text_chunk("", None, Some(finish)),
                }];
                if self.include_usage {
                    out.push(self.usage_chunk(usage));
                }
                out.push(SSE_DONE.to_string());
                self.finished = true;
                out
            }
            Event::Error(e) => self.error(&e),
        }
    }

    /// The last events when the request's events ended without `Done` or `Error` (none when
    /// the stream already finished).
    pub fn end(&mut self) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.error(&ApiError::Internal(
            "the request ended without a result".into(),
        ))
    }

    fn error(&mut self, e: &ApiError) -> Vec<String> {
        self.finished = true;
        vec![
            sse_event(&ErrorResponse::from_api(e).to_json().to_string()),
            SSE_DONE.to_string(),
        ]
    }

    fn usage_field(&self) -> Option<Option<UsageJson>> {
        self.include_usage.then_some(None)
    }

    fn encode(&self, json: Result<String, serde_json::Error>) -> String {
        sse_event(&json.unwrap_or_else(|e| internal_error_json(&e).to_string()))
    }

    fn chat_chunk(
        &self,
        delta: DeltaJson<'_>,
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<Finish>,
    ) -> String {
        self.encode(serde_json::to_string(&ChatChunkJson {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices: vec![ChatChunkChoiceJson {
                index: 0,
                delta,
                logprobs: logprobs.map(chat_logprobs),
                finish_reason: finish.map(Finish::as_str),
            }],
            usage: self.usage_field(),
        }))
    }

    fn text_chunk(
        &mut self,
        text: &str,
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<Finish>,
    ) -> String {
        let mut offset = self.text_offset;
        let lp = logprobs.map(|l| legacy_logprobs(l, &mut offset));
        let chunk = serde_json::to_string(&TextCompletionJson {
            id: &self.id,
            object: "text_completion",
            created: self.meta.created,
            model: &self.meta.model,
            choices: vec![TextChoiceJson {
                text,
                index: 0,
                logprobs: lp,
                finish_reason: finish.map(Finish::as_str),
            }],
            usage: self.usage_field(),
        });
        self.text_offset += text.chars().count();
        self.encode(chunk)
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        let usage = Some(Some(UsageJson::from(usage)));
        self.encode(match self.meta.endpoint {
            Endpoint::ChatCompletions => serde_json::to_string(&ChatChunkJson {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.meta.created,
                model: &self.meta.model,
                choices: Vec::new(),
                usage,
            }),
            Endpoint::Completions => serde_json::to_string(&TextCompletionJson {
                id: &self.id,
                object: "text_completion",
                created: self.meta.created,
                model: &self.meta.model,
                choices: Vec::new(),
                usage,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServiceLimits {
        ServiceLimits {
            max_tokens_limit: 1000,
            max_stop_strings: 2,
            ..ServiceLimits::default()
        }
    }

    fn parse(endpoint: Endpoint, body: &str) -> Result<ParsedRequest, ApiError> {
        let v = parse_json(body.as_bytes())?;
        parse_request(endpoint, &v, &limits(), Peer::unix(7, None))
    }

    fn chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::ChatCompletions, body)
    }

    fn completion(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::Completions, body)
    }

    fn param_of(r: Result<ParsedRequest, ApiError>) -> Option<String> {
        match r {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn minimal_chat_gets_openai_defaults() {
        let p = chat(r#"{"messages":[{"role":"user","content":"Hi"}]}"#).unwrap();
        let r = &p.request;
        assert_eq!(p.endpoint, Endpoint::ChatCompletions);
        assert_eq!(
            r.input,
            PromptInput::Chat(vec![ChatMessage::new("user", "Hi")])
        );
        assert_eq!(r.max_tokens, None);
        assert!(r.stop.is_empty());
        assert_eq!(r.logprobs, None);
        assert!(!r.stream);
        assert!(!p.include_usage);
        assert_eq!(p.model, None);
        assert_eq!(r.peer, Peer::unix(7, None));
        let s = &r.sampler;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty),
            (1.0, 1.0, 0, 0.0, 1.0)
        );
        assert_eq!(
            (s.presence_penalty, s.frequency_penalty, s.seed),
            (0.0, 0.0, None)
        );
    }

    #[test]
    fn full_chat_request() {
        let p = chat(
            r#"{
                "model": "gpt-4o", "user": "u1", "response_format": {"type": "text"},
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "developer", "content": [{"type": "text", "text": "Really."}]},
                    {"role": "user", "content": "Hi", "name": "bob"},
                    {"role": "assistant", "content": null},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
                ],
                "max_tokens": 50, "max_completion_tokens": 20, "temperature": 0, "top_p": 0.5,
                "seed": 18446744073709551615, "stop": ["\n", "END"], "presence_penalty": -2,
                "frequency_penalty": 1.5, "n": 1, "logprobs": true, "top_logprobs": 3,
                "stream": true, "stream_options": {"include_usage": true},
                "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "max_tokens_per_minute": null
            }"#,
        )
        .unwrap();
        let r = &p.request;
        assert_eq!(
            r.input,
            PromptInput::Chat(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("system", "Really."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", ""),
                ChatMessage::new("user", "a\nb"),
            ])
        );
        assert_eq!(p.model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.max_tokens, Some(20));
        assert_eq!(r.stop, vec!["\n".to_string(), "END".to_string()]);
        assert_eq!(r.logprobs, Some(3));
        assert!(r.stream && p.include_usage);
        let s = &r.sampler;
        assert_eq!(s.temperature, 0.0);
        assert_eq!(s.top_p, 0.5);
        assert_eq!(s.seed, Some(u64::MAX));
        assert_eq!(s.presence_penalty, -2.0);
        assert_eq!(s.frequency_penalty, 1.5);
        assert_eq!((s.top_k, s.min_p, s.repeat_penalty), (40, 0.05, 1.1));
    }

    #[test]
    fn nulls_are_absent() {
        let p = chat(
            r#"{"messages":[{"role":"user","content":"Hi"}],"temperature":null,"stop":null,
                "max_tokens":null,"logprobs":null,"stream":null,"stream_options":null,"seed":null}"#,
        )
        .unwrap();
        assert_eq!(p.request.sampler.temperature, 1.0);
        assert!(p.request.stop.is_empty());
    }

    #[test]
    fn completion_requests() {
        let p = completion(
            r#"{"prompt":"Once","max_tokens":5,"stop":"\n","logprobs":2,"echo":false,"best_of":1}"#,
        )
        .unwrap();
        assert_eq!(p.request.input, PromptInput::Text("Once".into()));
        assert_eq!(p.request.max_tokens, Some(5));
        assert_eq!(p.request.stop, vec!["\n".to_string()]);
        assert_eq!(p.request.logprobs, Some(2));
        let p = completion(r#"{"prompt":["One"],"logprobs":0,"max_tokens":7.0}"#).unwrap();
        assert_eq!(p.request.input, PromptInput::Text("One".into()));
        assert_eq!(p.request.logprobs, Some(0));
        assert_eq!(p.request.max_tokens, Some(7));
        let p = completion(r#"{"prompt":""}"#).unwrap();
        assert_eq!(p.request.input, PromptInput::Text(String::new()));
        assert_eq!(p.request.logprobs, None);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        let user = r#""messages":[{"role":"user","content":"Hi"}]"#;
        let cases: Vec<(String, &str)> = vec![
            (r#"{}"#.into(), "messages"),
            (r#"{"messages":[]}"#.into(), "messages"),
            (r#"{"messages":"Hi"}"#.into(), "messages"),
            (r#"{"messages":["Hi"]}"#.into(), "messages[0]"),
            (r#"{"messages":[{"content":"Hi"}]}"#.into(), "messages[0].role"),
            (r#"{"messages":[{"role":"user","content":"a"},{"role":"robot","content":"Hi"}]}"#.into(), "messages[1].role"),
            (r#"{"messages":[{"role":"tool","content":"Hi"}]}"#.into(), "messages[0].role"),
            (r#"{"messages":[{"role":3,"content":"Hi"}]}"#.into(), "messages[0].role"),
            (r#"{"messages":[{"role":"user"}]}"#.into(), "messages[0].content"),
            (r#"{"messages":[{"role":"user","content":""}]}"#.into(), "messages[0].content"),
            (r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":""},{"role":"assistant","content":"b"}]}"#.into(), "messages[1].content"),
            (r#"{"messages":[{"role":"user","content":42}]}"#.into(), "messages[0].content"),
            (r#"{"messages":[{"role":"user","content":{"text":"x"}}]}"#.into(), "messages[0].content"),
            (r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#.into(), "messages[0].content[0].type"),
            (r#"{"messages":[{"role":"user","content":[{"type":"text","text":5}]}]}"#.into(), "messages[0].content[0].text"),
            (r#"{"messages":[{"role":"user","content":["x"]}]}"#.into(), "messages[0].content[0]"),
            (r#"{"messages":[{"role":"system","content":"x"}]}"#.into(), "messages"),
            (format!(r#"{{{user},"model":5}}"#), "model"),
            (format!(r#"{{{user},"max_tokens":0}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_tokens":-5}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_tokens":1001}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_tokens":1e30}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_tokens":2.5}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_tokens":"10"}}"#), "max_tokens"),
            (format!(r#"{{{user},"max_completion_tokens":99999999999999999999}}"#), "max_completion_tokens"),
            (format!(r#"{{{user},"temperature":2.5}}"#), "temperature"),
            (format!(r#"{{{user},"temperature":-0.1}}"#), "temperature"),
            (format!(r#"{{{user},"temperature":"hot"}}"#), "temperature"),
            (format!(r#"{{{user},"top_p":0}}"#), "top_p"),
            (format!(r#"{{{user},"top_p":1e-50}}"#), "top_p"),
            (format!(r#"{{{user},"temperature":1e300}}"#), "temperature"),
            (format!(r#"{{{user},"top_p":1.01}}"#), "top_p"),
            (format!(r#"{{{user},"seed":-1}}"#), "seed"),
            (format!(r#"{{{user},"seed":"abc"}}"#), "seed"),
            (format!(r#"{{{user},"stop":5}}"#), "stop"),
            (format!(r#"{{{user},"stop":""}}"#), "stop"),
            (format!(r#"{{{user},"stop":["a",""]}}"#), "stop[1]"),
            (format!(r#"{{{user},"stop":["a",3]}}"#), "stop[1]"),
            (format!(r#"{{{user},"stop":["a","b","c"]}}"#), "stop"),
            (format!(r#"{{{user},"presence_penalty":2.1}}"#), "presence_penalty"),
            (format!(r#"{{{user},"frequency_penalty":-3}}"#), "frequency_penalty"),
            (format!(r#"{{{user},"n":2}}"#), "n"),
            (format!(r#"{{{user},"n":0}}"#), "n"),
            (format!(r#"{{{user},"logprobs":1}}"#), "logprobs"),
            (format!(r#"{{{user},"logprobs":true,"top_logprobs":21}}"#), "top_logprobs"),
            (format!(r#"{{{user},"top_logprobs":2}}"#), "top_logprobs"),
            (format!(r#"{{{user},"stream":"yes"}}"#), "stream"),
            (format!(r#"{{{user},"stream_options":true}}"#), "stream_options"),
            (format!(r#"{{{user},"stream_options":{{"include_usage":1}}}}"#), "stream_options.include_usage"),
            (format!(r#"{{{user},"top_k":-1}}"#), "top_k"),
            (format!(r#"{{{user},"min_p":1.5}}"#), "min_p"),
            (format!(r#"{{{user},"repeat_penalty":0}}"#), "repeat_penalty"),
            (format!(r#"{{{user},"repeat_penalty":11}}"#), "repeat_penalty"),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(chat(&body)).as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn bad_completion_requests_name_the_field() {
        for (body, param) in [
            (r#"{}"#, "prompt"),
            (r#"{"prompt":null}"#, "prompt"),
            (r#"{"prompt":5}"#, "prompt"),
            (r#"{"prompt":["a","b"]}"#, "prompt"),
            (r#"{"prompt":[]}"#, "prompt"),
            (r#"{"prompt":[1,2,3]}"#, "prompt"),
            (r#"{"prompt":[[1,2],[3]]}"#, "prompt"),
            (r#"{"prompt":[{"a":1}]}"#, "prompt"),
            (r#"{"prompt":"x","logprobs":6}"#, "logprobs"),
            (r#"{"prompt":"x","logprobs":true}"#, "logprobs"),
            (r#"{"prompt":"x","logprobs":-1}"#, "logprobs"),
            (r#"{"prompt":"x","echo":true}"#, "echo"),
            (r#"{"prompt":"x","best_of":3}"#, "best_of"),
            (r#"{"prompt":"x","suffix":"end"}"#, "suffix"),
            (r#"{"prompt":"x","max_tokens":-1}"#, "max_tokens"),
            (r#"{"prompt":"x","max_tokens":1000000}"#, "max_tokens"),
            (r#"{"prompt":"x","temperature":3}"#, "temperature"),
            (r#"{"prompt":"x","top_p":-1}"#, "top_p"),
            (r#"{"prompt":"x","stop":[null]}"#, "stop[0]"),
            (r#"{"prompt":"x","n":5}"#, "n"),
        ] {
            assert_eq!(param_of(completion(body)).as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn malformed_bodies_are_invalid_without_a_field() {
        for body in [
            &b""[..],
            b"   ",
            b"{",
            b"{\"prompt\": \"x\"} trailing",
            b"{\"prompt\": \"\xc3\x28\"}",
            b"[\"prompt\"]",
            b"\"prompt\"",
            b"null",
        ] {
            let r = parse_json(body)
                .and_then(|v| parse_request(Endpoint::Completions, &v, &limits(), Peer::default()));
            assert_eq!(param_of(r), None, "{}", String::from_utf8_lossy(body));
        }
        let deep = "[".repeat(100_000);
        assert!(parse_json(deep.as_bytes()).is_err());
    }

    #[test]
    fn error_mapping() {
        let cases = [
            (
                ApiError::invalid("n", "x"),
                400,
                "invalid_request_error",
                "invalid_value",
                Some("n"),
            ),
            (
                ApiError::InvalidRequest {
                    message: "bad".into(),
                    param: None,
                },
                400,
                "invalid_request_error",
                "invalid_request",
                None,
            ),
            (
                ApiError::ContextTooLong {
                    prompt_tokens: 9,
                    limit: 8,
                },
                400,
                "invalid_request_error",
                "context_length_exceeded",
                None,
            ),
            (
                ApiError::Rejected {
                    plugin: "m".into(),
                    reason: "r".into(),
                },
                400,
                "invalid_request_error",
                "content_filter",
                None,
            ),
            (
                ApiError::AccessDenied("no".into()),
                403,
                "permission_error",
                "access_denied",
                None,
            ),
            (
                ApiError::NotFound("x".into()),
                404,
                "invalid_request_error",
                "not_found",
                None,
            ),
            (
                ApiError::Cancelled,
                499,
                "invalid_request_error",
                "cancelled",
                None,
            ),
            (
                ApiError::PluginFault {
                    plugin: "p".into(),
                    message: "m".into(),
                },
                500,
                "server_error",
                "plugin_error",
                None,
            ),
            (
                ApiError::Internal("x".into()),
                500,
                "server_error",
                "internal_error",
                None,
            ),
            (
                ApiError::Busy {
                    queued: 4,
                    retry_after_secs: 3,
                },
                503,
                "server_error",
                "overloaded",
                None,
            ),
            (
                ApiError::NotReady,
                503,
                "server_error",
                "model_not_ready",
                None,
            ),
            (
                ApiError::ShuttingDown,
                503,
                "server_error",
                "shutting_down",
                None,
            ),
        ];
        for (err, status, kind, code, param) in cases {
            let r = ErrorResponse::from_api(&err);
            assert_eq!(r.status.as_u16(), status, "{err:?}");
            let v = r.to_json();
            assert_eq!(v["error"]["type"], kind, "{err:?}");
            assert_eq!(v["error"]["code"], code, "{err:?}");
            assert_eq!(v["error"]["param"].as_str(), param, "{err:?}");
            assert_eq!(v["error"]["message"], err.to_string());
            assert_eq!(
                r.retry_after_secs.is_some(),
                matches!(err, ApiError::Busy { .. })
            );
        }
        assert_eq!(
            ErrorResponse::from_api(&ApiError::Busy {
                queued: 1,
                retry_after_secs: 3
            })
            .retry_after_secs,
            Some(3)
        );
        assert_eq!(
            ErrorResponse::unknown_route("GET", "/x").status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ErrorResponse::method_not_allowed("GET", "/x").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            ErrorResponse::body_too_large(10).status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ErrorResponse::body_too_large(10).to_json()["error"]["code"],
            "request_too_large"
        );
    }

    fn meta(endpoint: Endpoint) -> ResponseMeta {
        ResponseMeta {
            endpoint,
            request_id: 42,
            created: 1234,
            model: "mistral-7b".into(),
        }
    }

    fn lp(token: &str, logprob: f32) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
            top: vec![
                (token.into(), token.as_bytes().to_vec(), logprob),
                ("z".into(), b"z".to_vec(), f32::NEG_INFINITY),
            ],
        }
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 2,
        }
    }

    fn done(refusal: Option<&str>) -> Event {
        Event::Done {
            finish: if refusal.is_some() {
                Finish::ContentFilter
            } else {
                Finish::Stop
            },
            text: "Hi!".into(),
            refusal: refusal.map(str::to_owned),
            usage: usage(),
        }
    }

    fn collect(events: Vec<Event>) -> Result<Completion, ApiError> {
        let mut c = Collector::new();
        for e in events {
            if let Some(r) = c.push(e) {
                return r;
            }
        }
        panic!("no result")
    }

    #[test]
    fn chat_completion_shape() {
        let c = collect(vec![
            Event::Started {
                prompt_tokens: 10,
                cached_tokens: 4,
            },
            Event::Delta {
                text: "Hi".into(),
                logprobs: vec![lp("Hi", -0.25)],
            },
            Event::Delta {
                text: "!".into(),
                logprobs: vec![lp("!", -1.0)],
            },
            done(None),
        ])
        .unwrap();
        let v = completion_json(&meta(Endpoint::ChatCompletions), &c, true);
        assert_eq!(v["id"], "chatcmpl-42");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 1234);
        assert_eq!(v["model"], "mistral-7b");
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(
            choice["message"],
            serde_json::json!({"role":"assistant","content":"Hi!","refusal":null})
        );
        assert_eq!(choice["finish_reason"], "stop");
        let content = &choice["logprobs"]["content"];
        assert_eq!(content.as_array().unwrap().len(), 2);
        assert_eq!(content[0]["token"], "Hi");
        assert_eq!(content[0]["logprob"], -0.25);
        assert_eq!(content[0]["bytes"], serde_json::json!([72, 105]));
        assert_eq!(content[0]["top_logprobs"][1]["logprob"], -9999.0);
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,
                               "prompt_tokens_details":{"cached_tokens":4}})
        );
        let v = completion_json(&meta(Endpoint::ChatCompletions), &c, false);
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);

        let refused = collect(vec![done(Some("unsafe"))]).unwrap();
        let v = completion_json(&meta(Endpoint::ChatCompletions), &refused, false);
        assert_eq!(v["choices"][0]["message"]["refusal"], "unsafe");
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");

        let err = collect(vec![Event::Error(ApiError::ShuttingDown)]).unwrap_err();
        assert_eq!(err, ApiError::ShuttingDown);
    }

    #[test]
    fn text_completion_shape() {
        let c = collect(vec![
            Event::Delta {
                text: "Hi".into(),
                logprobs: vec![lp("Hi", -0.25)],
            },
            Event::Delta {
                text: "!".into(),
                logprobs: vec![lp("!", -1.0)],
            },
            done(None),
        ])
        .unwrap();
        let v = completion_json(&meta(Endpoint::Completions), &c, true);
        assert_eq!(v["id"], "cmpl-42");
        assert_eq!(v["object"], "text_completion");
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], "Hi!");
        assert_eq!(choice["finish_reason"], "stop");
        let lp = &choice["logprobs"];
        assert_eq!(lp["tokens"], serde_json::json!(["Hi", "!"]));
        assert_eq!(lp["token_logprobs"], serde_json::json!([-0.25, -1.0]));
        assert_eq!(lp["text_offset"], serde_json::json!([0, 2]));
        assert_eq!(lp["top_logprobs"][0]["Hi"], -0.25);
        assert_eq!(lp["top_logprobs"][0]["z"], -9999.0);
        assert_eq!(v["usage"]["total_tokens"], 12);
        let v = completion_json(&meta(Endpoint::Completions), &c, false);
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    }

    /// The JSON payloads of SSE frames, `None` for `[DONE]`.
    fn payloads(frames: &[String]) -> Vec<Option<Value>> {
        frames
            .iter()
            .map(|f| {
                let data = f
                    .strip_prefix("data: ")
                    .and_then(|d| d.strip_suffix("\n\n"))
                    .unwrap_or_else(|| panic!("not an SSE frame: {f:?}"));
                assert!(!data.contains('\n'));
                (data != "[DONE]").then(|| serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    fn run(enc: &mut StreamEncoder, events: Vec<Event>) -> Vec<Option<Value>> {
        let mut frames = enc.start();
        for e in events {
            frames.extend(enc.event(e));
        }
        frames.extend(enc.end());
        payloads(&frames)
    }

    #[test]
    fn chat_chunks() {
        let mut enc = StreamEncoder::new(meta(Endpoint::ChatCompletions), false, false);
        let p = run(
            &mut enc,
            vec![
                Event::Started {
                    prompt_tokens: 10,
                    cached_tokens: 4,
                },
                Event::Delta {
                    text: "Hi".into(),
                    logprobs: vec![],
                },
                Event::Delta {
                    text: String::new(),
                    logprobs: vec![],
                },
                Event::Delta {
                    text: "!".into(),
                    logprobs: vec![],
                },
                done(None),
                Event::Delta {
                    text: "late".into(),
                    logprobs: vec![],
                },
            ],
        );
        assert_eq!(p.len(), 5);
        let first = p[0].as_ref().unwrap();
        assert_eq!(first["id"], "chatcmpl-42");
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["model"], "mistral-7b");
        assert_eq!(first["created"], 1234);
        assert_eq!(
            first["choices"][0]["delta"],
            serde_json::json!({"role":"assistant","content":""})
        );
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        assert!(first.get("usage").is_none());
        assert_eq!(
            p[1].as_ref().unwrap()["choices"][0]["delta"],
            serde_json::json!({"content":"Hi"})
        );
        assert_eq!(
            p[1].as_ref().unwrap()["choices"][0]["logprobs"],
            Value::Null
        );
        assert_eq!(
            p[2].as_ref().unwrap()["choices"][0]["delta"],
            serde_json::json!({"content":"!"})
        );
        let last = p[3].as_ref().unwrap();
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(p[4].is_none());
        assert!(enc.is_finished());
    }

    #[test]
    fn chat_chunks_with_usage_logprobs_and_refusal() {
        let mut enc = StreamEncoder::new(meta(Endpoint::ChatCompletions), true, true);
        let p = run(
            &mut enc,
            vec![
                Event::Delta {
                    text: "Hi".into(),
                    logprobs: vec![lp("Hi", -0.5)],
                },
                done(Some("nope")),
            ],
        );
        assert_eq!(p.len(), 5);
        for chunk in &p[..3] {
            assert_eq!(chunk.as_ref().unwrap()["usage"], Value::Null);
        }
        let delta = p[1].as_ref().unwrap();
        assert_eq!(delta["choices"][0]["logprobs"]["content"][0]["token"], "Hi");
        let last = p[2].as_ref().unwrap();
        assert_eq!(
            last["choices"][0]["delta"],
            serde_json::json!({"refusal":"nope"})
        );
        assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
        let usage = p[3].as_ref().unwrap();
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 12);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
        assert!(p[4].is_none());
    }

    #[test]
    fn text_chunks() {
        let mut enc = StreamEncoder::new(meta(Endpoint::Completions), true, true);
        let p = run(
            &mut enc,
            vec![
                Event::Delta {
                    text: "Hé".into(),
                    logprobs: vec![lp("Hé", -0.5)],
                },
                Event::Delta {
                    text: "y".into(),
                    logprobs: vec![lp("y", -0.1)],
                },
                done(None),
            ],
        );
        assert_eq!(p.len(), 5);
        let first = p[0].as_ref().unwrap();
        assert_eq!(first["object"], "text_completion");
        assert_eq!(first["id"], "cmpl-42");
        assert_eq!(first["choices"][0]["text"], "Hé");
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(
            first["choices"][0]["logprobs"]["text_offset"],
            serde_json::json!([0])
        );
        assert_eq!(
            p[1].as_ref().unwrap()["choices"][0]["logprobs"]["text_offset"],
            serde_json::json!([2])
        );
        let last = p[2].as_ref().unwrap();
        assert_eq!(last["choices"][0]["text"], "");
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(p[3].as_ref().unwrap()["choices"], serde_json::json!([]));
        assert_eq!(p[3].as_ref().unwrap()["usage"]["completion_tokens"], 2);
        assert!(p[4].is_none());
    }

    #[test]
    fn errors_end_streams() {
        let mut enc = StreamEncoder::new(meta(Endpoint::ChatCompletions), true, false);
        let p = run(
            &mut enc,
            vec![
                Event::Delta {
                    text: "a".into(),
                    logprobs: vec![],
                },
                Event::Error(ApiError::Internal("engine".into())),
                done(None),
            ],
        );
        assert_eq!(p.len(), 4);
        let err = p[2].as_ref().unwrap();
        assert_eq!(err["error"]["type"], "server_error");
        assert_eq!(err["error"]["code"], "internal_error");
        assert!(p[3].is_none());

        // Events that end without Done or Error.
        let mut enc = StreamEncoder::new(meta(Endpoint::Completions), false, false);
        let p = run(
            &mut enc,
            vec![Event::Delta {
                text: "a".into(),
                logprobs: vec![],
            }],
        );
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].as_ref().unwrap()["error"]["code"], "internal_error");
        assert!(p[2].is_none());
        assert!(enc.end().is_empty());
    }
}
