//! `mistralctl --dbus system|session`: the same commands over the daemon's D-Bus interface
//! `org.mistrald.Mistrald1` instead of its socket.
//!
//! `generate` and `chat` call `Generate` / `Chat` and print the `Token` signals as they arrive
//! (with `--no-stream`, `Done`'s whole text at the end); Ctrl-C calls `Cancel`. `status` reads
//! the interface's properties, `models` its `Model`. `bench` measures the HTTP API only
//! (`examples/dbus_client --bench` measures through D-Bus). Exit codes are those of the socket
//! transport: 3 when the bus or the daemon on it cannot be reached (or the bus's policy denies
//! the call), 4 for `Busy`, 1 for the other errors, which are printed with their D-Bus name.

use super::client::CtlError;
use super::{exit, ChatArgs, Command, GenerateArgs, Outcome, RequestOptions, Term, Usage};
use crate::api::dbus::{Mistrald1Proxy, BUS_NAME, ERROR_PREFIX, INTERFACE};
use crate::config::DbusBus;
use futures_util::{FutureExt as _, StreamExt as _};
use hyper::StatusCode;
use std::collections::HashMap;
use tokio::io::AsyncReadExt as _;
use zbus::zvariant::{OwnedValue, Value};

/// Why a command over D-Bus failed.
enum Failure {
    /// As over the socket (printed by [`Term::report_error`], exit code of the error).
    Ctl(CtlError),
    /// The bus, or the daemon on it, cannot be reached or may not be called (exit 3).
    Unreachable(String),
}

impl From<CtlError> for Failure {
    fn from(e: CtlError) -> Failure {
        Failure::Ctl(e)
    }
}

/// The bus in words.
fn bus_words(bus: DbusBus) -> &'static str {
    match bus {
        DbusBus::System => "the system bus",
        _ => "the session bus",
    }
}

/// A failed call, as `mistralctl` reports it.
fn call_error(bus: DbusBus, e: zbus::Error) -> Failure {
    use zbus::DBusError as _;
    let (name, message) = match &e {
        zbus::Error::MethodError(name, message, _) => {
            (name.to_string(), message.clone().unwrap_or_default())
        }
        // Property reads report the standard errors this way.
        zbus::Error::FDO(fdo) => (
            fdo.name().to_string(),
            fdo.description().unwrap_or_default().to_string(),
        ),
        _ => return Failure::Ctl(CtlError::Protocol(format!("the D-Bus call failed: {e}"))),
    };
    let name = name.as_str();
    match name {
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner"
        | "org.freedesktop.DBus.Error.Spawn.ChildExited"
        | "org.freedesktop.DBus.Error.TimedOut"
        | "org.freedesktop.DBus.Error.NoReply" => Failure::Unreachable(format!(
            "{BUS_NAME} is not available on {}: {message} — is mistrald running with \
             dbus = \"{}\"?",
            bus_words(bus),
            bus.as_str()
        )),
        "org.freedesktop.DBus.Error.AccessDenied" => Failure::Unreachable(format!(
            "{} does not let this user call {BUS_NAME}: {message}{}",
            bus_words(bus),
            if bus == DbusBus::System {
                " — ask to be added to the group mistrald"
            } else {
                ""
            }
        )),
        _ => match name
            .strip_prefix(ERROR_PREFIX)
            .and_then(|n| n.strip_prefix('.'))
        {
            Some("Busy") => match message.split_once("; retry in ") {
                Some((text, wait)) => Failure::Ctl(CtlError::Busy {
                    message: text.to_string(),
                    retry_after: wait.trim_end_matches(" s").to_string(),
                }),
                None => Failure::Ctl(CtlError::Daemon {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message,
                }),
            },
            Some(kind) => {
                let status = match kind {
                    "InvalidArgument" | "Rejected" => StatusCode::BAD_REQUEST,
                    "AccessDenied" => StatusCode::FORBIDDEN,
                    "NotFound" => StatusCode::NOT_FOUND,
                    "NotReady" | "ShuttingDown" => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Failure::Ctl(CtlError::Daemon {
                    status,
                    message: format!("{message} ({name})"),
                })
            }
            None => Failure::Ctl(CtlError::Protocol(format!(
                "the D-Bus call failed: {name}: {message}"
            ))),
        },
    }
}

/// Runs a command over `bus`; returns the exit code.
pub(super) async fn run(bus: DbusBus, command: Command, term: &mut Term<'_>) -> i32 {
    let result = match command {
        Command::Generate(args) => generate(bus, &args, term).await,
        Command::Chat(args) => chat(bus, &args, term).await,
        Command::Status { json } => status(bus, json, term).await,
        Command::Models => models(bus, term).await,
        Command::Bench(_) => {
            let _ = writeln!(
                term.err,
                "mistralctl: bench measures the HTTP API (the socket or --url) and cannot use \
                 --dbus; examples/dbus_client --bench measures through D-Bus"
            );
            return exit::USAGE;
        }
    };
    match result {
        Ok(()) => exit::OK,
        Err(Failure::Ctl(e)) => {
            term.report_error(&e);
            e.exit_code()
        }
        Err(Failure::Unreachable(message)) => {
            let _ = writeln!(term.err, "mistralctl: {message}");
            exit::CONNECT
        }
    }
}

/// A connection to `bus` and a proxy of the daemon's object.
async fn connect(bus: DbusBus) -> Result<Mistrald1Proxy<'static>, Failure> {
    let conn = match bus {
        DbusBus::System => zbus::Connection::system().await,
        _ => zbus::Connection::session().await,
    }
    .map_err(|e| Failure::Unreachable(format!("cannot connect to {}: {e}", bus_words(bus))))?;
    Mistrald1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| call_error(bus, e))
}

