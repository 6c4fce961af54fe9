//! Tests of `mistralctl`: argument parsing, formatting, and the client against a small hyper
//! server on a real Unix socket that answers with canned SSE, JSON and errors.

use super::*;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{header, Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Body = BoxBody<Bytes, Infallible>;

/// A request as the test server saw it.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    host: Option<String>,
    content_type: Option<String>,
    body: Value,
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Server {
    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Starts an HTTP/1.1 server on a Unix socket in a new temporary directory; `reply` makes
/// the answer to each request.
fn start_server(reply: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mistrald.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reply = Arc::new(reply);
    let recorded = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let reply = reply.clone();
            let recorded = recorded.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let reply = reply.clone();
                let recorded = recorded.clone();
                async move {
                    let header = |name| {
                        request
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let (host, content_type) = (header(header::HOST), header(header::CONTENT_TYPE));
                    let method = request.method().to_string();
                    let path = request.uri().path().to_string();
                    let bytes = request.into_body().collect().await.unwrap().to_bytes();
                    let body = if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).unwrap()
                    };
                    let seen = Recorded {
                        method,
                        path,
                        host,
                        content_type,
                        body,
                    };
                    recorded.lock().unwrap().push(seen.clone());
                    Ok::<_, Infallible>(reply(&seen))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server {
        _dir: dir,
        socket,
        requests,
    }
}

fn json_response(status: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn error_response(status: u16, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": null } }),
    )
}

/// An event stream sent as these frames (each frame a separate body chunk).
fn sse_response(frames: Vec<String>) -> Response<Body> {
    let frames = frames
        .into_iter()
        .map(|f| Ok::<_, Infallible>(Frame::data(Bytes::from(f))));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
        .unwrap()
}

fn event(value: Value) -> String {
    format!("data: {value}\n\n")
}

fn completion_chunk(text: &str, finish: Option<&str>) -> String {
    event(json!({
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }]
    }))
}

fn chat_chunk(delta: Value, finish: Option<&str>) -> String {
    event(json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]
    }))
}

fn done() -> String {
    "data: [DONE]\n\n".to_string()
}

fn never() -> Interrupt {
    Box::pin(std::future::pending())
}

/// Runs `mistralctl ARGS` with `stdin`; returns (exit code, stdout, stderr).
async fn run_with(
    args: &[&str],
    stdin: &str,
    interrupt: &dyn Fn() -> Interrupt,
) -> (i32, String, String) {
    run_term(args, stdin, interrupt, false).await
}

/// [`run_with`], stdin a terminal or not (prompts; the chat's recovery from failed turns).
async fn run_term(
    args: &[&str],
    stdin: &str,
    interrupt: &dyn Fn() -> Interrupt,
    interactive: bool,
) -> (i32, String, String) {
    let cli = Cli::try_parse_from(args).unwrap();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut input: &[u8] = stdin.as_bytes();
    let code = {
        let mut term = Term {
            out: &mut out,
            err: &mut err,
            input: &mut input,
            interactive,
            interrupt,
            line_open: false,
        };
        run(cli, &mut term).await
    };
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

async fn run_args(args: &[&str], stdin: &str) -> (i32, String, String) {
    run_with(args, stdin, &never).await
}

/// Runs `mistralctl ARGS` with `stdin` as if stdin were a terminal.
async fn run_at_terminal(args: &[&str], stdin: &str) -> (i32, String, String) {
    run_term(args, stdin, &never, true).await
}

// ---- argument parsing -------------------------------------------------------------------

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(args)
}

