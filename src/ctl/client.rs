//! HTTP/1.1 over the daemon's Unix socket (or plain TCP to an `http://HOST:PORT` URL, for
//! other servers such as llama.cpp's `llama-server`), one connection per request, with hyper's
//! client connection API; and the errors of `mistralctl` with their exit codes.

use super::exit;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why a command failed; each maps to an exit code ([`CtlError::exit_code`]).
#[derive(Debug)]
pub(crate) enum CtlError {
    /// The socket (or TCP address) could not be connected to (exit 3).
    Connect {
        /// The socket or URL.
        endpoint: Endpoint,
        /// Why.
        source: io::Error,
    },
    /// The daemon answered with an error status (exit 1).
    Daemon {
        /// The HTTP status.
        status: StatusCode,
        /// `error.message` of its answer (or a description of the answer).
        message: String,
    },
    /// The daemon is busy: 503 with `Retry-After` (exit 4).
    Busy {
        /// `error.message` of its answer.
        message: String,
        /// The `Retry-After` value (seconds, or an HTTP date).
        retry_after: String,
    },
    /// The daemon reported a failure in the middle of a stream (exit 1).
    Stream(String),
    /// A plugin refused the output: finish reason `content_filter` (exit 1).
    Refused(Option<String>),
    /// The connection failed or the answer was not what the API promises (exit 1).
    Protocol(String),
    /// Reading the prompt from stdin failed (exit 1).
    Input(io::Error),
    /// Writing to stdout failed (exit 1; silent for a closed pipe).
    Output(io::Error),
    /// Ctrl-C (exit 130).
    Interrupted,
}

impl CtlError {
    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            CtlError::Connect { .. } => exit::CONNECT,
            CtlError::Busy { .. } => exit::BUSY,
            CtlError::Interrupted => exit::INTERRUPTED,
            _ => exit::ERROR,
        }
    }

    /// The message to print on stderr (without the `mistralctl: ` prefix), or `None` when
    /// nothing should be printed (Ctrl-C, a closed stdout pipe).
    pub(crate) fn message(&self) -> Option<String> {
        Some(match self {
            CtlError::Connect { endpoint, source } => {
                let hint = match (source.kind(), endpoint) {
                    (io::ErrorKind::PermissionDenied, Endpoint::Unix(_)) => {
                        "check the socket's permissions"
                    }
                    (_, Endpoint::Unix(_)) => "is mistrald running?",
                    (_, Endpoint::Tcp(_)) => "is the server running?",
                };
                format!(
                    "cannot connect to {endpoint}: {} — {hint}",
                    io_message(source)
                )
            }
            CtlError::Daemon { message, .. } => message.clone(),
            CtlError::Busy {
                message,
                retry_after,
            } => match retry_after.trim().parse::<u64>() {
                Ok(secs) => format!("{message} (the daemon is busy: retry in {secs} s)"),
                Err(_) => format!("{message} (the daemon is busy: retry after {retry_after})"),
            },
            CtlError::Stream(message) => format!("the generation failed: {message}"),
            CtlError::Refused(Some(reason)) => format!("the output was refused: {reason}"),
            CtlError::Refused(None) => "the output was stopped by a content filter".to_string(),
            CtlError::Protocol(message) => message.clone(),
            CtlError::Input(e) => format!("cannot read stdin: {}", io_message(e)),
            CtlError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => return None,
            CtlError::Output(e) => format!("cannot write to stdout: {}", io_message(e)),
            CtlError::Interrupted => return None,
        })
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.message() {
            Some(m) => f.write_str(&m),
            None if matches!(self, CtlError::Interrupted) => f.write_str("interrupted"),
            None => f.write_str("stdout closed"),
        }
    }
}

/// An I/O error's text without Rust's ` (os error N)` suffix.
fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// A plain-HTTP base URL, `http://HOST[:PORT][/]` (`--url`): the server is reached over TCP
/// at exactly that address (no TLS, no proxy); the API paths (`/v1/…`) are appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// A host name, an IPv4 address, or an IPv6 address (without its brackets).
    host: String,
    port: u16,
}

impl HttpUrl {
    /// Parses `http://HOST[:PORT][/]` (port 80 when left out); anything else (another scheme,
    /// a path, a query, user information, a malformed host or port) is an error that says why.
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let text = text.trim();
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err("https is not supported: use a plain http:// URL".into())
            }
            Some((scheme, _)) => {
                return Err(format!(
                    "unsupported scheme '{scheme}': expected http://HOST:PORT"
                ))
            }
            None => return Err("expected http://HOST:PORT".into()),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !path.is_empty() && path != "/" {
            return Err(format!(
                "the URL must not have a path, query or fragment ('{path}'): the API paths are added to http://HOST:PORT"
            ));
        }
        if authority.contains('@') {
            return Err("user information in the URL is not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or("unclosed '[' in the URL's IPv6 address")?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| format!("'{addr}' is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected ':PORT' after ']'")?,
                ),
            };
            (addr, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        // An IPv6 address was checked above; names and IPv4 addresses have no colon.
        let valid_host = !host.is_empty()
            && (authority.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !valid_host {
            return Err(format!("'{host}' is not a host name or address"));
        }
        let port = match port {
            None => 80,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(format!("'{text}' is not a port number (1-65535)")),
            },
        };
        Ok(HttpUrl {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `HOST:PORT` as the `Host` header carries it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority())
    }
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The daemon's Unix socket.
    Unix(PathBuf),
    /// A TCP address (`--url`).
    Tcp(HttpUrl),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(url) => write!(f, "{url}"),
        }
    }
}

