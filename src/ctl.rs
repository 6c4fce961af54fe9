//! `mistralctl`: the command-line client of the mistrald daemon.
//!
//! It speaks the daemon's OpenAI-compatible HTTP/1.1 API over its Unix socket:
//!
//! | command | what it does |
//! | --- | --- |
//! | `mistralctl generate PROMPT [--chat [--system TEXT]] [OPTIONS]` | streams the completion of PROMPT (`-`: read from stdin) to stdout; `--chat` sends it as a user message to `/v1/chat/completions` |
//! | `mistralctl chat [--system TEXT] [OPTIONS]` | interactive chat: each line a user message, the whole history sent each turn (so the daemon's prompt cache continues it); `/reset` clears it, `/quit` or EOF ends |
//! | `mistralctl status [--json]` | the daemon's `/v1/status`, readable or raw |
//! | `mistralctl models` | the served model ids, one per line |
//! | `mistralctl bench [--streams 1,2,4,8] [--prompt-tokens P] [--gen-tokens G] [--json] …` | the serving benchmark ([`bench`]): aggregate decode rate of concurrent streams, time to first token idle and under load, follow-up time to first token with and without the prompt cache; also against llama.cpp's `llama-server` with `--url` |
//!
//! OPTIONS: `--max-tokens N --temperature T --top-p P --top-k K --min-p P --repeat-penalty R
//! --seed S --stop TEXT… --no-stream --usage` (`--usage`: token counts and the finish reason on
//! stderr). The socket is `--socket PATH`, else `$MISTRALD_SOCKET`, else
//! `$XDG_RUNTIME_DIR/mistrald.sock` (when set and not root; unless no daemon of the user's is
//! there and the system service's socket exists), else `/run/mistrald/mistrald.sock`
//! ([`default_socket_path`]); or `--url http://HOST:PORT` talks plain HTTP over TCP to that
//! address instead (any OpenAI-compatible server, e.g. llama.cpp's `llama-server`).
//! `--dbus system|session` uses the daemon's D-Bus interface on that bus instead (`ctl/dbus.rs`).
//!
//! Exit codes ([`exit`]):
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success (a `length` finish only adds a note on stderr) |
//! | 1 | the daemon answered with an error, the stream failed, or a plugin refused the output (`content_filter`); the message goes to stderr as `mistralctl: …` |
//! | 2 | usage error (clap's) |
//! | 3 | cannot connect to the socket (or the `--url` address) |
//! | 4 | the daemon is busy (503 with `Retry-After`; the suggested wait is printed) |
//! | 130 | interrupted by Ctrl-C (the connection is dropped, which cancels the request) |

pub mod bench;
mod client;
mod dbus;
pub mod sse;
#[cfg(test)]
mod tests;

use clap::{Args, Parser, Subcommand};
pub use client::HttpUrl;
use client::{Client, CtlError};
use serde_json::{json, Value};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// The exit codes of `mistralctl`.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The daemon answered with an error, a stream failed, or the output was refused.
    pub const ERROR: i32 = 1;
    /// Usage error (from clap).
    pub const USAGE: i32 = 2;
    /// Cannot connect to the daemon's socket.
    pub const CONNECT: i32 = 3;
    /// The daemon is busy (503 with `Retry-After`).
    pub const BUSY: i32 = 4;
    /// Interrupted by Ctrl-C.
    pub const INTERRUPTED: i32 = 130;
}

/// The socket when `/run` is used (root, or no `XDG_RUNTIME_DIR`).
pub const SYSTEM_SOCKET: &str = crate::config::SYSTEM_SOCKET_PATH;

const LONG_ABOUT: &str = "\
Command-line client of the mistrald daemon: talks to its OpenAI-compatible HTTP API on its \
Unix socket.

The socket is --socket PATH, else $MISTRALD_SOCKET, else $XDG_RUNTIME_DIR/mistrald.sock (when \
XDG_RUNTIME_DIR is set and the user is not root, unless that socket does not exist and the \
system service's does), else /run/mistrald/mistrald.sock. \
--url http://HOST:PORT talks plain HTTP over TCP to that address instead (any OpenAI-compatible \
server, such as llama.cpp's llama-server). --dbus system|session uses the daemon's D-Bus \
interface org.mistrald.Mistrald1 on that bus instead (generate, chat, status, models).