#[test]
fn parses_generate_with_every_option() {
    let cli = parse(&[
        "mistralctl",
        "generate",
        "Once upon",
        "--max-tokens",
        "64",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--min-p",
        "0.05",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "42",
        "--stop",
        "\n\n",
        "--stop",
        "END",
        "--chat",
        "--system",
        "Be brief.",
        "--no-stream",
        "--usage",
        "--socket",
        "/tmp/x.sock",
    ])
    .unwrap();
    assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
    let Command::Generate(args) = cli.command else {
        panic!("not generate")
    };
    assert_eq!(args.prompt, "Once upon");
    assert!(args.chat);
    assert_eq!(args.system.as_deref(), Some("Be brief."));
    let o = &args.options;
    assert_eq!(o.max_tokens, Some(64));
    assert_eq!(o.temperature, Some(0.7));
    assert_eq!(o.top_p, Some(0.9));
    assert_eq!(o.top_k, Some(40));
    assert_eq!(o.min_p, Some(0.05));
    assert_eq!(o.repeat_penalty, Some(1.1));
    assert_eq!(o.seed, Some(42));
    assert_eq!(o.stop, vec!["\n\n".to_string(), "END".to_string()]);
    assert!(o.no_stream && o.usage);
    // Non-streamed: no stream_options.
    let body = o.body(("prompt", json!("x")));
    assert_eq!(
        body,
        json!({
            "prompt": "x", "stream": false, "max_tokens": 64, "temperature": 0.7, "top_p": 0.9,
            "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 42, "stop": ["\n\n", "END"]
        })
    );
}

#[test]
fn parses_the_other_commands() {
    let cli = parse(&["mistralctl", "--socket", "/s", "status", "--json"]).unwrap();
    assert!(matches!(cli.command, Command::Status { json: true }));
    assert_eq!(cli.socket.as_deref(), Some(Path::new("/s")));
    assert!(matches!(
        parse(&["mistralctl", "models"]).unwrap().command,
        Command::Models
    ));
    let cli = parse(&["mistralctl", "chat", "--system", "S", "--temperature", "0"]).unwrap();
    let Command::Chat(args) = cli.command else {
        panic!("not chat")
    };
    assert_eq!(args.system.as_deref(), Some("S"));
    assert_eq!(args.options.temperature, Some(0.0));
    assert_eq!(
        args.options.body(("messages", json!([]))),
        json!({ "messages": [], "stream": true, "temperature": 0.0 })
    );
    // `-` is a prompt (stdin), not an option.
    let cli = parse(&["mistralctl", "generate", "-"]).unwrap();
    assert!(matches!(cli.command, Command::Generate(ref a) if a.prompt == "-"));
}

#[test]
fn usage_errors_exit_with_2_and_help_with_0() {
    for args in [
        &["mistralctl"][..],
        &["mistralctl", "generate"],
        &["mistralctl", "generate", "x", "--system", "S"], // --system needs --chat
        &["mistralctl", "generate", "x", "--max-tokens", "many"],
        &["mistralctl", "frobnicate"],
        &["mistralctl", "status", "--bogus"],
    ] {
        let e = parse(args).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE, "{args:?}");
    }
    let help = parse(&["mistralctl", "--help"]).unwrap_err();
    assert_eq!(help.exit_code(), 0);
    let text = help.to_string();
    assert!(text.contains("130"), "{text}");
    assert!(text.contains("MISTRALD_SOCKET"), "{text}");
}

