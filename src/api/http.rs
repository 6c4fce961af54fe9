//! The HTTP front end: an axum [`Router`] over the [`Service`] and the accept loops that serve
//! it on the Unix socket ([`serve_unix`]) or TCP ([`serve_tcp`]).
//!
//! | route | what it does |
//! | --- | --- |
//! | `POST /v1/chat/completions` | OpenAI chat completions (JSON, or SSE with `"stream": true`) |
//! | `POST /v1/completions` | OpenAI legacy text completions (JSON or SSE) |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the one served model |
//! | `GET /v1/status` | [`Status`](super::Status) as JSON |
//! | `GET /health` | 200 `{"status":"ok"}` when ready, else 503 `{"status":"loading"}` |
//! | `GET /metrics` | Prometheus text |
//! | `POST /tokenize` | `{"content": TEXT, "add_special": BOOL?}` → `{"tokens": [..]}` |
//! | `POST /detokenize` | `{"tokens": [..]}` → `{"content": TEXT}` |
//!
//! Errors (unknown route 404, wrong method 405, body over the limit 413, malformed JSON 400, and
//! every [`ApiError`]) are OpenAI-shaped JSON; see [`openai`](super::openai) for the table.
//! Bodies are read whatever their `Content-Type` (`curl -d` sends a form type). Each connection's
//! [`Peer`] is a request extension. A streamed response owns the request's event stream, so a
//! client that disconnects drops it, which cancels the request.

use super::openai::{
    self, Collector, Endpoint, ErrorResponse, Fields, ResponseMeta, StreamEncoder,
};
use super::{ApiError, ApiRequest, Event, Peer, RequestStream, Service, ServiceLimits, Status};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{BoxStream, StreamExt};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The router serving every route above from `service`.
pub fn router(service: Service) -> Router {
    build_router(service)
}

/// Serves `service` on a Unix socket until `shutdown` completes: then stops accepting, lets
/// requests in flight finish, closes idle keep-alive connections, and returns once every
/// connection is closed. Each request carries the client's [`Peer::unix`] credentials.
pub async fn serve_unix(
    listener: UnixListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve(listener, router(service), shutdown).await
}

/// [`serve_unix`] on TCP; the peer is labelled `tcp:ADDR`.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve(listener, router(service), shutdown).await
}

// ---------------------------------------------------------------------------------------------
// What the routes need of the service
// ---------------------------------------------------------------------------------------------

/// The part of [`Service`] the routes use (a trait so the routes can be tested without a model).
trait Backend: Clone + Send + Sync + 'static {
    fn submit(&self, req: ApiRequest) -> impl Future<Output = Result<Submission, ApiError>> + Send;
    fn status(&self) -> Status;
    fn is_ready(&self) -> bool;
    fn model_id(&self) -> String;
    fn created_unix(&self) -> u64;
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ApiError>;
    fn detokenize(&self, ids: &[u32]) -> Result<String, ApiError>;
    fn metrics_text(&self) -> String;
    fn limits(&self) -> ServiceLimits;
}

/// An accepted request: its id and events. Dropping `events` cancels it.
struct Submission {
    id: u64,
    events: BoxStream<'static, Event>,
}

/// The events of `stream` as a `Stream`, owning it (dropped with the stream).
fn request_events(stream: RequestStream) -> BoxStream<'static, Event> {
    futures_util::stream::unfold(stream, |mut s| async move {
        s.next_event().await.map(|event| (event, s))
    })
    .boxed()
}

