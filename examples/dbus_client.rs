//! A desktop-application client of mistrald's D-Bus interface, written with a `zbus` proxy:
//! streams a generation to the terminal through the `Token` and `Done` signals, or measures
//! tokens/s through them (`--bench`).
//!
//! ```sh
//! cargo build --examples
//! target/debug/examples/dbus_client "The meaning of life is"          # session bus
//! target/debug/examples/dbus_client --system --chat "Tell me a fortune"
//! target/debug/examples/dbus_client --bench --clients 4 --requests 8 --max-tokens 128
//! ```
//!
//! The interface's contract is `systemd/dbus/org.mistrald.Mistrald1.xml`; the proxy below is all an
//! application needs (copy it). Signals are unicast to the connection that started the request,
//! so a client subscribes to `Token` and `Done` before calling `Generate` or `Chat` and keeps the
//! ones carrying its request id.

#[cfg(feature = "daemon")]
mod client {
    use clap::Parser;
    use futures_util::{FutureExt as _, StreamExt as _};
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::time::{Duration, Instant};
    use zbus::zvariant::{OwnedValue, Value};

    /// The proxy of `org.mistrald.Mistrald1` (generated type: `Mistrald1Proxy`).
    #[zbus::proxy(
        interface = "org.mistrald.Mistrald1",
        default_service = "org.mistrald.Mistrald1",
        default_path = "/org/mistrald/Mistrald1",
        gen_blocking = false
    )]
    trait Mistrald1 {
        /// Starts a completion; returns the request id.
        fn generate(&self, prompt: &str, options: HashMap<&str, Value<'_>>) -> zbus::Result<u64>;
        /// Starts a chat reply to (role, content) messages; returns the request id.
        fn chat(
            &self,
            messages: &[(&str, &str)],
            options: HashMap<&str, Value<'_>>,
        ) -> zbus::Result<u64>;
        /// Cancels a request this connection started.
        fn cancel(&self, request_id: u64) -> zbus::Result<()>;
        /// New text of a request.
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
        /// The served model.
        #[zbus(property)]
        fn model(&self) -> zbus::Result<String>;
    }

    /// Command line.
    #[derive(Parser, Debug)]
    #[command(
        name = "dbus_client",
        about = "Stream a generation from mistrald over D-Bus, or measure tokens/s through its signals"
    )]
    struct Args {
        /// The prompt (with --bench: the prompt of every request)
        #[arg(default_value = "The meaning of life is")]
        prompt: String,
        /// Use the system bus (default: the session bus)
        #[arg(long)]
        system: bool,
        /// Send the prompt as a user message (Chat) instead of a completion (Generate)
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Sampling temperature (0: greedy)
        #[arg(long)]
        temperature: Option<f64>,
        /// Random seed
        #[arg(long)]
        seed: Option<u64>,
        /// Print the token counts and the finish reason on stderr
        #[arg(long)]
        usage: bool,
        /// Measure: every client runs --requests generations of exactly --max-tokens tokens
        /// (ignore_eos, greedy) and the throughput through the signals is printed
        #[arg(long)]
        bench: bool,
        /// --bench: concurrent clients, each on its own bus connection
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// --bench: requests per client
        #[arg(long, default_value_t = 4)]
        requests: usize,
        /// --bench: print the result as one JSON object
        #[arg(long)]
        json: bool,
    }

    /// What one streamed request produced.
    struct Outcome {
        text: String,
        finish_reason: String,
        usage: HashMap<String, OwnedValue>,
        /// Token signals received.
        signals: usize,
        started: Instant,
        first_token: Option<Instant>,
        done: Instant,
    }

    impl Outcome {
        fn count(&self, key: &str) -> u64 {
            self.usage
                .get(key)
                .and_then(|v| u32::try_from(v).ok())
                .map_or(0, u64::from)
        }
    }

    async fn connect(system: bool) -> zbus::Result<zbus::Connection> {
        if system {
            zbus::Connection::system().await
        } else {
            zbus::Connection::session().await
        }
    }

    fn options(args: &Args, bench: bool) -> HashMap<&'static str, Value<'static>> {
        let mut options = HashMap::new();
        options.insert("max_tokens", Value::from(args.max_tokens));
        if let Some(t) = args.temperature {
            options.insert("temperature", Value::from(t));
        }
        if let Some(seed) = args.seed {
            options.insert("seed", Value::from(seed));
        }
        if bench {
            options.insert("temperature", Value::from(0.0));
            options.insert("ignore_eos", Value::from(true));
        }
        options
    }

    /// Runs one request and calls `on_text` with each piece of its text.
    async fn run_request(
        proxy: &Mistrald1Proxy<'_>,
        args: &Args,
        bench: bool,
        mut on_text: impl FnMut(&str),
    ) -> zbus::Result<Outcome> {
        // Subscribe first: the signals follow the reply at once.
        let mut tokens = proxy.receive_token().await?;
        let mut dones = proxy.receive_done().await?;
        let started = Instant::now();
        let id = if args.chat {
            proxy
                .chat(&[("user", args.prompt.as_str())], options(args, bench))
                .await?
        } else {
            proxy.generate(&args.prompt, options(args, bench)).await?
        };
        let mut signals = 0;
        let mut first_token = None;
        loop {
            tokio::select! {
                // Tokens before Done: a Done is always the last signal of its request.
                biased;
                Some(token) = tokens.next() => {
                    let token = token.args()?;
                    if token.request_id == id {
                        signals += 1;
                        first_token.get_or_insert_with(Instant::now);
                        on_text(token.text);
                    }
                }
                Some(done) = dones.next() => {
                    let done = done.args()?;
                    if done.request_id != id {
                        continue;
                    }
                    // Tokens sent before Done may still be queued in the token stream.
                    while let Some(Some(token)) = tokens.next().now_or_never() {
                        let token = token.args()?;
                        if token.request_id == id {
                            signals += 1;
                            on_text(token.text);
                        }
                    }
                    return Ok(Outcome {
                        text: done.text.to_string(),
                        finish_reason: done.finish_reason.to_string(),
                        usage: done.usage,
                        signals,
                        started,
                        first_token,
                        done: Instant::now(),
                    });
                }
                else => return Err(zbus::Error::Failure("the bus connection closed".into())),
            }
        }
    }

    async fn stream(args: &Args) -> Result<(), String> {
        let conn = connect(args.system).await.map_err(|e| e.to_string())?;
        let proxy = Mistrald1Proxy::new(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = std::io::stdout();
        let mut streamed = String::new();
        let outcome = run_request(&proxy, args, false, |text| {
            streamed.push_str(text);
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        })
        .await
        .map_err(|e| e.to_string())?;
        println!();
        // Done carries the whole text as the daemon's plugins left it.
        if outcome.text != streamed && outcome.finish_reason != "error" {
            eprintln!("(the final text, after the plugins: {:?})", outcome.text);
        }
        if args.usage {
            eprintln!(
                "finish reason {}, {} prompt tokens ({} cached), {} completion tokens",
                outcome.finish_reason,
                outcome.count("prompt_tokens"),
                outcome.count("cached_tokens"),
                outcome.count("completion_tokens")
            );
        }
        match outcome.finish_reason.as_str() {
            "stop" | "length" => Ok(()),
            "error" | "cancelled" => Err(outcome
                .usage
                .get("error_message")
                .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
                .unwrap_or_else(|| "the request failed".into())),
            other => Err(format!("the output was stopped ({other})")),
        }
    }

    /// One client of the benchmark: its connection, `requests` generations one after another.
    async fn bench_client(args: &Args) -> Result<Vec<Outcome>, String> {
        let conn = connect(args.system).await.map_err(|e| e.to_string())?;
        let proxy = Mistrald1Proxy::new(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut outcomes = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            let outcome = run_request(&proxy, args, true, |_| {})
                .await
                .map_err(|e| e.to_string())?;
            if outcome.finish_reason != "length" {
                return Err(format!(
                    "a request ended with {} ({:?})",
                    outcome.finish_reason,
                    outcome.usage.get("error_message")
                ));
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn mean(values: &[f64]) -> f64 {
        if values.is_empty() {
            0.0
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    }

    async fn bench(args: &Args) -> Result<(), String> {
        let model = {
            let conn = connect(args.system).await.map_err(|e| e.to_string())?;
            let proxy = Mistrald1Proxy::new(&conn)
                .await
                .map_err(|e| e.to_string())?;
            proxy.model().await.map_err(|e| e.to_string())?
        };
        let t0 = Instant::now();
        let results =
            futures_util::future::join_all((0..args.clients).map(|_| bench_client(args))).await;
        let wall = t0.elapsed();
        let mut outcomes = Vec::new();
        for r in results {
            outcomes.extend(r?);
        }
        let tokens: u64 = outcomes.iter().map(|o| o.count("completion_tokens")).sum();
        let signals: usize = outcomes.iter().map(|o| o.signals).sum();
        let ttft: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.first_token.map(|t| (t - o.started).as_secs_f64() * 1e3))
            .collect();
        // Per request: tokens after the first over the time from the first Token to Done.
        let decode: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| {
                let first = o.first_token?;
                let secs = (o.done - first).as_secs_f64();
                let n = o.count("completion_tokens").saturating_sub(1);
                (secs > 0.0 && n > 0).then(|| n as f64 / secs)
            })
            .collect();
        let rate = tokens as f64 / wall.as_secs_f64().max(f64::MIN_POSITIVE);
        if args.json {
            println!(
                "{{\"model\":\"{model}\",\"clients\":{},\"requests\":{},\"max_tokens\":{},\
                 \"wall_s\":{:.3},\"completion_tokens\":{tokens},\"token_signals\":{signals},\
                 \"tokens_per_second\":{rate:.2},\"decode_tokens_per_second_per_request\":{:.2},\
                 \"time_to_first_token_ms\":{:.2}}}",
                args.clients,
                outcomes.len(),
                args.max_tokens,
                wall.as_secs_f64(),
                mean(&decode),
                mean(&ttft)
            );
        } else {
            println!("model:                      {model}");
            println!(
                "requests:                   {} ({} clients x {}), {} tokens each",
                outcomes.len(),
                args.clients,
                args.requests,
                args.max_tokens
            );
            println!("wall time:                  {:.3} s", wall.as_secs_f64());
            println!("tokens (Done usage):        {tokens} in {signals} Token signals");
            println!("throughput:                 {rate:.1} tokens/s");
            println!("decode per request:         {:.1} tokens/s", mean(&decode));
            println!("time to first token:        {:.1} ms", mean(&ttft));
        }
        Ok(())
    }

    /// Runs the example; the process exit code.
    pub fn main() -> i32 {
        let args = Args::parse();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("dbus_client: cannot start the runtime: {e}");
                return 1;
            }
        };
        let result = runtime.block_on(async {
            if args.bench {
                bench(&args).await
            } else {
                stream(&args).await
            }
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
        match result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("dbus_client: {e}");
                1
            }
        }
    }
}

#[cfg(feature = "daemon")]
fn main() {
    std::process::exit(client::main());
}

#[cfg(not(feature = "daemon"))]
fn main() {
    eprintln!("dbus_client needs mistrald's `daemon` feature (zbus)");
    std::process::exit(2);
}