Exit status:
  0    success (a reply cut at the token limit only adds a note on stderr)
  1    the daemon answered with an error, the stream failed, or a plugin refused the output
       (finish reason content_filter)
  2    usage error
  3    cannot connect to the daemon's socket (or the --url address)
  4    the daemon is busy (503 with Retry-After): try again after the printed wait
  130  interrupted by Ctrl-C (the request is cancelled)";

/// The command line of `mistralctl`.
#[derive(Debug, Parser)]
#[command(
    name = "mistralctl",
    version,
    about = "Command-line client of the mistrald daemon",
    long_about = LONG_ABOUT
)]
pub struct Cli {
    /// The daemon's Unix socket [default: $MISTRALD_SOCKET, else $XDG_RUNTIME_DIR/mistrald.sock
    /// when not root and it exists, else /run/mistrald/mistrald.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Talk plain HTTP over TCP to this address instead of the socket: http://HOST:PORT (no
    /// TLS; for llama.cpp's llama-server and other OpenAI-compatible servers)
    #[arg(
        long,
        global = true,
        value_name = "URL",
        value_parser = HttpUrl::parse,
        conflicts_with = "socket"
    )]
    pub url: Option<HttpUrl>,
    /// Use the daemon's D-Bus interface on this bus instead of the socket: system or session
    /// (none: the socket)
    #[arg(long, global = true, value_name = "BUS", conflicts_with_all = ["socket", "url"])]
    pub dbus: Option<crate::config::DbusBus>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `self`, or the usage error clap cannot find itself: `--socket` and `--url` given on
    /// different levels (`mistralctl --socket S bench --url U`).
    pub fn checked(self) -> Result<Cli, clap::Error> {
        if self.socket.is_some() && self.url.is_some() {
            return Err(<Cli as clap::CommandFactory>::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "the argument '--socket <PATH>' cannot be used with '--url <URL>'",
            ));
        }
        Ok(self)
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion of PROMPT, streamed to stdout
    Generate(GenerateArgs),
    /// Chat interactively: each line of stdin is a user message, the reply is streamed
    ///
    /// The whole conversation (system, user and assistant turns) is sent each turn, so the
    /// daemon's prompt cache continues it. `/reset` clears the conversation; `/quit` or end of
    /// input ends the chat. The `> ` prompt (on stderr) is shown only when stdin is a terminal.
    Chat(ChatArgs),
    /// Show the daemon's status
    Status {
        /// Print the raw JSON of /v1/status
        #[arg(long)]
        json: bool,
    },
    /// List the served models, one id per line
    Models,
    /// Benchmark the server: concurrent decode rate, time to first token, prompt cache
    ///
    /// Every request is a streamed POST /v1/completions (temperature 0, ignore_eos, the token
    /// counts from usage), so mistrald and llama.cpp's llama-server (--url) get exactly the same
    /// requests. Prompts are common English words, each request's starting differently, so no
    /// prompt cache helps except where the follow-up phase means it to. Progress goes to stderr,
    /// the results to stdout (a table, or one JSON object with --json).
    Bench(bench::BenchArgs),
}

/// `mistralctl generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt; `-` reads it from stdin (one trailing newline is removed)
    pub prompt: String,
    /// Send the prompt as a user message to /v1/chat/completions (the model's chat template)
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat)
    #[arg(long, value_name = "TEXT", requires = "chat")]
    pub system: Option<String>,
    /// Generation settings.
    #[command(flatten)]
    pub options: RequestOptions,
}

/// `mistralctl chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// System message, first in the conversation
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Generation settings.
    #[command(flatten)]
    pub options: RequestOptions,
}

/// Generation settings shared by `generate` and `chat` (range-checked by the daemon).
#[derive(Clone, Debug, Default, Args)]
pub struct RequestOptions {
    /// Most tokens to generate [default: the daemon's]
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    /// Sampling temperature (0: greedy)
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens
    #[arg(long, value_name = "K")]
    pub top_k: Option<u64>,
    /// Drop tokens less likely than P times the most likely one
    #[arg(long, value_name = "P")]
    pub min_p: Option<f64>,
    /// Penalty for tokens already in the context (1: none)
    #[arg(long, value_name = "R")]
    pub repeat_penalty: Option<f64>,
    /// Random seed, for reproducible sampling
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable)
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Wait for the whole reply instead of streaming it
    #[arg(long)]
    pub no_stream: bool,
    /// Print the token counts (prompt, cached, completion) and the finish reason on stderr
    #[arg(long)]
    pub usage: bool,
}