impl Backend for Service {
    fn submit(&self, req: ApiRequest) -> impl Future<Output = Result<Submission, ApiError>> + Send {
        let service = self.clone();
        async move {
            let stream = Service::submit(&service, req).await?;
            Ok(Submission {
                id: stream.id(),
                events: request_events(stream),
            })
        }
    }
    fn status(&self) -> Status {
        Service::status(self)
    }
    fn is_ready(&self) -> bool {
        Service::is_ready(self)
    }
    fn model_id(&self) -> String {
        Service::model_id(self)
    }
    fn created_unix(&self) -> u64 {
        Service::created_unix(self)
    }
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ApiError> {
        Service::tokenize(self, text, add_bos)
    }
    fn detokenize(&self, ids: &[u32]) -> Result<String, ApiError> {
        Service::detokenize(self, ids)
    }
    fn metrics_text(&self) -> String {
        Service::metrics(self).render()
    }
    fn limits(&self) -> ServiceLimits {
        Service::limits(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

fn build_router<B: Backend>(backend: B) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/models", get(models::<B>))
        .route("/v1/models/{id}", get(model::<B>))
        .route("/v1/status", get(status::<B>))
        .route("/health", get(health::<B>))
        .route("/metrics", get(metrics::<B>))
        .route("/tokenize", post(tokenize::<B>))
        .route("/detokenize", post(detokenize::<B>))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(backend)
        .layer(middleware::from_fn(log_request))
}

/// Logs each request at debug level: method, path, status, peer.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.label.clone())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "-".into());
    let response = next.run(req).await;
    log::debug!("{method} {path} {} peer {peer}", response.status().as_u16());
    response
}

fn error_response(e: &ErrorResponse) -> Response {
    let mut response = (e.status, Json(e.to_json())).into_response();
    if let Some(secs) = e.retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn api_error(e: &ApiError) -> Response {
    error_response(&ErrorResponse::from_api(e))
}

fn with_request_id(mut response: Response, id: u64) -> Response {
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    response
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    error_response(&ErrorResponse::unknown_route(method.as_str(), uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(&ErrorResponse::method_not_allowed(
        method.as_str(),
        uri.path(),
    ))
}

/// The whole body, at most `limit` bytes (413 above, whatever the `Content-Length` says).
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ErrorResponse> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ErrorResponse::body_too_large(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ErrorResponse::body_too_large(limit))
        }
        Err(e) => Err(ErrorResponse::from_api(&ApiError::InvalidRequest {
            message: format!("failed to read the request body: {e}"),
            param: None,
        })),
    }
}

async fn read_json(req: Request, limit: usize) -> Result<Value, ErrorResponse> {
    let body = read_body(req, limit).await?;
    openai::parse_json(&body).map_err(|e| ErrorResponse::from_api(&e))
}

async fn chat_completions<B: Backend>(State(backend): State<B>, req: Request) -> Response {
    generate(Endpoint::ChatCompletions, backend, req).await
}

async fn completions<B: Backend>(State(backend): State<B>, req: Request) -> Response {
    generate(Endpoint::Completions, backend, req).await
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn generate<B: Backend>(endpoint: Endpoint, backend: B, req: Request) -> Response {
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    let limits = backend.limits();
    let body = match read_json(req, limits.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return error_response(&e),
    };
    let parsed = match openai::parse_request(endpoint, &body, &limits, peer) {
        Ok(parsed) => parsed,
        Err(e) => return api_error(&e),
    };
    drop(body);
    let logprobs = parsed.request.logprobs.is_some();
    let stream = parsed.request.stream;
    let created = unix_now();
    let submission = match backend.submit(parsed.request).await {
        Ok(s) => s,
        Err(e) => return api_error(&e),
    };
    let meta = ResponseMeta {
        endpoint,
        request_id: submission.id,
        created,
        model: backend.model_id(),
    };
    if stream {
        let encoder = StreamEncoder::new(meta, parsed.include_usage, logprobs);
        sse_response(encoder, submission)
    } else {
        collect(meta, logprobs, submission).await
    }
}

/// Waits for the end of a request and answers with the whole completion.
async fn collect(meta: ResponseMeta, logprobs: bool, submission: Submission) -> Response {
    let Submission { id, mut events } = submission;
    let mut collector = Collector::new();
    let result = loop {
        match events.next().await {
            Some(event) => {
                if let Some(result) = collector.push(event) {
                    break result;
                }
            }
            None => {
                break Err(ApiError::Internal(
                    "the request ended without a result".into(),
                ))
            }
        }
    };
    drop(events);
    let response = match result {
        Ok(done) => Json(openai::completion_json(&meta, &done, logprobs)).into_response(),
        Err(e) => api_error(&e),
    };
    with_request_id(response, id)
}

/// The state of a streamed response body.
struct SseState {
    /// `None` once the request is over (dropped then, so the request is released at once).
    events: Option<BoxStream<'static, Event>>,
    encoder: StreamEncoder,
    queue: VecDeque<String>,
}

/// Answers with server-sent events. The body owns the event stream: when the client goes
/// away hyper drops the body, which drops the stream and cancels the request.
fn sse_response(mut encoder: StreamEncoder, submission: Submission) -> Response {
    let queue = encoder.start().into();
    let state = SseState {
        events: Some(submission.events),
        encoder,
        queue,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(Bytes::from(frame)), st));
            }
            let events = st.events.as_mut()?;
            let frames = match events.next().await {
                Some(event) => st.encoder.event(event),
                None => st.encoder.end(),
            };
            st.queue.extend(frames);
            if st.encoder.is_finished() {
                st.events = None;
            }
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_request_id(response, submission.id)
}