/// The a{sv} options of the settings that were given.
fn options(o: &RequestOptions) -> HashMap<&'static str, Value<'static>> {
    let mut options = HashMap::new();
    if let Some(n) = o.max_tokens {
        options.insert("max_tokens", Value::from(n));
    }
    for (name, value) in [
        ("temperature", o.temperature),
        ("top_p", o.top_p),
        ("min_p", o.min_p),
        ("repeat_penalty", o.repeat_penalty),
    ] {
        if let Some(v) = value {
            options.insert(name, Value::from(v));
        }
    }
    if let Some(k) = o.top_k {
        options.insert("top_k", Value::from(k));
    }
    if let Some(seed) = o.seed {
        options.insert("seed", Value::from(seed));
    }
    if !o.stop.is_empty() {
        options.insert("stop", Value::from(o.stop.clone()));
    }
    options
}

/// A count of `Done`'s usage.
fn count(usage: &HashMap<String, OwnedValue>, key: &str) -> u64 {
    usage
        .get(key)
        .and_then(|v| u32::try_from(v).ok())
        .map_or(0, u64::from)
}

/// A string of `Done`'s usage.
fn text(usage: &HashMap<String, OwnedValue>, key: &str) -> Option<String> {
    usage
        .get(key)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| String::try_from(v).ok())
}