impl RequestOptions {
    /// The request body: `input` (`prompt` or `messages`) plus the settings that were given.
    fn body(&self, input: (&str, Value)) -> Value {
        let mut body = serde_json::Map::new();
        body.insert(input.0.to_string(), input.1);
        let stream = !self.no_stream;
        body.insert("stream".into(), json!(stream));
        if stream && self.usage {
            body.insert("stream_options".into(), json!({ "include_usage": true }));
        }
        let numbers = [
            ("max_tokens", self.max_tokens.map(Value::from)),
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            ("top_k", self.top_k.map(Value::from)),
            ("min_p", self.min_p.map(Value::from)),
            ("repeat_penalty", self.repeat_penalty.map(Value::from)),
            ("seed", self.seed.map(Value::from)),
        ];
        for (name, value) in numbers {
            if let Some(value) = value {
                body.insert(name.into(), value);
            }
        }
        if !self.stop.is_empty() {
            body.insert("stop".into(), json!(self.stop));
        }
        Value::Object(body)
    }
}

/// The socket to use without `--socket`: `$MISTRALD_SOCKET`, else
/// `$XDG_RUNTIME_DIR/mistrald.sock` when that is set and the user is not root, else
/// [`SYSTEM_SOCKET`]. A user whose own socket does not exist while the system service's does
/// (the packaged daemon) gets the system service's.
pub fn default_socket_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    socket_path_from(
        std::env::var_os("MISTRALD_SOCKET"),
        std::env::var_os("XDG_RUNTIME_DIR"),
        root,
        &|p| p.exists(),
    )
}

/// `$MISTRALD_SOCKET` when set, else the daemon's own default for this runtime directory and
/// user ([`crate::config::socket_path_for`]), so client and daemon always agree — unless that
/// path does not `exist` and the system service's socket does.
fn socket_path_from(
    socket: Option<std::ffi::OsString>,
    runtime_dir: Option<std::ffi::OsString>,
    root: bool,
    exists: &dyn Fn(&std::path::Path) -> bool,
) -> PathBuf {
    match socket {
        Some(socket) if !socket.is_empty() => PathBuf::from(socket),
        _ => {
            let own = crate::config::socket_path_for(runtime_dir, if root { 0 } else { u32::MAX });
            let system = PathBuf::from(SYSTEM_SOCKET);
            if own != system && !exists(&own) && exists(&system) {
                system
            } else {
                own
            }
        }
    }
}

/// Entry point of `mistralctl`: parses the command line, runs the command and returns the
/// process exit code (see [`exit`]).
pub fn main() -> i32 {
    let cli = match Cli::try_parse().and_then(Cli::checked) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mistralctl: cannot start the async runtime: {e}");
            return exit::ERROR;
        }
    };
    // SAFETY: isatty only inspects the descriptor.
    let interactive = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    let code = runtime.block_on(async {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut err = std::io::stderr();
        let mut input = tokio::io::BufReader::new(tokio::io::stdin());
        let interrupt = || -> Interrupt {
            Box::pin(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        };
        let mut term = Term {
            out: &mut out,
            err: &mut err,
            input: &mut input,
            interactive,
            interrupt: &interrupt,
            line_open: false,
        };
        run(cli, &mut term).await
    });
    // Stdin is read on a blocking thread that cannot be cancelled: do not wait for it.
    runtime.shutdown_background();
    code
}

/// A future that completes when the user interrupts (Ctrl-C).
type Interrupt = Pin<Box<dyn Future<Output = ()>>>;

/// Where a command reads and writes (the process's stdio, or buffers in tests).
struct Term<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    input: &'a mut (dyn AsyncBufRead + Unpin),
    /// Whether stdin is a terminal (the chat prompt is shown).
    interactive: bool,
    /// Starts watching for an interrupt.
    interrupt: &'a dyn Fn() -> Interrupt,
    /// Whether text was written to `out` since the last newline this module wrote.
    line_open: bool,
}

/// Runs a parsed command line; returns the exit code.
async fn run(cli: Cli, term: &mut Term<'_>) -> i32 {
    if let Some(bus) = cli.dbus.filter(|b| *b != crate::config::DbusBus::None) {
        return dbus::run(bus, cli.command, term).await;
    }
    let client = match cli.url.clone() {
        Some(url) => Client::tcp(url),
        None => Client::new(cli.socket.clone().unwrap_or_else(default_socket_path)),
    };
    let result = match cli.command {
        Command::Generate(args) => generate(&client, &args, term).await,
        Command::Chat(args) => chat(&client, &args, term).await,
        Command::Status { json } => status(&client, json, term).await,
        Command::Models => models(&client, term).await,
        Command::Bench(args) => bench::bench(&client, &args, term).await,
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            term.report_error(&e);
            e.exit_code()
        }
    }
}