#[test]
fn default_socket_path_rules() {
    let os = |s: &str| Some(std::ffi::OsString::from(s));
    // Every socket exists: the daemon's own default rules.
    let all = |_: &std::path::Path| true;
    assert_eq!(
        socket_path_from(os("/a.sock"), os("/run/user/1000"), false, &all),
        PathBuf::from("/a.sock")
    );
    assert_eq!(
        socket_path_from(None, os("/run/user/1000"), false, &all),
        PathBuf::from("/run/user/1000/mistrald.sock")
    );
    assert_eq!(
        socket_path_from(os(""), os("/run/user/1000"), true, &all),
        PathBuf::from(SYSTEM_SOCKET)
    );
    assert_eq!(
        socket_path_from(None, None, false, &all),
        PathBuf::from(SYSTEM_SOCKET)
    );
    assert_eq!(
        socket_path_from(os("/a.sock"), None, true, &all),
        PathBuf::from("/a.sock")
    );
    // The user's own daemon is not running but the system service is: the system socket.
    let system_only = |p: &std::path::Path| p == std::path::Path::new(SYSTEM_SOCKET);
    assert_eq!(
        socket_path_from(None, os("/run/user/1000"), false, &system_only),
        PathBuf::from(SYSTEM_SOCKET)
    );
    // Neither runs: the user's path (the error then names the socket the user would start).
    assert_eq!(
        socket_path_from(None, os("/run/user/1000"), false, &|_| false),
        PathBuf::from("/run/user/1000/mistrald.sock")
    );
    // $MISTRALD_SOCKET is used even when it does not exist.
    assert_eq!(
        socket_path_from(os("/a.sock"), None, false, &system_only),
        PathBuf::from("/a.sock")
    );
}

// ---- formatting -------------------------------------------------------------------------

#[test]
fn formats_the_status_of_the_daemon() {
    // Through the daemon's own type, so a renamed field shows up here.
    let status = crate::api::Status {
        model: "mistral-7b".into(),
        model_path: "/models/mistral-7b.gguf".into(),
        window: Some(4096),
        context: 8192,
        kv_type: "f16".into(),
        parallel: 2,
        ready: true,
        queued: 1,
        queue_capacity: 16,
        active: 2,
        prompt_cache_entries: 3,
        prompt_cache_bytes: 3 << 19,
        tokens_per_second: 18.25,
        requests_total: 42,
        uptime_seconds: 93784.5,
    };
    let view: StatusView = serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
    assert_eq!(
        format_status(&view),
        "\
model:        mistral-7b (/models/mistral-7b.gguf)
window:       4096 positions (sliding window)
context:      8192 tokens
KV type:      f16
parallel:     2
ready:        yes
queue:        1/16
active:       2
prompt cache: 3 entries, 1.5 MiB
tokens/s:     18.2
requests:     42
uptime:       1d 2h 3m 4s
"
    );
    let view: StatusView =
        serde_json::from_value(json!({ "model": "m", "window": null, "ready": false })).unwrap();
    let text = format_status(&view);
    assert!(
        text.contains("window:       none (full attention)\n"),
        "{text}"
    );
    assert!(text.contains("ready:        no (loading)\n"), "{text}");
    assert!(text.starts_with("model:        m\n"), "{text}");
}

#[test]
fn formats_durations() {
    assert_eq!(format_duration(0.0), "0s");
    assert_eq!(format_duration(59.9), "59s");
    assert_eq!(format_duration(61.0), "1m 1s");
    assert_eq!(format_duration(3600.0), "1h 0m 0s");
    assert_eq!(format_duration(f64::NAN), "0s");
}