fn model_json<B: Backend>(backend: &B) -> Value {
    json!({
        "id": backend.model_id(),
        "object": "model",
        "created": backend.created_unix(),
        "owned_by": "mistrald",
    })
}

async fn models<B: Backend>(State(backend): State<B>) -> Response {
    Json(json!({ "object": "list", "data": [model_json(&backend)] })).into_response()
}

async fn model<B: Backend>(
    State(backend): State<B>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    match id {
        Ok(Path(id)) if id == backend.model_id() => Json(model_json(&backend)).into_response(),
        Ok(Path(id)) => api_error(&ApiError::NotFound(format!(
            "the model '{}' does not exist; this server serves '{}'",
            id.chars().take(200).collect::<String>(),
            backend.model_id()
        ))),
        Err(e) => api_error(&ApiError::InvalidRequest {
            message: format!("invalid model id in the path: {e}"),
            param: None,
        }),
    }
}

async fn status<B: Backend>(State(backend): State<B>) -> Response {
    Json(backend.status()).into_response()
}

async fn health<B: Backend>(State(backend): State<B>) -> Response {
    if backend.is_ready() {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading" })),
        )
            .into_response()
    }
}

async fn metrics<B: Backend>(State(backend): State<B>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        backend.metrics_text(),
    )
        .into_response()
}

/// Runs `f` (tokenizer work, which can take a while on a large text) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ErrorResponse> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ErrorResponse::from),
        Err(e) => Err(ErrorResponse::from_api(&ApiError::Internal(format!(
            "tokenizer task failed: {e}"
        )))),
    }
}

async fn tokenize<B: Backend>(State(backend): State<B>, req: Request) -> Response {
    let result = async {
        let body = read_json(req, backend.limits().max_body_bytes).await?;
        let f = Fields::of(&body)?;
        let content = f
            .string("content")?
            .ok_or_else(|| ApiError::invalid("content", "content is required"))?
            .to_owned();
        let add_special = f.bool("add_special")?.unwrap_or(false);
        drop(body);
        let tokens = blocking(move || backend.tokenize(&content, add_special)).await?;
        Ok::<_, ErrorResponse>(Json(json!({ "tokens": tokens })).into_response())
    };
    result.await.unwrap_or_else(|e| error_response(&e))
}

