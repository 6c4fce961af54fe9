//! The API, the prompt cache, the queue bound, signals, sockets, configuration errors and
//! mistralctl, on the bundled trained model.

use crate::common::daemon::{
    block_on, bundled_model, config_long, config_with, generate_cli, request, stream_events,
    stream_events_while, streamed_text, Daemon,
};
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn curl(daemon: &Daemon, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .arg("-sS")
        .arg("--unix-socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .expect("run curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn chat_and_completions_streaming_and_not_with_curl_and_a_rust_client() {
    let d = Daemon::start(&config_with(""), &[]);
    // Completion, not streamed: the same text as `mistrald generate` at temperature 0.
    let prompt = "The meaning of life is";
    let want = generate_cli(prompt, 24, false);
    let (code, v) = d.post_json(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["model"], "fortunes-22m-q8_0");

    // Streamed: chunks, then [DONE]; usage at the end when asked for.
    let (code, events) = d.stream(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    assert_eq!(code, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&events), want);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 24);

    // Chat: rendered with the chat template, like `generate --chat`.
    let question = "Tell me about cats";
    let want_chat = generate_cli(question, 20, true);
    let body = json!({"messages": [{"role": "user", "content": question}],
                      "max_tokens": 20, "temperature": 0});
    let (code, v) = d.post_json("/v1/chat/completions", &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.as_str());
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (_, events) = d.stream("/v1/chat/completions", &streaming);
    assert_eq!(streamed_text(&events), want_chat);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");

    // curl, as the README shows it (curl -d sends a form content type: still JSON to us).
    let (out, err) = curl(
        &d,
        &[
            "http://localhost/v1/chat/completions",
            "-d",
            &body.to_string(),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out} {err}"));
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.as_str());
    let (out, _) = curl(
        &d,
        &[
            "-N",
            "http://localhost/v1/chat/completions",
            "-d",
            &streaming.to_string(),
        ],
    );
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
    let (out, _) = curl(&d, &["http://localhost/v1/models"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["data"][0]["id"], "fortunes-22m-q8_0");

    // The other routes.
    let (code, text) = d.get("/health");
    assert_eq!((code, text.contains("ok")), (200, true));
    let (code, metrics) = d.get("/metrics");
    assert_eq!(code, 200);
    for name in [
        "mistrald_requests_total",
        "mistrald_generated_tokens_total",
        "mistrald_queue_length",
        "mistrald_active_sequences",
        "mistrald_prompt_cache_hits_total",
        "mistrald_time_to_first_token_seconds_bucket",
        "mistrald_step_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let (code, v) = d.post_json("/tokenize", &json!({"content": " Hello, world!"}));
    assert_eq!(code, 200);
    assert_eq!(v["tokens"], json!([29871, 15043, 29892, 3186, 29991]));
    let (code, v) = d.post_json("/detokenize", &json!({"tokens": [15043, 3186]}));
    assert_eq!(
        (code, v["content"].as_str().unwrap().trim()),
        (200, "Hello world")
    );
    let s = d.status();
    assert_eq!(s["window"], 128);
    assert_eq!(s["kv_type"], "f16");
    assert_eq!(s["ready"], true);
    assert!(s["requests_total"].as_u64().unwrap() >= 5);
    // One log line per request with the peer's uid.
    let uid = unsafe { libc::getuid() };
    assert!(
        d.log_text().contains(&format!("from uid:{uid} (pid ")),
        "{}",
        d.log_text()
    );
}

#[test]
fn greedy_text_is_the_same_alone_and_among_seven_other_requests() {
    let d = Daemon::start(&config_with("[server]\nparallel = 8\n"), &[]);
    let prompt = "A man walks into a bar";
    let want = generate_cli(prompt, 40, false);
    let others = [
        "Computers are",
        "Never",
        "Love is",
        "You will be",
        "The best way to",
        "If at first",
        "Money cannot buy",
    ];
    let results = block_on(async {
        let mut tasks = Vec::new();
        for (i, p) in std::iter::once(&prompt).chain(others.iter()).enumerate() {
            let socket = d.socket.clone();
            let body = json!({"prompt": p, "max_tokens": 40, "temperature": if i == 0 { 0.0 } else { 0.9 }, "seed": i});
            tasks.push(tokio::spawn(async move {
                request(
                    &socket,
                    "POST",
                    "/v1/completions",
                    Some(body.to_string().into_bytes()),
                    &[],
                )
                .await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    for (code, _, body) in &results {
        assert_eq!(*code, 200, "{body}");
    }
    let v: Value = serde_json::from_str(&results[0].2).unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str());
}

#[test]
fn a_follow_up_hits_the_prompt_cache_and_disconnecting_frees_the_sequence() {
    let d = Daemon::start(&config_with(""), &[]);
    let first = json!({"messages": [{"role": "user", "content": "Tell me a fortune"}],
                       "max_tokens": 16, "temperature": 0});
    let (_, v) = d.post_json("/v1/chat/completions", &first);
    let reply = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let follow = json!({"messages": [
        {"role": "user", "content": "Tell me a fortune"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Another one"}],
        "max_tokens": 16, "temperature": 0});
    let (_, warm) = d.post_json("/v1/chat/completions", &follow);
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0, "cached_tokens: {warm}");
    // A cold run of the same conversation (another daemon, prompt cache off) agrees.
    let cold_daemon = Daemon::start(&config_with("[prompt_cache]\nentries = 0\n"), &[]);
    let (_, cold) = cold_daemon.post_json("/v1/chat/completions", &follow);
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        warm["choices"][0]["message"]["content"],
        cold["choices"][0]["message"]["content"]
    );

    // Disconnect mid-stream: the sequence is freed.
    let (_, events) = block_on(stream_events(
        &d.socket,
        "/v1/completions",
        &json!({"prompt": "Never", "max_tokens": 30000, "ignore_eos": true, "stream": true})
            .to_string(),
        5,
    ))
    .unwrap();
    assert_eq!(events.len(), 5);
    wait_until("the sequence is freed", Duration::from_secs(10), || {
        d.status()["active"] == 0
    });
    // The request's log line follows the freeing of its sequence.
    let t0 = Instant::now();
    while !d.log_text().contains("finish: cancelled") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no cancelled request in the log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_full_queue_answers_503_with_retry_after_at_once() {
    let d = Daemon::start(
        &config_with("[server]\nparallel = 1\nqueue_size = 1\n"),
        &[],
    );
    let long = json!({"prompt": "Never", "max_tokens": 30000, "ignore_eos": true, "stream": true})
        .to_string();
    let socket = d.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = std::thread::spawn({
        let socket = socket.clone();
        let long = long.clone();
        let stop = stop.clone();
        move || {
            block_on(stream_events_while(
                &socket,
                "/v1/completions",
                &long,
                |_| !stop.load(Ordering::Relaxed),
            ))
        }
    });
    wait_until("one running", Duration::from_secs(10), || {
        d.status()["active"] == 1
    });
    // Second: queued (hold its connection open by streaming).
    let queued = std::thread::spawn({
        let socket = socket.clone();
        move || block_on(stream_events(&socket, "/v1/completions", &long, 1))
    });
    wait_until("one queued", Duration::from_secs(10), || {
        d.status()["queued"] == 1
    });
    let t0 = Instant::now();
    let (code, headers, body) = block_on(request(
        &d.socket,
        "POST",
        "/v1/completions",
        Some(
            json!({"prompt": "Love is", "max_tokens": 4})
                .to_string()
                .into_bytes(),
        ),
        &[],
    ))
    .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(code, 503, "{}", body);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "retry-after" && v.parse::<u64>().is_ok()));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"));
    stop.store(true, Ordering::Relaxed);
    runner.join().unwrap().unwrap();
    queued.join().unwrap().unwrap();
    wait_until("idle", Duration::from_secs(10), || {
        d.status()["active"] == 0 && d.status()["queued"] == 0
    });
}

#[test]
fn sighup_reloads_limits_and_keeps_the_old_config_when_the_new_one_is_invalid() {
    let d = Daemon::start(&config_with("[limits]\ndefault_max_tokens = 3\n"), &[]);
    let ask = || {
        let (_, v) = d.post_json(
            "/v1/completions",
            &json!({"prompt": "Never", "temperature": 0}),
        );
        v["usage"]["completion_tokens"].as_u64().unwrap()
    };
    assert!(ask() <= 3);
    std::fs::write(&d.config, config_with("[limits]\ndefault_max_tokens = 5\n")).unwrap();
    d.signal(libc::SIGHUP);
    wait_until("reloaded", Duration::from_secs(10), || {
        d.log_text().contains("reloaded")
    });
    let n = ask();
    assert!(n > 3 && n <= 5, "{n} tokens after the reload");
    std::fs::write(&d.config, config_with("[limits]\nbogus_key = 1\n")).unwrap();
    d.signal(libc::SIGHUP);
    wait_until("refused", Duration::from_secs(10), || {
        d.log_text().contains("reload refused")
    });
    assert!(d.log_text().contains("bogus_key"), "{}", d.log_text());
    let n = ask();
    assert!(n > 3 && n <= 5, "old limits kept: {n}");
}

#[test]
fn sigterm_during_generation_ends_streams_with_an_error_and_exits_cleanly() {
    let mut d = Daemon::start(&config_long("[server]\nshutdown_grace = 0.5\n"), &[]);
    let socket = d.socket.clone();
    let stream = std::thread::spawn(move || {
        block_on(stream_events(
            &socket,
            "/v1/completions",
            &json!({"prompt": "Never", "max_tokens": 30000, "ignore_eos": true, "stream": true})
                .to_string(),
            usize::MAX,
        ))
    });
    wait_until("generating", Duration::from_secs(10), || {
        d.status()["active"] == 1
    });
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    let (_, events) = stream.join().unwrap().unwrap();
    let last_json = events
        .iter()
        .rev()
        .find(|e| e.as_str() != "[DONE]")
        .unwrap();
    let v: Value = serde_json::from_str(last_json).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("shutting down"),
        "final event: {last_json}"
    );
    assert!(!d.socket.exists(), "the socket is removed");
}

#[test]
fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let d = Daemon::start(&config_with(""), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_mistrald"))
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .arg("--model")
        .arg(bundled_model())
        .env("MISTRALD_CONFIG", "/nonexistent/config.toml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.get("/health").0, 200, "the first daemon still serves");
    // A stale socket file (its daemon died) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let d2 = Daemon::start(&config_with(""), &["--socket", stale.to_str().unwrap()]);
    assert_eq!(
        block_on(request(&stale, "GET", "/health", None, &[]))
            .unwrap()
            .0,
        200
    );
    drop(d2);
}

#[test]
fn configuration_errors_name_key_and_line_before_anything_is_bound() {
    let mut d = Daemon::spawn(&config_with("[server]\nparallel = 0\n"), &[]);
    assert_ne!(d.wait_exit(Duration::from_secs(20)), Some(0));
    let log = d.log_text();
    assert!(
        log.contains("server.parallel") && log.contains("line"),
        "{log}"
    );
    assert!(!d.socket.exists());
    let mut d = Daemon::spawn(&config_with("[server]\nparalel = 2\n"), &[]);
    assert_ne!(d.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(d.log_text().contains("paralel"), "{}", d.log_text());
    let mut d = Daemon::spawn(&config_with(""), &["--parallel", "0"]);
    assert_ne!(d.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(d.log_text().contains("--parallel"), "{}", d.log_text());
    // The printed default configuration is a valid configuration.
    let out = Command::new(env!("CARGO_BIN_EXE_mistrald"))
        .args(["config", "--print-default"])
        .output()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_mistrald"))
        .args(["config", "--check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn mistralctl_generates_chats_and_reports_status() {
    let d = Daemon::start(&config_with(""), &[]);
    let ctl = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_mistralctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let want = generate_cli("Computers are", 20, false);
    let (code, out, err) = ctl(
        &[
            "generate",
            "Computers are",
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--usage",
        ],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.strip_suffix('\n').unwrap(), want);
    assert!(err.contains("20 completion tokens"), "{err}");
    // Chat from a pipe: two turns, the second continues from the prompt cache.
    let (code, out, err) = ctl(
        &[
            "chat",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--usage",
        ],
        Some("Tell me a fortune\nAnother one\n"),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().filter(|l| !l.is_empty()).count() >= 2, "{out}");
    let cached: Vec<u64> = err
        .lines()
        .filter_map(|l| l.split('(').nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        cached.len() == 2 && cached[1] > 0,
        "second turn hits the cache: {err}"
    );
    let (code, out, _) = ctl(&["status"], None);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("fortunes-22m-q8_0") && out.contains("128"),
        "{out}"
    );
    let (code, out, _) = ctl(&["models"], None);
    assert_eq!((code, out.trim()), (Some(0), "fortunes-22m-q8_0"));
    // No daemon: exit code 3.
    let (code, _, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_mistralctl"))
            .args(["--socket", "/nonexistent/m.sock", "status"])
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(3), "{err}");
}