#[test]
fn assembles_chunks() {
    let mut outcome = Outcome::default();
    let chunk = json!({ "choices": [{ "index": 0, "delta": { "role": "assistant" }, "finish_reason": null }] });
    assert_eq!(outcome.apply_chunk(&chunk, true).unwrap(), "");
    let chunk =
        json!({ "choices": [{ "index": 0, "delta": { "content": "Hi" }, "finish_reason": null }] });
    assert_eq!(outcome.apply_chunk(&chunk, true).unwrap(), "Hi");
    let chunk = json!({ "choices": [{ "index": 0, "delta": { "refusal": "no." }, "finish_reason": "content_filter" }] });
    assert_eq!(outcome.apply_chunk(&chunk, true).unwrap(), "");
    let chunk = json!({ "choices": [], "usage": { "prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6, "prompt_tokens_details": { "cached_tokens": 2 } } });
    outcome.apply_chunk(&chunk, true).unwrap();
    assert_eq!(
        outcome,
        Outcome {
            text: "Hi".into(),
            finish_reason: Some("content_filter".into()),
            refusal: Some("no.".into()),
            usage: Some(Usage {
                prompt_tokens: 5,
                cached_tokens: 2,
                completion_tokens: 1
            }),
        }
    );
    let error = json!({ "error": { "message": "boom", "type": "server_error" } });
    assert!(matches!(outcome.apply_chunk(&error, true), Err(CtlError::Stream(m)) if m == "boom"));
}

// ---- against a server -------------------------------------------------------------------

#[tokio::test]
async fn generate_streams_a_completion() {
    let server = start_server(|_| {
        sse_response(vec![
            completion_chunk("Hel", None),
            // Two events in one frame, and one split across frames with CRLF line ends.
            completion_chunk("lo", None) + &completion_chunk(",", None),
            "data: {\"choices\":[{\"index\":0,\"text\":\" wor".into(),
            "ld\",\"finish_reason\":null}]}\r\n\r".into(),
            "\n".into(),
            completion_chunk("", Some("stop")),
            done(),
        ])
    });
    let (code, out, err) = run_args(
        &[
            "mistralctl",
            "--socket",
            server.socket(),
            "generate",
            "Say hello",
            "--max-tokens",
            "8",
            "--stop",
            "!",
        ],
        "",
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "Hello, world\n", "")
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/completions")
    );
    assert_eq!(r.host.as_deref(), Some("localhost"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        r.body,
        json!({ "prompt": "Say hello", "stream": true, "max_tokens": 8, "stop": ["!"] })
    );
}

#[tokio::test]
async fn generate_chat_with_usage_and_length_note() {
    let server = start_server(|_| {
        sse_response(vec![
            chat_chunk(json!({ "role": "assistant", "content": "" }), None),
            chat_chunk(json!({ "content": "Bonjour" }), None),
            chat_chunk(json!({}), Some("length")),
            event(json!({ "choices": [], "usage": {
                "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                "prompt_tokens_details": { "cached_tokens": 4 } } })),
            done(),
        ])
    });
    let (code, out, err) = run_args(
        &[
            "mistralctl",
            "generate",
            "--socket",
            server.socket(),
            "--chat",
            "--system",
            "You speak French.",
            "Hello",
            "--usage",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Bonjour\n");
    assert_eq!(
        err,
        "mistralctl: usage: 12 prompt tokens (4 cached), 3 completion tokens; finish reason: length\n\
         mistralctl: note: the reply was cut at the token limit (finish reason: length)\n"
    );
    let r = &server.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.body,
        json!({
            "messages": [
                { "role": "system", "content": "You speak French." },
                { "role": "user", "content": "Hello" }
            ],
            "stream": true,
            "stream_options": { "include_usage": true }
        })
    );
}

#[tokio::test]
async fn generate_without_streaming_and_prompt_from_stdin() {
    let server = start_server(|r| {
        json_response(
            200,
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{ "index": 0, "text": format!("<{}>", r.body["prompt"].as_str().unwrap()),
                              "logprobs": null, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                           "prompt_tokens_details": { "cached_tokens": 0 } }
            }),
        )
    });
    let (code, out, err) = run_args(
        &[
            "mistralctl",
            "--socket",
            server.socket(),
            "generate",
            "-",
            "--no-stream",
            "--usage",
        ],
        "line one\nline two\r\n",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "<line one\nline two>\n");
    assert_eq!(
        err,
        "mistralctl: usage: 3 prompt tokens (0 cached), 2 completion tokens; finish reason: stop\n"
    );
    assert_eq!(
        server.requests()[0].body,
        json!({ "prompt": "line one\nline two", "stream": false })
    );
}

#[tokio::test]
async fn daemon_errors_exit_with_1() {
    let server =
        start_server(|_| error_response(400, "the prompt has 9000 tokens; the context holds 8192"));
    let (code, out, err) = run_args(
        &["mistralctl", "--socket", server.socket(), "generate", "x"],
        "",
    )
    .await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(out, "");
    assert_eq!(
        err,
        "mistralctl: the prompt has 9000 tokens; the context holds 8192\n"
    );

    // A body that is not an OpenAI error still gives a readable message.
    let server = start_server(|_| {
        Response::builder()
            .status(404)
            .body(Full::new(Bytes::from("no such route")).boxed())
            .unwrap()
    });
    let (code, _, err) = run_args(&["mistralctl", "--socket", server.socket(), "models"], "").await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(
        err,
        "mistralctl: the daemon answered 404 Not Found: no such route\n"
    );

    // 503 without Retry-After (still loading) is an error, not "busy".
    let server = start_server(|_| error_response(503, "the model is still loading"));
    let (code, _, err) = run_args(&["mistralctl", "--socket", server.socket(), "status"], "").await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(err, "mistralctl: the model is still loading\n");
}

#[tokio::test]
async fn busy_exits_with_4_and_prints_the_wait() {
    let server = start_server(|_| {
        let mut response =
            error_response(503, "the server is busy (16 requests queued); retry in 2 s");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, "2".parse().unwrap());
        response
    });
    let (code, out, err) = run_args(
        &["mistralctl", "--socket", server.socket(), "generate", "x"],
        "",
    )
    .await;
    assert_eq!(code, exit::BUSY);
    assert_eq!(out, "");
    assert_eq!(
        err,
        "mistralctl: the server is busy (16 requests queued); retry in 2 s (the daemon is busy: retry in 2 s)\n"
    );
}

#[tokio::test]
async fn stream_errors_exit_with_1_after_the_partial_text() {
    let server = start_server(|_| {
        sse_response(vec![
            completion_chunk("partial", None),
            event(
                json!({ "error": { "message": "plugin 'moderation' failed: trap", "type": "server_error", "param": null, "code": null } }),
            ),
        ])
    });
    let (code, out, err) = run_args(
        &["mistralctl", "--socket", server.socket(), "generate", "x"],
        "",
    )
    .await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(out, "partial\n");
    assert_eq!(
        err,
        "mistralctl: the generation failed: plugin 'moderation' failed: trap\n"
    );

    // The connection closes before the end of the reply.
    let server = start_server(|_| sse_response(vec![completion_chunk("cut", None)]));
    let (code, out, err) = run_args(
        &["mistralctl", "--socket", server.socket(), "generate", "x"],
        "",
    )
    .await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(out, "cut\n");
    assert_eq!(
        err,
        "mistralctl: the connection closed before the reply was complete\n"
    );
}

#[tokio::test]
async fn content_filter_exits_with_1_and_prints_the_refusal() {
    let server = start_server(|_| {
        sse_response(vec![
            chat_chunk(json!({ "content": "I'd rather" }), None),
            chat_chunk(
                json!({ "refusal": "blocked by plugin 'moderation': banned word" }),
                Some("content_filter"),
            ),
            done(),
        ])
    });
    let (code, out, err) = run_args(
        &[
            "mistralctl",
            "--socket",
            server.socket(),
            "generate",
            "--chat",
            "x",
        ],
        "",
    )
    .await;
    assert_eq!(code, exit::ERROR);
    assert_eq!(out, "I'd rather\n");
    assert_eq!(
        err,
        "mistralctl: the output was refused: blocked by plugin 'moderation': banned word\n"
    );
}

#[tokio::test]
async fn connect_failure_exits_with_3() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let socket = socket.to_str().unwrap();
    let (code, out, err) = run_args(&["mistralctl", "--socket", socket, "status"], "").await;
    assert_eq!(code, exit::CONNECT);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "mistralctl: cannot connect to {socket}: No such file or directory — is mistrald running?\n"
        )
    );
}

#[tokio::test]
async fn status_readable_and_raw() {
    let status = json!({
        "model": "tiny", "model_path": "/m/tiny.gguf", "window": 64, "context": 256,
        "kv_type": "q8_0", "parallel": 4, "ready": true, "queued": 0, "queue_capacity": 8,
        "active": 1, "prompt_cache_entries": 2, "prompt_cache_bytes": 1048576,
        "tokens_per_second": 100.0, "requests_total": 7, "uptime_seconds": 12.0
    });
    let raw = status.to_string();
    let server = start_server(move |_| json_response(200, status.clone()));
    let (code, out, err) =
        run_args(&["mistralctl", "--socket", server.socket(), "status"], "").await;
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("queue:        0/8\n"), "{out}");
    assert!(out.contains("prompt cache: 2 entries, 1.0 MiB\n"), "{out}");
    assert!(out.contains("uptime:       12s\n"), "{out}");
    let (code, out, _) = run_args(
        &[
            "mistralctl",
            "status",
            "--json",
            "--socket",
            server.socket(),
        ],
        "",
    )
    .await;
    assert_eq!((code, out), (0, format!("{raw}\n")));
    let requests = server.requests();
    assert!(requests
        .iter()
        .all(|r| r.method == "GET" && r.path == "/v1/status" && r.body.is_null()));
}

#[tokio::test]
async fn models_one_per_line() {
    let server = start_server(|_| {
        json_response(
            200,
            json!({ "object": "list", "data": [
                { "id": "mistral-7b", "object": "model", "created": 0, "owned_by": "mistrald" },
                { "id": "other", "object": "model", "created": 0, "owned_by": "mistrald" }
            ] }),
        )
    });
    let (code, out, _) = run_args(&["mistralctl", "--socket", server.socket(), "models"], "").await;
    assert_eq!((code, out.as_str()), (0, "mistral-7b\nother\n"));
    assert_eq!(server.requests()[0].path, "/v1/models");
}

#[tokio::test]
async fn chat_sends_the_whole_history_each_turn() {
    let server = start_server(|r| {
        let messages = r.body["messages"].as_array().unwrap();
        let last = messages.last().unwrap()["content"].as_str().unwrap();
        sse_response(vec![
            chat_chunk(json!({ "role": "assistant" }), None),
            chat_chunk(json!({ "content": format!("re: {last}") }), None),
            chat_chunk(json!({}), Some("stop")),
            done(),
        ])
    });
    let (code, out, err) = run_args(
        &[
            "mistralctl",
            "--socket",
            server.socket(),
            "chat",
            "--system",
            "Be brief.",
            "--seed",
            "1",
        ],
        "hello\n/reset\nagain\n\n  \nsecond\r\n/quit\nnot sent\n",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "", "no prompt when stdin is not a terminal");
    assert_eq!(out, "re: hello\nre: again\nre: second\n");
    let bodies: Vec<Value> = server.requests().into_iter().map(|r| r.body).collect();
    let system = json!({ "role": "system", "content": "Be brief." });
    let user = |c: &str| json!({ "role": "user", "content": c });
    let assistant = |c: &str| json!({ "role": "assistant", "content": c });
    assert_eq!(
        bodies,
        vec![
            json!({ "messages": [system, user("hello")], "stream": true, "seed": 1 }),
            json!({ "messages": [system, user("again")], "stream": true, "seed": 1 }),
            json!({ "messages": [system, user("again"), assistant("re: again"), user("second")],
                    "stream": true, "seed": 1 }),
        ]
    );
}

#[tokio::test]
async fn chat_ends_at_eof_and_stops_at_the_first_error_when_piped() {
    let server = start_server(|_| error_response(400, "bad"));
    let (code, out, err) = run_args(
        &["mistralctl", "--socket", server.socket(), "chat"],
        "one\ntwo\n",
    )
    .await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "mistralctl: bad\n")
    );
    assert_eq!(server.requests().len(), 1);

    let (code, out, err) = run_args(&["mistralctl", "--socket", server.socket(), "chat"], "").await;
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
}