/// What to send: a prompt (`Generate`) or messages (`Chat`).
enum Input<'a> {
    Prompt(&'a str),
    Messages(&'a [(String, String)]),
}

/// Sends a request and writes its text to stdout as the `Token` signals arrive (or, with
/// `--no-stream`, `Done`'s text at the end), then a newline; on Ctrl-C cancels it. After a
/// failure, ends the line it started.
async fn generate_text(
    proxy: &Mistrald1Proxy<'_>,
    bus: DbusBus,
    input: Input<'_>,
    settings: &RequestOptions,
    term: &mut Term<'_>,
) -> Result<Outcome, Failure> {
    let result = exchange(proxy, bus, input, settings, term).await;
    match &result {
        Ok(_) => term.write_out("\n")?,
        Err(_) if term.line_open => {
            let _ = term.write_out("\n");
        }
        Err(_) => {}
    }
    term.line_open = false;
    result
}

async fn exchange(
    proxy: &Mistrald1Proxy<'_>,
    bus: DbusBus,
    input: Input<'_>,
    settings: &RequestOptions,
    term: &mut Term<'_>,
) -> Result<Outcome, Failure> {
    // Subscribe first: the signals follow the reply at once.
    let mut tokens = proxy
        .receive_token()
        .await
        .map_err(|e| call_error(bus, e))?;
    let mut dones = proxy.receive_done().await.map_err(|e| call_error(bus, e))?;
    let mut interrupt = (term.interrupt)();
    let call = async {
        match input {
            Input::Prompt(prompt) => proxy.generate(prompt, options(settings)).await,
            Input::Messages(messages) => {
                let pairs: Vec<(&str, &str)> = messages
                    .iter()
                    .map(|(r, c)| (r.as_str(), c.as_str()))
                    .collect();
                proxy.chat(&pairs, options(settings)).await
            }
        }
    };
    let id = tokio::select! {
        biased;
        _ = &mut interrupt => return Err(CtlError::Interrupted.into()),
        id = call => id.map_err(|e| call_error(bus, e))?,
    };
    loop {
        tokio::select! {
            biased;
            _ = &mut interrupt => {
                // The daemon also cancels it when this connection closes.
                let _ = proxy.cancel(id).await;
                return Err(CtlError::Interrupted.into());
            }
            Some(token) = tokens.next() => {
                let args = token
                    .args()
                    .map_err(|e| CtlError::Protocol(format!("a malformed Token signal: {e}")))?;
                if args.request_id == id && !settings.no_stream {
                    term.write_out(args.text)?;
                }
            }
            Some(done) = dones.next() => {
                let args = done
                    .args()
                    .map_err(|e| CtlError::Protocol(format!("a malformed Done signal: {e}")))?;
                if args.request_id != id {
                    continue;
                }
                // Tokens sent before Done may still wait in their stream.
                while let Some(Some(token)) = tokens.next().now_or_never() {
                    if let Ok(t) = token.args() {
                        if t.request_id == id && !settings.no_stream {
                            term.write_out(t.text)?;
                        }
                    }
                }
                let usage = &args.usage;
                if matches!(args.finish_reason, "error" | "cancelled") {
                    let message = text(usage, "error_message")
                        .unwrap_or_else(|| format!("the request ended: {}", args.finish_reason));
                    return Err(CtlError::Stream(message).into());
                }
                if settings.no_stream {
                    term.write_out(args.text)?;
                }
                return Ok(Outcome {
                    text: args.text.to_string(),
                    finish_reason: Some(args.finish_reason.to_string()),
                    refusal: text(usage, "refusal"),
                    usage: Some(Usage {
                        prompt_tokens: count(usage, "prompt_tokens"),
                        cached_tokens: count(usage, "cached_tokens"),
                        completion_tokens: count(usage, "completion_tokens"),
                    }),
                });
            }
            else => {
                return Err(CtlError::Protocol(
                    "the bus connection closed before the reply was complete".into(),
                )
                .into())
            }
        }
    }
}

/// The prompt argument, or stdin for `-` (one trailing newline removed).
async fn read_prompt(prompt: &str, term: &mut Term<'_>) -> Result<String, CtlError> {
    if prompt != "-" {
        return Ok(prompt.to_string());
    }
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
    Ok(text)
}

async fn generate(bus: DbusBus, args: &GenerateArgs, term: &mut Term<'_>) -> Result<(), Failure> {
    let prompt = read_prompt(&args.prompt, term).await?;
    let proxy = connect(bus).await?;
    let outcome = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(("system".to_string(), system.clone()));
        }
        messages.push(("user".to_string(), prompt));
        generate_text(&proxy, bus, Input::Messages(&messages), &args.options, term).await?
    } else {
        generate_text(&proxy, bus, Input::Prompt(&prompt), &args.options, term).await?
    };
    Ok(term.finish(&outcome, args.options.usage)?)
}