/// What a generation request produced.
#[derive(Clone, Debug, Default, PartialEq)]
struct Outcome {
    /// The generated text.
    text: String,
    /// `stop`, `length`, `content_filter` (`None` when the daemon sent none).
    finish_reason: Option<String>,
    /// A plugin's refusal, when it gave one.
    refusal: Option<String>,
    /// Token counts, when reported.
    usage: Option<Usage>,
}

/// The counts of an OpenAI usage object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
}

impl Usage {
    fn from_json(value: &Value) -> Option<Usage> {
        let count = |pointer: &str| value.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
        value.is_object().then(|| Usage {
            prompt_tokens: count("/prompt_tokens"),
            cached_tokens: count("/prompt_tokens_details/cached_tokens"),
            completion_tokens: count("/completion_tokens"),
        })
    }
}

impl Outcome {
    /// Takes in one streamed chunk; returns the new text it carries.
    fn apply_chunk(&mut self, chunk: &Value, chat: bool) -> Result<String, CtlError> {
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            return Err(CtlError::Stream(message));
        }
        if let Some(usage) = chunk.get("usage").and_then(Usage::from_json) {
            self.usage = Some(usage);
        }
        let mut text = String::new();
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        {
            let piece = if chat {
                choice.pointer("/delta/content")
            } else {
                choice.get("text")
            };
            if let Some(piece) = piece.and_then(Value::as_str) {
                text.push_str(piece);
            }
            self.take_refusal(choice.pointer("/delta/refusal"));
            self.take_refusal(choice.get("refusal"));
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        self.text.push_str(&text);
        Ok(text)
    }

    /// The outcome of a whole (non-streamed) response.
    fn from_response(response: &Value, chat: bool) -> Result<Outcome, CtlError> {
        let choice = response
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .ok_or_else(|| CtlError::Protocol("the daemon's answer has no choices".into()))?;
        let text = if chat {
            choice.pointer("/message/content")
        } else {
            choice.get("text")
        };
        let mut outcome = Outcome {
            text: text.and_then(Value::as_str).unwrap_or("").to_string(),
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string),
            refusal: None,
            usage: response.get("usage").and_then(Usage::from_json),
        };
        outcome.take_refusal(choice.pointer("/message/refusal"));
        outcome.take_refusal(choice.get("refusal"));
        Ok(outcome)
    }

    fn take_refusal(&mut self, refusal: Option<&Value>) {
        if let Some(r) = refusal.and_then(Value::as_str) {
            self.refusal.get_or_insert_with(String::new).push_str(r);
        }
    }
}