async fn detokenize<B: Backend>(State(backend): State<B>, req: Request) -> Response {
    let result = async {
        let body = read_json(req, backend.limits().max_body_bytes).await?;
        let f = Fields::of(&body)?;
        let tokens = match f.get("tokens") {
            None => return Err(ApiError::invalid("tokens", "tokens is required").into()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    openai::uint_value(&format!("tokens[{i}]"), v, 0, u32::MAX as u64)
                        .map(|t| t as u32)
                })
                .collect::<Result<Vec<u32>, ApiError>>()?,
            Some(other) => {
                return Err(openai::type_error("tokens", "an array of token ids", other).into())
            }
        };
        drop(body);
        let content = blocking(move || backend.detokenize(&tokens)).await?;
        Ok::<_, ErrorResponse>(Json(json!({ "content": content })).into_response())
    };
    result.await.unwrap_or_else(|e| error_response(&e))
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// A listening socket whose connections know their peer.
trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_peer(&self) -> impl Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

impl Listener for UnixListener {
    type Io = UnixStream;
    async fn accept_peer(&self) -> io::Result<(UnixStream, Peer)> {
        let (stream, _) = self.accept().await?;
        let peer = match stream.peer_cred() {
            Ok(cred) => Peer::unix(cred.uid(), cred.pid()),
            Err(e) => {
                log::warn!("cannot read the credentials of a Unix socket client: {e}");
                Peer::default()
            }
        };
        Ok((stream, peer))
    }
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept_peer(&self) -> io::Result<(TcpStream, Peer)> {
        let (stream, addr) = self.accept().await?;
        // Streamed tokens are small writes that should leave at once.
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("TCP_NODELAY on a connection from {addr}: {e}");
        }
        Ok((
            stream,
            Peer {
                uid: None,
                pid: None,
                label: format!("tcp:{addr}"),
            },
        ))
    }
}

/// Whether an `accept` error concerns one connection or a passing shortage (keep accepting)
/// rather than the listener itself.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
                | libc::EAGAIN
        )
    )
}

/// The accept loop: one task per connection; on `shutdown`, stop accepting (the listener is
/// closed), ask every connection to close once its request in flight is answered, and wait
/// until all have.
async fn serve<L: Listener>(
    listener: L,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept_peer() => accepted,
        };
        match accepted {
            Ok((io, peer)) => spawn_connection(io, peer, app.clone(), stop_rx.clone()),
            Err(e) if is_transient(&e) => {
                log::warn!("accepting a connection: {e}");
                // Out of descriptors or memory: give connections in flight time to finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                log::error!("the listening socket failed, no longer accepting: {e}");
                break Err(e);
            }
        }
    };
    drop(listener);
    drop(stop_rx);
    stop_tx.send_replace(true);
    stop_tx.closed().await;
    result
}