/// A client of the daemon at one socket path, or of a server at one TCP address.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    endpoint: Endpoint,
}

impl Client {
    /// A client of the daemon at this Unix socket.
    pub(crate) fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            endpoint: Endpoint::Unix(socket.into()),
        }
    }

    /// A client of the server at this URL (plain HTTP over TCP).
    pub(crate) fn tcp(url: HttpUrl) -> Client {
        Client {
            endpoint: Endpoint::Tcp(url),
        }
    }

    /// Where the requests go.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `GET path`; an error status becomes an error.
    pub(crate) async fn get(&self, path: &str) -> Result<Reply, CtlError> {
        self.send(Method::GET, path, None)
            .await?
            .error_for_status()
            .await
    }

    /// `POST path` with a JSON body; an error status becomes an error.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Reply, CtlError> {
        let body = serde_json::to_vec(body).expect("a JSON value serializes");
        self.send(Method::POST, path, Some(body))
            .await?
            .error_for_status()
            .await
    }

    /// Connects, sends one request and waits for the answer's head.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, CtlError> {
        let connect_error = |source| CtlError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        };
        let (mut sender, guard, host) = match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(connect_error)?;
                let (sender, guard) = handshake(stream).await?;
                (sender, guard, "localhost".to_string())
            }
            Endpoint::Tcp(url) => {
                let stream = tokio::net::TcpStream::connect((url.host(), url.port()))
                    .await
                    .map_err(connect_error)?;
                // Streamed tokens are small writes: do not let Nagle's algorithm delay them.
                let _ = stream.set_nodelay(true);
                let (sender, guard) = handshake(stream).await?;
                (sender, guard, url.authority())
            }
        };

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CtlError::Protocol(format!("bad request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| {
            CtlError::Protocol(format!("the request failed: {}", hyper_message(&e)))
        })?;
        Ok(Reply {
            response,
            _connection: guard,
        })
    }
}

/// The HTTP/1.1 handshake on a connected stream; the connection is driven by a task that the
/// guard ends.
async fn handshake<T>(
    stream: T,
) -> Result<(http1::SendRequest<Full<Bytes>>, ConnectionGuard), CtlError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| CtlError::Protocol(format!("HTTP handshake failed: {e}")))?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, ConnectionGuard(task.abort_handle())))
}

/// A hyper error with its causes (`connection closed before message completed`, …).
fn hyper_message(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Closes the connection (ending the request on the daemon) when the reply is dropped.
#[derive(Debug)]
struct ConnectionGuard(tokio::task::AbortHandle);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The daemon's answer; dropping it closes the connection.
#[derive(Debug)]
pub(crate) struct Reply {
    response: Response<Incoming>,
    _connection: ConnectionGuard,
}

impl Reply {
    /// Whether the body is a Server-Sent Events stream.
    pub(crate) fn is_event_stream(&self) -> bool {
        self.response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
    }

    /// The next piece of the body (`None` at its end).
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, CtlError> {
        loop {
            match self.response.body_mut().frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(CtlError::Protocol(format!(
                        "reading the answer failed: {}",
                        hyper_message(&e)
                    )))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body.
    pub(crate) async fn bytes(self) -> Result<Bytes, CtlError> {
        let Reply {
            response,
            _connection,
        } = self;
        response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| {
                CtlError::Protocol(format!("reading the answer failed: {}", hyper_message(&e)))
            })
    }

    /// The whole body as JSON.
    pub(crate) async fn json(self) -> Result<serde_json::Value, CtlError> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CtlError::Protocol(format!("the daemon's answer is not valid JSON: {e}")))
    }

    /// `self` for a success status, else the error the answer describes.
    async fn error_for_status(self) -> Result<Reply, CtlError> {
        let status = self.response.status();
        if status.is_success() {
            return Ok(self);
        }
        let retry_after = self
            .response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = self.bytes().await.unwrap_or_default();
        let message = error_message(status, &body);
        Err(match retry_after {
            Some(retry_after) if status == StatusCode::SERVICE_UNAVAILABLE => CtlError::Busy {
                message,
                retry_after,
            },
            _ => CtlError::Daemon { status, message },
        })
    }
}

/// `error.message` of an OpenAI error body, else a description of the status and body.
pub(crate) fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(message) = value
            .pointer("/error/message")
            .and_then(|m| m.as_str())
            .or_else(|| value.get("error").and_then(|m| m.as_str()))
        {
            return message.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() || text.len() > 500 {
        format!("the daemon answered {status}")
    } else {
        format!("the daemon answered {status}: {text}")
    }
}