impl Term<'_> {
    /// Prints an error as `mistralctl: …` on stderr (nothing for Ctrl-C or a closed stdout).
    fn report_error(&mut self, e: &CtlError) {
        if let Some(message) = e.message() {
            let _ = writeln!(self.err, "mistralctl: {message}");
        }
    }

    /// Whether a failed chat turn is dropped and the chat goes on (at a terminal, unless
    /// stdout itself failed) instead of ending `mistralctl chat`.
    fn survives_failed_turn(&self, e: &CtlError) -> bool {
        self.interactive && !matches!(e, CtlError::Output(_))
    }

    /// Reports a chat turn that failed at a terminal (see [`Term::survives_failed_turn`]):
    /// an interruption as such, a request the daemon refused with a hint that `/reset`
    /// starts over, anything else as an error.
    fn report_failed_turn(&mut self, e: &CtlError) {
        match e {
            CtlError::Interrupted => {
                let _ = writeln!(self.err, "mistralctl: interrupted");
            }
            CtlError::Daemon { status, .. } if status.is_client_error() => {
                self.report_error(e);
                let _ = writeln!(self.err, "mistralctl: (/reset starts a new conversation)");
            }
            _ => self.report_error(e),
        }
    }

    fn write_out(&mut self, text: &str) -> Result<(), CtlError> {
        if text.is_empty() {
            return Ok(());
        }
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(CtlError::Output)?;
        self.line_open = !text.ends_with('\n');
        Ok(())
    }

    /// Sends a generation request and writes its text to stdout as it arrives, then a
    /// newline; on Ctrl-C, drops the connection. After a failure, ends the line it started.
    async fn generate_text(
        &mut self,
        client: &Client,
        chat: bool,
        body: &Value,
    ) -> Result<Outcome, CtlError> {
        let mut interrupt = (self.interrupt)();
        let result = tokio::select! {
            biased;
            _ = &mut interrupt => Err(CtlError::Interrupted),
            result = self.exchange(client, chat, body) => result,
        };
        match &result {
            Ok(_) => {
                self.write_out("\n")?;
            }
            Err(_) if self.line_open => {
                let _ = self.write_out("\n");
            }
            Err(_) => {}
        }
        self.line_open = false;
        result
    }

    async fn exchange(
        &mut self,
        client: &Client,
        chat: bool,
        body: &Value,
    ) -> Result<Outcome, CtlError> {
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let mut reply = client.post_json(path, body).await?;
        if !reply.is_event_stream() {
            let outcome = Outcome::from_response(&reply.json().await?, chat)?;
            self.write_out(&outcome.text)?;
            return Ok(outcome);
        }
        let mut parser = sse::SseParser::new();
        let mut outcome = Outcome::default();
        while let Some(bytes) = reply.chunk().await? {
            for event in parser.push(&bytes) {
                let Some(chunk) = sse::chunk_json(event)? else {
                    return Ok(outcome);
                };
                let text = outcome.apply_chunk(&chunk, chat)?;
                self.write_out(&text)?;
            }
        }
        if outcome.finish_reason.is_some() {
            Ok(outcome)
        } else {
            Err(CtlError::Protocol(
                "the connection closed before the reply was complete".into(),
            ))
        }
    }

    /// After a reply: the usage line (when asked), a note for `length`, an error for
    /// `content_filter`.
    fn finish(&mut self, outcome: &Outcome, usage: bool) -> Result<(), CtlError> {
        let reason = outcome.finish_reason.as_deref().unwrap_or("unknown");
        if usage {
            let line = match &outcome.usage {
                Some(u) => format!(
                    "mistralctl: usage: {} prompt tokens ({} cached), {} completion tokens; finish reason: {reason}",
                    u.prompt_tokens, u.cached_tokens, u.completion_tokens
                ),
                None => format!(
                    "mistralctl: usage: not reported by the daemon; finish reason: {reason}"
                ),
            };
            let _ = writeln!(self.err, "{line}");
        }
        match reason {
            "length" => {
                let _ = writeln!(
                    self.err,
                    "mistralctl: note: the reply was cut at the token limit (finish reason: length)"
                );
                Ok(())
            }
            "content_filter" => Err(CtlError::Refused(
                outcome.refusal.clone().filter(|r| !r.is_empty()),
            )),
            _ => Ok(()),
        }
    }
}

async fn generate(
    client: &Client,
    args: &GenerateArgs,
    term: &mut Term<'_>,
) -> Result<(), CtlError> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        term.input
            .read_to_string(&mut text)
            .await
            .map_err(CtlError::Input)?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        text
    } else {
        args.prompt.clone()
    };
    let body = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(json!({ "role": "system", "content": system }));
        }
        messages.push(json!({ "role": "user", "content": prompt }));
        args.options.body(("messages", Value::Array(messages)))
    } else {
        args.options.body(("prompt", Value::String(prompt)))
    };
    let outcome = term.generate_text(client, args.chat, &body).await?;
    term.finish(&outcome, args.options.usage)
}

/// What a line typed in `chat` asks for.
enum ChatLine {
    /// A user message.
    Message(String),
    /// `/reset`: forget the conversation (the system message stays).
    Reset,
    /// `/quit`, `/exit` or end of input.
    Quit,
}

impl Term<'_> {
    /// Reads the next chat line (prompting with `> ` on a terminal), skipping blank lines;
    /// Ctrl-C is [`CtlError::Interrupted`]. Shared by the socket and D-Bus chats.
    async fn read_chat_line(&mut self) -> Result<ChatLine, CtlError> {
        loop {
            if self.interactive {
                let _ = write!(self.err, "> ");
                let _ = self.err.flush();
            }
            let mut line = String::new();
            let mut interrupt = (self.interrupt)();
            let read = tokio::select! {
                biased;
                _ = &mut interrupt => {
                    if self.interactive {
                        let _ = writeln!(self.err);
                    }
                    return Err(CtlError::Interrupted);
                }
                read = self.input.read_line(&mut line) => read.map_err(CtlError::Input)?,
            };
            if read == 0 {
                if self.interactive {
                    let _ = writeln!(self.err);
                }
                return Ok(ChatLine::Quit);
            }
            let message = line.trim_end_matches(['\n', '\r']);
            match message.trim() {
                "" => continue,
                "/quit" | "/exit" => return Ok(ChatLine::Quit),
                "/reset" => {
                    if self.interactive {
                        let _ = writeln!(self.err, "(conversation cleared)");
                    }
                    return Ok(ChatLine::Reset);
                }
                _ => return Ok(ChatLine::Message(message.to_string())),
            }
        }
    }
}