async fn chat(bus: DbusBus, args: &ChatArgs, term: &mut Term<'_>) -> Result<(), Failure> {
    let proxy = connect(bus).await?;
    let mut history: Vec<(String, String)> = Vec::new();
    if let Some(system) = &args.system {
        history.push(("system".into(), system.clone()));
    }
    let kept = history.len();
    if term.interactive {
        let _ = writeln!(
            term.err,
            "mistralctl chat ({BUS_NAME} on {}): /reset clears the conversation, /quit or \
             Ctrl-D ends it",
            bus_words(bus)
        );
    }
    loop {
        let message = match term.read_chat_line().await? {
            super::ChatLine::Quit => return Ok(()),
            super::ChatLine::Reset => {
                history.truncate(kept);
                continue;
            }
            super::ChatLine::Message(message) => message,
        };
        history.push(("user".into(), message));
        let result = match generate_text(
            &proxy,
            bus,
            Input::Messages(&history),
            &args.options,
            term,
        )
        .await
        {
            Ok(outcome) => term
                .finish(&outcome, args.options.usage)
                .map(|()| outcome)
                .map_err(Failure::Ctl),
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => history.push(("assistant".into(), outcome.text)),
            // At a terminal, a failed or interrupted turn is dropped and the chat goes on.
            Err(Failure::Ctl(e)) if term.survives_failed_turn(&e) => {
                history.pop();
                term.report_failed_turn(&e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The interface's properties, by name.
async fn properties(
    proxy: &Mistrald1Proxy<'_>,
    bus: DbusBus,
) -> Result<HashMap<String, OwnedValue>, Failure> {
    let props = zbus::fdo::PropertiesProxy::builder(proxy.inner().connection())
        .destination(BUS_NAME)
        .and_then(|b| b.path(proxy.inner().path().to_owned()))
        .map_err(|e| call_error(bus, e))?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| call_error(bus, e))?;
    let interface = zbus::names::InterfaceName::from_static_str_unchecked(INTERFACE);
    props
        .get_all(interface)
        .await
        .map_err(|e| call_error(bus, e.into()))
}

fn property_u32(props: &HashMap<String, OwnedValue>, name: &str) -> u32 {
    props
        .get(name)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
}

async fn status(bus: DbusBus, raw: bool, term: &mut Term<'_>) -> Result<(), Failure> {
    let proxy = connect(bus).await?;
    let props = properties(&proxy, bus).await?;
    let model = props
        .get("Model")
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| String::try_from(v).ok())
        .unwrap_or_default();
    let ready = props
        .get("Ready")
        .and_then(|v| bool::try_from(v).ok())
        .unwrap_or(false);
    let window = property_u32(&props, "Window");
    let queued = property_u32(&props, "QueueLength");
    let active = property_u32(&props, "ActiveRequests");
    if raw {
        let json = serde_json::json!({
            "model": model,
            "window": if window == 0 { None } else { Some(window) },
            "ready": ready,
            "queued": queued,
            "active": active,
        });
        return Ok(term.write_out(&format!("{json}\n"))?);
    }
    let window = match window {
        0 => "none (full attention)".to_string(),
        w => format!("{w} positions (sliding window)"),
    };
    let owner = proxy
        .inner()
        .connection()
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetNameOwner",
            &(BUS_NAME,),
        )
        .await
        .ok()
        .and_then(|reply| reply.body().deserialize::<String>().ok())
        .unwrap_or_else(|| "?".into());
    let rows = [
        ("model", model),
        ("window", window),
        (
            "ready",
            if ready { "yes" } else { "no (loading)" }.to_string(),
        ),
        ("queue", queued.to_string()),
        ("active", active.to_string()),
        (
            "D-Bus",
            format!("{BUS_NAME} on {} ({owner})", bus_words(bus)),
        ),
    ];
    let text: String = rows
        .iter()
        .map(|(name, value)| format!("{:<14}{value}\n", format!("{name}:")))
        .collect();
    Ok(term.write_out(&text)?)
}

async fn models(bus: DbusBus, term: &mut Term<'_>) -> Result<(), Failure> {
    let proxy = connect(bus).await?;
    let model = proxy.model().await.map_err(|e| call_error(bus, e))?;
    Ok(term.write_out(&format!("{model}\n"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_error(name: &str, message: &str) -> zbus::Error {
        let name = zbus::names::OwnedErrorName::try_from(name).unwrap();
        let msg = zbus::message::Message::method_call("/", "Ping")
            .unwrap()
            .build(&())
            .unwrap();
        let reply = zbus::message::Message::error(&msg.header(), name.clone())
            .unwrap()
            .build(&(message,))
            .unwrap();
        zbus::Error::MethodError(name, Some(message.to_string()), reply)
    }

    #[test]
    fn dbus_errors_become_the_socket_transports_errors_and_exit_codes() {
        let busy = call_error(
            DbusBus::Session,
            method_error(
                "org.mistrald.Mistrald1.Error.Busy",
                "the server is busy (3 requests queued); retry in 2 s",
            ),
        );
        let Failure::Ctl(e) = busy else {
            panic!("not a CtlError")
        };
        assert_eq!(e.exit_code(), exit::BUSY);
        assert_eq!(
            e.message().unwrap(),
            "the server is busy (3 requests queued) (the daemon is busy: retry in 2 s)"
        );

        let invalid = call_error(
            DbusBus::Session,
            method_error(
                "org.mistrald.Mistrald1.Error.InvalidArgument",
                "option temperature: 3 is out of range (0 ..= 2)",
            ),
        );
        let Failure::Ctl(e) = invalid else {
            panic!("not a CtlError")
        };
        assert_eq!(e.exit_code(), exit::ERROR);
        assert!(matches!(&e, CtlError::Daemon { status, .. } if status.is_client_error()));
        assert!(e.message().unwrap().contains("Error.InvalidArgument"));

        for name in [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.AccessDenied",
        ] {
            let Failure::Unreachable(m) = call_error(DbusBus::System, method_error(name, "no"))
            else {
                panic!("{name} should be unreachable")
            };
            assert!(m.contains("the system bus"), "{m}");
        }
    }

    #[test]
    fn only_the_given_settings_become_options() {
        let o = options(&RequestOptions {
            max_tokens: Some(8),
            temperature: Some(0.0),
            top_k: Some(4),
            stop: vec!["\n".into()],
            ..RequestOptions::default()
        });
        assert_eq!(o.len(), 4);
        assert_eq!(o["max_tokens"], Value::U64(8));
        assert_eq!(o["temperature"], Value::F64(0.0));
        assert_eq!(o["top_k"], Value::U64(4));
        assert!(options(&RequestOptions::default()).is_empty());
    }
}