#[tokio::test]
async fn chat_at_a_terminal_drops_a_failed_turn_and_goes_on() {
    // "refuse" gets a 400 (the client's fault: the hint to /reset), "fail" a 500 (no hint);
    // anything else an answer.
    let server = start_server(|r| {
        let messages = r.body["messages"].as_array().unwrap();
        match messages.last().unwrap()["content"].as_str().unwrap() {
            "refuse" => error_response(400, "the prompt is too long"),
            "fail" => error_response(500, "the engine failed"),
            last => sse_response(vec![
                chat_chunk(json!({ "content": format!("re: {last}") }), None),
                chat_chunk(json!({}), Some("stop")),
                done(),
            ]),
        }
    });
    let (code, out, err) = run_at_terminal(
        &["mistralctl", "--socket", server.socket(), "chat"],
        "hello\nrefuse\nfail\nagain\n",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "re: hello\nre: again\n");
    assert!(
        err.contains(
            "mistralctl: the prompt is too long\nmistralctl: (/reset starts a new conversation)\n"
        ),
        "{err}"
    );
    assert!(err.contains("mistralctl: the engine failed\n"), "{err}");
    assert_eq!(
        err.matches("/reset starts a new conversation").count(),
        1,
        "{err}"
    );
    // The failed turns left nothing in the history.
    let user = |c: &str| json!({ "role": "user", "content": c });
    let assistant = |c: &str| json!({ "role": "assistant", "content": c });
    let last = server.requests().pop().unwrap().body;
    assert_eq!(
        last["messages"],
        json!([user("hello"), assistant("re: hello"), user("again")])
    );
}