fn spawn_connection<I>(io: I, peer: Peer, app: Router, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let label = peer.label.clone();
        let app = TowerToHyperService::new(app);
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            app.call(req)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let stopping = async {
            // Err: the server is gone, which also means stop.
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stopping => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            log::debug!("connection from {label}: {e}");
        }
        // `stop` is dropped here: the server waits for every connection's receiver.
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Finish, PromptInput, TokenLogprob, Usage};
    use crate::metrics::Metrics;
    use std::sync::{Arc, Mutex};

    type Reply = dyn Fn(&ApiRequest) -> Result<BoxStream<'static, Event>, ApiError> + Send + Sync;

    /// A service without a model: answers each request with `reply`.
    #[derive(Clone)]
    struct Mock {
        ready: bool,
        limits: ServiceLimits,
        metrics: Arc<Metrics>,
        submitted: Arc<Mutex<Vec<ApiRequest>>>,
        reply: Arc<Reply>,
    }

    impl Mock {
        fn new(events: Vec<Event>) -> Mock {
            Mock::with_reply(move |_| Ok(futures_util::stream::iter(events.clone()).boxed()))
        }

        fn with_reply(
            reply: impl Fn(&ApiRequest) -> Result<BoxStream<'static, Event>, ApiError>
                + Send
                + Sync
                + 'static,
        ) -> Mock {
            Mock {
                ready: true,
                limits: ServiceLimits::default(),
                metrics: Arc::new(Metrics::new()),
                submitted: Arc::default(),
                reply: Arc::new(reply),
            }
        }

        fn submitted(&self) -> Vec<ApiRequest> {
            self.submitted.lock().unwrap().clone()
        }
    }

    impl Backend for Mock {
        fn submit(
            &self,
            req: ApiRequest,
        ) -> impl Future<Output = Result<Submission, ApiError>> + Send {
            let result = (self.reply)(&req).map(|events| Submission { id: 7, events });
            self.submitted.lock().unwrap().push(req);
            async move { result }
        }
        fn status(&self) -> Status {
            Status {
                model: "tiny".into(),
                ready: self.ready,
                context: 4096,
                ..Status::default()
            }
        }
        fn is_ready(&self) -> bool {
            self.ready
        }
        fn model_id(&self) -> String {
            "tiny".into()
        }
        fn created_unix(&self) -> u64 {
            1_700_000_000
        }
        fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ApiError> {
            let mut ids: Vec<u32> = add_bos.then_some(1).into_iter().collect();
            ids.extend(text.bytes().map(u32::from));
            Ok(ids)
        }
        fn detokenize(&self, ids: &[u32]) -> Result<String, ApiError> {
            ids.iter()
                .map(|&id| {
                    u8::try_from(id)
                        .map(char::from)
                        .map_err(|_| ApiError::invalid("tokens", format!("unknown token {id}")))
                })
                .collect()
        }
        fn metrics_text(&self) -> String {
            self.metrics.render()
        }
        fn limits(&self) -> ServiceLimits {
            self.limits.clone()
        }
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 5,
            cached_tokens: 2,
            completion_tokens: 3,
        }
    }

    fn story() -> Vec<Event> {
        vec![
            Event::Started {
                prompt_tokens: 5,
                cached_tokens: 2,
            },
            Event::Delta {
                text: "Hel".into(),
                logprobs: vec![],
            },
            Event::Delta {
                text: "lo".into(),
                logprobs: vec![],
            },
            Event::Done {
                finish: Finish::Stop,
                text: "Hello".into(),
                refusal: None,
                usage: usage(),
            },
        ]
    }

    async fn call(app: &Router, req: Request) -> Response {
        match TowerToHyperService::new(app.clone()).call(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    fn post_req(path: &str, body: impl Into<Body>) -> Request {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.into())
            .unwrap()
    }

    fn get_req(path: &str) -> Request {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    async fn body_text(response: Response) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    async fn body_json(response: Response) -> Value {
        serde_json::from_str(&body_text(response).await).unwrap()
    }

    fn assert_error(v: &Value, code: &str, param: Option<&str>) {
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert!(v["error"]["message"].as_str().is_some(), "{v}");
        assert!(v["error"]["type"].as_str().is_some(), "{v}");
    }

    #[tokio::test]
    async fn chat_completion_collects_the_events() {
        let mock = Mock::new(story());
        let app = build_router(mock.clone());
        let mut req = post_req(
            "/v1/chat/completions",
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"Hi"}],"max_tokens":10,"user":"x"}"#,
        );
        req.extensions_mut().insert(Peer::unix(1000, Some(42)));
        let response = call(&app, req).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-request-id"], "7");
        let v = body_json(response).await;
        assert_eq!(v["id"], "chatcmpl-7");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(v["usage"]["total_tokens"], 8);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        let sent = mock.submitted();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].peer, Peer::unix(1000, Some(42)));
        assert_eq!(sent[0].max_tokens, Some(10));
        assert!(!sent[0].stream);
        assert_eq!(
            sent[0].input,
            PromptInput::Chat(vec![crate::chat::ChatMessage::new("user", "Hi")])
        );
    }

    #[tokio::test]
    async fn completion_with_logprobs() {
        let lp = TokenLogprob {
            token: "Hel".into(),
            bytes: b"Hel".to_vec(),
            logprob: -0.5,
            top: vec![("Hel".into(), b"Hel".to_vec(), -0.5)],
        };
        let mock = Mock::new(vec![
            Event::Delta {
                text: "Hel".into(),
                logprobs: vec![lp],
            },
            Event::Done {
                finish: Finish::Length,
                text: "Hel".into(),
                refusal: None,
                usage: usage(),
            },
        ]);
        let app = build_router(mock.clone());
        let response = call(
            &app,
            post_req("/v1/completions", r#"{"prompt":"a","logprobs":1}"#),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let v = body_json(response).await;
        assert_eq!(v["id"], "cmpl-7");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "Hel");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["logprobs"]["tokens"][0], "Hel");
        assert_eq!(v["choices"][0]["logprobs"]["top_logprobs"][0]["Hel"], -0.5);
        assert_eq!(mock.submitted()[0].logprobs, Some(1));
    }

    #[tokio::test]
    async fn streamed_chat_is_sse() {
        let app = build_router(Mock::new(story()));
        let response = call(
            &app,
            post_req("/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let text = body_text(response).await;
        let frames: Vec<&str> = text.split_terminator("\n\n").collect();
        assert!(frames.iter().all(|f| f.starts_with("data: ")), "{text}");
        assert_eq!(frames.len(), 6, "{text}");
        assert_eq!(*frames.last().unwrap(), "data: [DONE]");
        let chunks: Vec<Value> = frames[..5]
            .iter()
            .map(|f| serde_json::from_str(&f["data: ".len()..]).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
    }

    #[tokio::test]
    async fn error_mid_stream_is_a_last_event() {
        let app = build_router(Mock::new(vec![
            Event::Delta {
                text: "a".into(),
                logprobs: vec![],
            },
            Event::Error(ApiError::PluginFault {
                plugin: "p".into(),
                message: "trap".into(),
            }),
        ]));
        let response = call(
            &app,
            post_req("/v1/completions", r#"{"prompt":"x","stream":true}"#),
        )
        .await;
        let text = body_text(response).await;
        let frames: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(frames.len(), 3, "{text}");
        let err: Value = serde_json::from_str(&frames[1]["data: ".len()..]).unwrap();
        assert_error(&err, "plugin_error", None);
        assert_eq!(frames[2], "data: [DONE]");
    }

    #[tokio::test]
    async fn stream_ending_without_result_reports_an_error() {
        let app = build_router(Mock::new(vec![]));
        let text = body_text(
            call(
                &app,
                post_req("/v1/completions", r#"{"prompt":"x","stream":true}"#),
            )
            .await,
        )
        .await;
        assert!(text.contains("internal_error"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
        let response = call(&app, post_req("/v1/completions", r#"{"prompt":"x"}"#)).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn submit_errors_map_to_status() {
        let app = build_router(Mock::with_reply(|_| {
            Err(ApiError::Busy {
                queued: 3,
                retry_after_secs: 2,
            })
        }));
        let response = call(&app, post_req("/v1/completions", r#"{"prompt":"x"}"#)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_error(&body_json(response).await, "overloaded", None);

        let app = build_router(Mock::with_reply(|_| {
            Err(ApiError::Rejected {
                plugin: "moderation".into(),
                reason: "no".into(),
            })
        }));
        let response = call(&app, post_req("/v1/completions", r#"{"prompt":"x"}"#)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_error(&body_json(response).await, "content_filter", None);
    }

    #[tokio::test]
    async fn bad_bodies_are_400_json() {
        let mock = Mock::new(story());
        let app = build_router(mock.clone());
        for (body, code, param) in [
            (&b"{\"prompt\": "[..], "invalid_request", None),
            (&b"{\"prompt\": \"\xff\"}"[..], "invalid_request", None),
            (&b""[..], "invalid_request", None),
            (&b"[1,2]"[..], "invalid_request", None),
            (&b"{\"prompt\": 5}"[..], "invalid_value", Some("prompt")),
            (
                &b"{\"prompt\": \"x\", \"max_tokens\": -1}"[..],
                "invalid_value",
                Some("max_tokens"),
            ),
        ] {
            let response = call(&app, post_req("/v1/completions", body.to_vec())).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            assert_error(&body_json(response).await, code, param);
        }
        assert!(mock.submitted().is_empty());
    }

    #[tokio::test]
    async fn body_over_the_limit_is_413() {
        let mut mock = Mock::new(story());
        mock.limits.max_body_bytes = 100;
        let app = build_router(mock.clone());
        let big = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(200));
        // With a Content-Length …
        let response = call(&app, post_req("/v1/completions", big.clone())).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_error(&body_json(response).await, "request_too_large", None);
        // … and streamed without one.
        let chunks = vec![Ok::<_, Infallible>(Bytes::from(big.clone())); 1];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let response = call(&app, post_req("/tokenize", body)).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(mock.submitted().is_empty());
    }

    #[tokio::test]
    async fn unknown_route_and_wrong_method() {
        let app = build_router(Mock::new(story()));
        let response = call(&app, get_req("/v2/nothing")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_error(&body_json(response).await, "unknown_url", None);

        let response = call(&app, get_req("/v1/chat/completions")).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["allow"], "POST");
        assert_error(&body_json(response).await, "method_not_allowed", None);

        let response = call(&app, post_req("/health", "")).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn health_models_status_metrics() {
        let mut mock = Mock::new(story());
        let app = build_router(mock.clone());
        let response = call(&app, get_req("/health")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_json(response).await, json!({"status": "ok"}));
        mock.ready = false;
        let response = call(&build_router(mock.clone()), get_req("/health")).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_json(response).await, json!({"status": "loading"}));

        let v = body_json(call(&app, get_req("/v1/models")).await).await;
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "tiny");
        assert_eq!(v["data"][0]["created"], 1_700_000_000u64);
        let response = call(&app, get_req("/v1/models/tiny")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let response = call(&app, get_req("/v1/models/other")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_error(&body_json(response).await, "not_found", None);

        let v = body_json(call(&app, get_req("/v1/status")).await).await;
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["context"], 4096);

        mock.metrics.count_request("stop");
        let response = call(&app, get_req("/metrics")).await;
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = body_text(response).await;
        assert!(
            text.contains("mistrald_requests_total{outcome=\"stop\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn tokenize_and_detokenize() {
        let app = build_router(Mock::new(story()));
        let v = body_json(
            call(
                &app,
                post_req("/tokenize", r#"{"content":"AB","add_special":true}"#),
            )
            .await,
        )
        .await;
        assert_eq!(v, json!({"tokens": [1, 65, 66]}));
        let v = body_json(call(&app, post_req("/tokenize", r#"{"content":"AB"}"#)).await).await;
        assert_eq!(v, json!({"tokens": [65, 66]}));
        let v =
            body_json(call(&app, post_req("/detokenize", r#"{"tokens":[72,105]}"#)).await).await;
        assert_eq!(v, json!({"content": "Hi"}));

        for (path, body, param) in [
            ("/tokenize", r#"{}"#, "content"),
            ("/tokenize", r#"{"content":3}"#, "content"),
            (
                "/tokenize",
                r#"{"content":"a","add_special":"yes"}"#,
                "add_special",
            ),
            ("/detokenize", r#"{"tokens":"1 2"}"#, "tokens"),
            ("/detokenize", r#"{"tokens":[1,-2]}"#, "tokens[1]"),
            ("/detokenize", r#"{"tokens":[1,4294967296]}"#, "tokens[1]"),
            ("/detokenize", r#"{"tokens":[1000]}"#, "tokens"),
        ] {
            let response = call(&app, post_req(path, body)).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_error(&body_json(response).await, "invalid_value", Some(param));
        }
    }

    // ---- the accept loops ----

    /// A router that answers `GET /peer` with the peer's label and `GET /slow` after a while.
    fn peer_router() -> Router {
        slow_router(Arc::default())
    }

    /// [`peer_router`]; `slow_started` is notified when a `/slow` request is being handled.
    fn slow_router(slow_started: Arc<tokio::sync::Notify>) -> Router {
        Router::new()
            .route(
                "/peer",
                get(|req: Request| async move {
                    req.extensions()
                        .get::<Peer>()
                        .map(|p| p.label.clone())
                        .unwrap_or_default()
                }),
            )
            .route(
                "/slow",
                get(move || async move {
                    slow_started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow"
                }),
            )
    }

    async fn raw_request<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        request: &str,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn unix_server(
        app: Router,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = rx.await;
        }));
        (dir, path, tx, server)
    }

    #[tokio::test]
    async fn unix_peer_is_a_request_extension() {
        let (_dir, path, stop, server) = unix_server(peer_router());
        let mut s = UnixStream::connect(&path).await.unwrap();
        let reply = raw_request(
            &mut s,
            "GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let uid = unsafe { libc::getuid() };
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with(&format!("uid:{uid}")), "{reply}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(UnixStream::connect(&path).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn tcp_peer_is_labelled_with_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, peer_router(), async move {
            let _ = rx.await;
        }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let local = s.local_addr().unwrap();
        let reply = raw_request(
            &mut s,
            "GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.ends_with(&format!("tcp:{local}")), "{reply}");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn graceful_shutdown_finishes_requests_and_closes_idle_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let slow_started = Arc::new(tokio::sync::Notify::new());
        let (_dir, path, stop, server) = unix_server(slow_router(slow_started.clone()));
        // An idle keep-alive connection: one request answered, connection left open.
        let mut idle = UnixStream::connect(&path).await.unwrap();
        idle.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // A request in flight when the shutdown comes.
        let mut busy = UnixStream::connect(&path).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        slow_started.notified().await;
        stop.send(()).unwrap();
        let mut reply = Vec::new();
        busy.read_to_end(&mut reply).await.unwrap();
        let reply = String::from_utf8(reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("slow"),
            "{reply}"
        );
        // The idle connection is closed by the server.
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// A stream that yields `first` then waits forever; `dropped` fires when it is dropped.
    fn endless(
        first: Vec<Event>,
    ) -> (
        BoxStream<'static, Event>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
        let tail = futures_util::stream::once(async move {
            let _guard = guard;
            std::future::pending::<Event>().await
        });
        (
            futures_util::stream::iter(first).chain(tail).boxed(),
            dropped,
        )
    }

    async fn disconnect_cancels(body: &'static str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dropped = Arc::new(Mutex::new(None));
        let slot = dropped.clone();
        let mock = Mock::with_reply(move |_| {
            let (events, rx) = endless(vec![Event::Started {
                prompt_tokens: 1,
                cached_tokens: 0,
            }]);
            *slot.lock().unwrap() = Some(rx);
            Ok(events)
        });
        let (_dir, path, stop, server) = unix_server(build_router(mock));
        let mut s = UnixStream::connect(&path).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.unwrap();
        // Wait until the request was submitted (and, when streaming, its first chunk sent).
        let rx = loop {
            if let Some(rx) = dropped.lock().unwrap().take() {
                break rx;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if body.contains("\"stream\":true") {
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the request's events were not dropped after the client left")
            .unwrap_err();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn disconnect_drops_a_waiting_request() {
        disconnect_cancels(r#"{"messages":[{"role":"user","content":"Hi"}]}"#).await;
    }

    #[tokio::test]
    async fn disconnect_drops_a_streaming_request() {
        disconnect_cancels(r#"{"messages":[{"role":"user","content":"Hi"}],"stream":true}"#).await;
    }
}