async fn chat(client: &Client, args: &ChatArgs, term: &mut Term<'_>) -> Result<(), CtlError> {
    let mut history = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({ "role": "system", "content": system }));
    }
    let kept = history.len();
    if term.interactive {
        let _ = writeln!(
            term.err,
            "mistralctl chat ({}): /reset clears the conversation, /quit or Ctrl-D ends it",
            client.endpoint()
        );
    }
    loop {
        let message = match term.read_chat_line().await? {
            ChatLine::Quit => return Ok(()),
            ChatLine::Reset => {
                history.truncate(kept);
                continue;
            }
            ChatLine::Message(message) => message,
        };
        history.push(json!({ "role": "user", "content": message }));
        let body = args
            .options
            .body(("messages", Value::Array(history.clone())));
        let result = match term.generate_text(client, true, &body).await {
            Ok(outcome) => term.finish(&outcome, args.options.usage).map(|()| outcome),
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => history.push(json!({ "role": "assistant", "content": outcome.text })),
            // At a terminal, a failed or interrupted turn is dropped and the chat goes on.
            Err(e) if term.survives_failed_turn(&e) => {
                history.pop();
                term.report_failed_turn(&e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `/v1/status` as the daemon reports it (every field optional, for older or newer daemons).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
struct StatusView {
    model: String,
    model_path: String,
    window: Option<u64>,
    context: u64,
    kv_type: String,
    parallel: u64,
    ready: bool,
    queued: u64,
    queue_capacity: u64,
    active: u64,
    prompt_cache_entries: u64,
    prompt_cache_bytes: u64,
    tokens_per_second: f64,
    requests_total: u64,
    uptime_seconds: f64,
}

/// The readable form of a status, one `name: value` line each, ending with a newline.
fn format_status(s: &StatusView) -> String {
    let model = if s.model_path.is_empty() {
        s.model.clone()
    } else {
        format!("{} ({})", s.model, s.model_path)
    };
    let window = match s.window {
        Some(w) => format!("{w} positions (sliding window)"),
        None => "none (full attention)".to_string(),
    };
    let rows = [
        ("model", model),
        ("window", window),
        ("context", format!("{} tokens", s.context)),
        ("KV type", s.kv_type.clone()),
        ("parallel", s.parallel.to_string()),
        (
            "ready",
            if s.ready { "yes" } else { "no (loading)" }.to_string(),
        ),
        ("queue", format!("{}/{}", s.queued, s.queue_capacity)),
        ("active", s.active.to_string()),
        (
            "prompt cache",
            format!(
                "{} entries, {:.1} MiB",
                s.prompt_cache_entries,
                s.prompt_cache_bytes as f64 / (1024.0 * 1024.0)
            ),
        ),
        ("tokens/s", format!("{:.1}", s.tokens_per_second)),
        ("requests", s.requests_total.to_string()),
        ("uptime", format_duration(s.uptime_seconds)),
    ];
    rows.iter()
        .map(|(name, value)| format!("{:<14}{value}\n", format!("{name}:")))
        .collect()
}

/// `3d 4h 5m 6s`, leading zero units left out.
fn format_duration(seconds: f64) -> String {
    let total = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    let (d, h, m, s) = (
        total / 86400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

async fn status(client: &Client, raw: bool, term: &mut Term<'_>) -> Result<(), CtlError> {
    let reply = client.get("/v1/status").await?;
    if raw {
        let bytes = reply.bytes().await?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        return term.write_out(&text);
    }
    let value = reply.json().await?;
    let status: StatusView = serde_json::from_value(value)
        .map_err(|e| CtlError::Protocol(format!("unexpected /v1/status answer: {e}")))?;
    term.write_out(&format_status(&status))
}

async fn models(client: &Client, term: &mut Term<'_>) -> Result<(), CtlError> {
    let value = client.get("/v1/models").await?.json().await?;
    let data = value
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| CtlError::Protocol("unexpected /v1/models answer: no data".into()))?;
    let mut text = String::new();
    for id in data
        .iter()
        .filter_map(|m| m.get("id").and_then(Value::as_str))
    {
        text.push_str(id);
        text.push('\n');
    }
    term.write_out(&text)
}