#[tokio::test]
async fn ctrl_c_during_a_stream_exits_with_130_and_closes_the_connection() {
    let interrupt = Arc::new(tokio::sync::Notify::new());
    let (cancelled_tx, cancelled_rx) = tokio::sync::oneshot::channel::<bool>();
    let cancelled_tx = Arc::new(Mutex::new(Some(cancelled_tx)));
    let fire = interrupt.clone();
    let server = start_server(move |_| {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(1);
        let fire = fire.clone();
        let cancelled = cancelled_tx.lock().unwrap().take();
        tokio::spawn(async move {
            tx.send(completion_chunk("first", None)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            fire.notify_one();
            // Keep streaming until the client is gone (or give up after 10 s).
            let mut gone = false;
            for _ in 0..500 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if tx.send(completion_chunk(" more", None)).await.is_err() {
                    gone = true;
                    break;
                }
            }
            if let Some(c) = cancelled {
                let _ = c.send(gone);
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|s| (Ok::<_, Infallible>(Frame::data(Bytes::from(s))), rx))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    });
    let on_interrupt = move || -> Interrupt {
        let n = interrupt.clone();
        Box::pin(async move { n.notified().await })
    };
    let (code, out, err) = run_with(
        &["mistralctl", "--socket", server.socket(), "generate", "x"],
        "",
        &on_interrupt,
    )
    .await;
    assert_eq!(code, exit::INTERRUPTED);
    assert!(out.starts_with("first") && out.ends_with('\n'), "{out:?}");
    assert_eq!(err, "");
    let gone = tokio::time::timeout(Duration::from_secs(15), cancelled_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(
        gone,
        "the server kept streaming to a client that was interrupted"
    );
}

#[tokio::test]
async fn closed_stdout_pipe_is_silent() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let server = start_server(|_| sse_response(vec![completion_chunk("x", Some("stop")), done()]));
    let cli =
        Cli::try_parse_from(["mistralctl", "--socket", server.socket(), "generate", "x"]).unwrap();
    let mut err = Vec::new();
    let mut input: &[u8] = b"";
    let mut term = Term {
        out: &mut Closed,
        err: &mut err,
        input: &mut input,
        interactive: false,
        interrupt: &never,
        line_open: false,
    };
    assert_eq!(run(cli, &mut term).await, exit::ERROR);
    assert!(err.is_empty());
}
