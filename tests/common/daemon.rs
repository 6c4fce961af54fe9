//! The real `mistrald serve` process for daemon tests, and a real HTTP client (hyper) that
//! talks to it over its Unix socket.
#![allow(dead_code)]

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

/// A running daemon in its own temporary directory; killed on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// The bundled model.
pub fn bundled_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fortunes-22m-q8_0.gguf")
}

impl Daemon {
    /// Starts `mistrald serve` with `config` (TOML) and extra flags, and waits until `/health`
    /// answers 200.
    pub fn start(config: &str, flags: &[&str]) -> Daemon {
        let d = Daemon::spawn(config, flags);
        d.wait_ready();
        d
    }

    /// Starts it without waiting.
    pub fn spawn(config: &str, flags: &[&str]) -> Daemon {
        Daemon::spawn_custom(config, flags, false, |_| {})
    }

    /// [`Daemon::spawn`] with `customize` applied to the command before it starts. With
    /// `listen_pid`, the daemon gets `LISTEN_PID` = its own pid, as a service manager sets it
    /// for socket activation: it is started through `sh -c 'LISTEN_PID=$$ exec mistrald …'`
    /// (`exec` keeps the shell's pid).
    pub fn spawn_custom(
        config: &str,
        flags: &[&str],
        listen_pid: bool,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let given = flags
            .iter()
            .position(|f| *f == "--socket")
            .and_then(|i| flags.get(i + 1));
        let socket = given.map_or_else(|| dir.path().join("mistrald.sock"), PathBuf::from);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("daemon.log");
        let bin = env!("CARGO_BIN_EXE_mistrald");
        let mut command = if listen_pid {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"",
                bin,
            ]);
            c
        } else {
            Command::new(bin)
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(if given.is_some() {
                Vec::new()
            } else {
                vec!["--socket".into(), socket.clone().into_os_string()]
            })
            .args(flags)
            .env("MISTRALD_CONFIG", dir.path().join("no-system-config.toml"))
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("CACHE_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        customize(&mut command);
        let child = command.spawn().expect("start mistrald serve");
        Daemon {
            child: Some(child),
            dir,
            socket,
            config: config_path,
            log,
        }
    }

    /// Waits until `/health` answers 200 (panics with the log after 60 s or if it exits).
    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Some(child) = &self.child {
                // A daemon that exited will never be ready.
                let pid = child.id() as i32;
                if unsafe { libc::kill(pid, 0) } != 0 {
                    panic!("mistrald exited:\n{}", self.log_text());
                }
            }
            if self.socket.exists() {
                if let Ok((200, _)) = block_on(try_get(&self.socket, "/health")) {
                    return;
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                panic!("mistrald not ready after 60 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if t0.elapsed() > limit {
                panic!(
                    "mistrald still running after {limit:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// GET `path`: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = block_on(request(&self.socket, "GET", path, None, &[])).unwrap();
        (status, body)
    }

    /// POST `body` (JSON) to `path`: status and body.
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (status, _, body) = block_on(request(
            &self.socket,
            "POST",
            path,
            Some(body.as_bytes().to_vec()),
            &[],
        ))
        .unwrap();
        (status, body)
    }

    /// POST and parse the JSON answer.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.post(path, &body.to_string());
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        (status, json)
    }

    /// `GET /v1/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, text) = self.get("/v1/status");
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// POST a streaming request; returns the `data:` payloads of every event.
    pub fn stream(&self, path: &str, body: &serde_json::Value) -> (u16, Vec<String>) {
        block_on(stream_events(
            &self.socket,
            path,
            &body.to_string(),
            usize::MAX,
        ))
        .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a future on a fresh current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn try_get(socket: &Path, path: &str) -> anyhow::Result<(u16, String)> {
    let (s, _, b) = request(socket, "GET", path, None, &[]).await?;
    Ok((s, b))
}

/// One HTTP/1.1 request over the Unix socket: status, headers, body text.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Vec<(String, String)>, String)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    let status: StatusCode = resp.status();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status.as_u16(),
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// POSTs `body` and reads the SSE answer: status and every event's `data:` payload, stopping
/// (and dropping the connection) after `max_events` events.
pub async fn stream_events(
    socket: &Path,
    path: &str,
    body: &str,
    max_events: usize,
) -> anyhow::Result<(u16, Vec<String>)> {
    stream_events_while(socket, path, body, |events| events.len() < max_events).await
}

/// Like [`stream_events`], reading while `more(events so far)` says so.
pub async fn stream_events_while(
    socket: &Path,
    path: &str,
    body: &str,
    mut more: impl FnMut(&[String]) -> bool,
) -> anyhow::Result<(u16, Vec<String>)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let mut resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    events.push(d.trim().to_string());
                }
            }
            if !more(&events) {
                drop(resp);
                conn.abort();
                return Ok((status, events));
            }
        }
    }
    Ok((status, events))
}

/// Sends `head` (request line, headers and any part of a body) on a raw connection and reads
/// what the server answers until it closes or `limit` passes.
pub fn raw_exchange(socket: &Path, head: &[u8], limit: Duration) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let _ = s.write_all(head);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The text of a streamed chat or completion: the concatenated deltas.
pub fn streamed_text(events: &[String]) -> String {
    let mut out = String::new();
    for e in events {
        if e == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
            if let Some(t) = c["delta"]["content"].as_str() {
                out.push_str(t);
            }
            if let Some(t) = c["text"].as_str() {
                out.push_str(t);
            }
        }
    }
    out
}

/// `mistrald generate` (greedy) of `prompt` with the bundled model: the reference text.
pub fn generate_cli(prompt: &str, max_tokens: usize, chat: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mistrald"));
    cmd.args(["generate", "--temperature", "0", "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--model")
        .arg(bundled_model())
        .arg("--prompt")
        .arg(prompt);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // `generate` ends its output with a newline.
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

/// A config file for the bundled model with `extra` TOML appended.
pub fn config_with(extra: &str) -> String {
    format!(
        "[model]\npath = \"{}\"\nthreads = 2\n\n{extra}\n",
        bundled_model().display()
    )
}

/// [`config_with`] with a context of a million positions, so a request can generate for as
/// long as a test needs (the 128-position window keeps the KV cache small).
pub fn config_long(extra: &str) -> String {
    format!(
        "[model]\npath = \"{}\"\nthreads = 2\nctx_size = 1000000\n\n{extra}\n",
        bundled_model().display()
    )
}
