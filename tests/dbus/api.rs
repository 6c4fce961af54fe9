//! Streaming through signals, the blocking call, chat, properties and introspection, each
//! compared with the socket's answer to the same request.

use crate::common::daemon::{block_on, config_with, streamed_text};
use crate::common::dbus::{gdbus_strings, ok_stdout, root, rust_example, start_daemon, Bus};
use futures_util::StreamExt as _;
use mistrald::api::dbus::{interface_members, Mistrald1Proxy, INTROSPECTION_XML};
use serde_json::json;
use std::collections::HashMap;
use zbus::zvariant::{OwnedValue, Value};

/// The socket's greedy completion of `prompt` (not streamed).
fn socket_completion(d: &crate::common::daemon::Daemon, prompt: &str, max_tokens: u32) -> String {
    let (code, v) = d.post_json(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// What a streamed request sent: the Token texts, then Done's arguments.
struct Streamed {
    tokens: Vec<String>,
    text: String,
    finish_reason: String,
    usage: HashMap<String, OwnedValue>,
}

fn count(usage: &HashMap<String, OwnedValue>, key: &str) -> u32 {
    u32::try_from(&usage[key]).unwrap()
}

/// Runs a request started by `start` and collects its signals.
async fn stream<F, Fut>(proxy: &Mistrald1Proxy<'_>, start: F) -> (u64, Streamed)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = zbus::Result<u64>>,
{
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut dones = proxy.receive_done().await.unwrap();
    let id = start().await.unwrap();
    let mut texts = Vec::new();
    loop {
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                let a = t.args().unwrap();
                assert_eq!(a.request_id, id, "a Token of another request");
                texts.push(a.text.to_string());
            }
            Some(d) = dones.next() => {
                let a = d.args().unwrap();
                assert_eq!(a.request_id, id, "a Done of another request");
                while let Some(Some(t)) = futures_util::FutureExt::now_or_never(tokens.next()) {
                    texts.push(t.args().unwrap().text.to_string());
                }
                return (id, Streamed {
                    tokens: texts,
                    text: a.text.to_string(),
                    finish_reason: a.finish_reason.to_string(),
                    usage: a.usage.clone(),
                });
            }
        }
    }
}

fn greedy(max_tokens: u32) -> HashMap<&'static str, Value<'static>> {
    HashMap::from([
        ("max_tokens", Value::from(max_tokens)),
        ("temperature", Value::from(0.0)),
    ])
}

#[test]
fn generate_chat_and_complete_equal_the_socket_with_stock_clients_and_zbus() {
    let bus = Bus::session();
    let d = start_daemon(&bus, &config_with(""), &[]);
    let prompt = "The meaning of life is";
    let want = socket_completion(&d, prompt, 24);
    assert!(!want.is_empty());

    // The blocking call with gdbus (int32 and double in the options).
    let out = bus.gdbus_call(
        "Complete",
        &[prompt, "{'max_tokens': <24>, 'temperature': <0.0>}"],
    );
    let answer = gdbus_strings(&ok_stdout("gdbus call Complete", &out));
    assert_eq!(answer, vec![want.clone(), "length".to_string()]);

    // With busctl (uint64 and a byte for max_tokens), as JSON.
    for ty in ["t", "y"] {
        let out = bus.busctl(&[
            "--json=short",
            "call",
            "org.mistrald.Mistrald1",
            "/org/mistrald/Mistrald1",
            "org.mistrald.Mistrald1",
            "Complete",
            "sa{sv}",
            prompt,
            "2",
            "max_tokens",
            ty,
            "24",
            "temperature",
            "d",
            "0",
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&ok_stdout("busctl call Complete", &out)).unwrap();
        assert_eq!(v["type"], "ss");
        assert_eq!(v["data"][0], want.as_str(), "max_tokens as {ty}");
        assert_eq!(v["data"][1], "length");
    }

    // The socket's answers to the chat and sampled requests below.
    let question = "Tell me about cats";
    let (code, v) = d.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": question}],
                "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    let want_chat = v["choices"][0]["message"]["content"].as_str().unwrap();
    let (code, events) = d.stream(
        "/v1/completions",
        &json!({"prompt": "Never", "max_tokens": 40, "temperature": 0.7, "seed": 42,
                "stop": ["."], "stream": true}),
    );
    assert_eq!(code, 200);
    let want_stop = streamed_text(&events);

    block_on(async {
        let proxy = bus.proxy().await;
        // Generate: Token signals, then Done with the whole text and the usage.
        let (id, s) = stream(&proxy, || proxy.generate(prompt, greedy(24))).await;
        assert!(id > 0);
        assert_eq!(s.tokens.concat(), want);
        assert!(
            s.tokens.len() >= 20,
            "about one signal per token: {:?}",
            s.tokens
        );
        assert_eq!(s.text, want);
        assert_eq!(s.finish_reason, "length");
        assert_eq!(count(&s.usage, "completion_tokens"), 24);
        assert!(count(&s.usage, "prompt_tokens") >= 6);
        assert!(!s.usage.contains_key("error"));

        // Chat: through the chat template, as /v1/chat/completions.
        let messages = [("system", "Be brief."), ("user", question)];
        let (_, s) = stream(&proxy, || proxy.chat(&messages, greedy(20))).await;
        assert_eq!(s.tokens.concat(), want_chat);
        assert_eq!(s.text, want_chat);
        // A follow-up continues from the prompt cache.
        let follow = [
            ("system", "Be brief."),
            ("user", question),
            ("assistant", want_chat),
            ("user", "Another one"),
        ];
        let (_, s) = stream(&proxy, || proxy.chat(&follow, greedy(8))).await;
        assert!(count(&s.usage, "cached_tokens") > 0, "{:?}", s.usage);

        // A stop string and a seed: as the socket with the same values.
        let mut options = greedy(40);
        options.insert("temperature", Value::from(0.7));
        options.insert("seed", Value::from(42u64));
        options.insert("stop", Value::from(vec!["."]));
        let (_, s) = stream(&proxy, || proxy.generate("Never", options)).await;
        assert_eq!(s.text, want_stop);

        // Properties.
        assert_eq!(proxy.model().await.unwrap(), "fortunes-22m-q8_0");
        assert_eq!(proxy.window().await.unwrap(), 128);
        assert!(proxy.ready().await.unwrap());
        assert_eq!(proxy.queue_length().await.unwrap(), 0);
    });

    // Properties and introspection with dbus-send.
    let out = bus.dbus_send(&[
        "--print-reply",
        "--dest=org.mistrald.Mistrald1",
        "/org/mistrald/Mistrald1",
        "org.freedesktop.DBus.Properties.Get",
        "string:org.mistrald.Mistrald1",
        "string:Model",
    ]);
    assert!(ok_stdout("dbus-send Get", &out).contains("string \"fortunes-22m-q8_0\""));
    let out = bus.dbus_send(&[
        "--print-reply=literal",
        "--dest=org.mistrald.Mistrald1",
        "/org/mistrald/Mistrald1",
        "org.freedesktop.DBus.Introspectable.Introspect",
    ]);
    let live = ok_stdout("dbus-send Introspect", &out);
    assert_eq!(
        interface_members(&live).unwrap(),
        interface_members(INTROSPECTION_XML).unwrap(),
        "the live introspection differs from systemd/dbus/org.mistrald.Mistrald1.xml:\n{live}"
    );
    // gdbus introspect agrees.
    let out = bus.gdbus(&[
        "introspect",
        "--session",
        "--dest",
        "org.mistrald.Mistrald1",
        "--object-path",
        "/org/mistrald/Mistrald1",
        "--xml",
    ]);
    assert_eq!(
        interface_members(&ok_stdout("gdbus introspect", &out)).unwrap(),
        interface_members(INTROSPECTION_XML).unwrap()
    );

    // Every request was logged with the caller's uid and pid.
    let uid = unsafe { libc::geteuid() };
    let log = d.log_text();
    assert!(
        log.contains(&format!("from uid:{uid} (pid {})", std::process::id())),
        "{log}"
    );
}

#[test]
fn the_python_gio_and_rust_zbus_examples_stream_a_generation() {
    let bus = Bus::session();
    let d = start_daemon(&bus, &config_with(""), &[]);
    let prompt = "The meaning of life is";
    let want = socket_completion(&d, prompt, 24);

    let out = bus
        .command("/usr/bin/python3")
        .arg(root().join("examples/dbus_client.py"))
        .args([
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--usage",
            prompt,
        ])
        .output()
        .expect("run examples/dbus_client.py (python3-gi)");
    let text = ok_stdout("examples/dbus_client.py", &out);
    assert_eq!(text, format!("{want}\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("finish reason length"), "{stderr}");
    assert!(stderr.contains("24 completion tokens"), "{stderr}");

    let out = bus
        .command(rust_example())
        .args([
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--usage",
            prompt,
        ])
        .output()
        .unwrap();
    assert_eq!(ok_stdout("dbus_client", &out), format!("{want}\n"));

    // Chat with both.
    let question = "Tell me about cats";
    let (_, v) = d.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": question}],
                "max_tokens": 16, "temperature": 0}),
    );
    let want_chat = v["choices"][0]["message"]["content"].as_str().unwrap();
    let out = bus
        .command("/usr/bin/python3")
        .arg(root().join("examples/dbus_client.py"))
        .args([
            "--chat",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            question,
        ])
        .output()
        .unwrap();
    assert_eq!(
        ok_stdout("dbus_client.py --chat", &out),
        format!("{want_chat}\n")
    );
    let out = bus
        .command(rust_example())
        .args([
            "--chat",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            question,
        ])
        .output()
        .unwrap();
    assert_eq!(
        ok_stdout("dbus_client --chat", &out),
        format!("{want_chat}\n")
    );

    // The benchmark mode: tokens/s through the signals.
    let out = bus
        .command(rust_example())
        .args([
            "--bench",
            "--clients",
            "2",
            "--requests",
            "2",
            "--max-tokens",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(ok_stdout("dbus_client --bench", &out).trim()).unwrap();
    assert_eq!(v["requests"], 4);
    assert_eq!(v["completion_tokens"], 64);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn mistralctl_speaks_dbus() {
    let bus = Bus::session();
    let d = start_daemon(&bus, &config_with(""), &[]);
    let prompt = "The meaning of life is";
    let want = socket_completion(&d, prompt, 24);
    let ctl = |args: &[&str], stdin: &str| {
        use std::io::Write as _;
        let mut child = bus
            .command(env!("CARGO_BIN_EXE_mistralctl"))
            .args(["--dbus", "session"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let greedy = ["--max-tokens", "24", "--temperature", "0"];

    let out = ctl(
        &[&["generate"][..], &greedy, &["--usage", prompt]].concat(),
        "",
    );
    assert_eq!(
        ok_stdout("mistralctl --dbus generate", &out),
        format!("{want}\n")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("24 completion tokens; finish reason: length"),
        "{stderr}"
    );
    // --no-stream: Done's text; the prompt from stdin.
    let out = ctl(
        &[&["generate"][..], &greedy, &["--no-stream", "-"]].concat(),
        &format!("{prompt}\n"),
    );
    assert_eq!(
        ok_stdout("generate --no-stream -", &out),
        format!("{want}\n")
    );
    // Chat, one turn from stdin.
    let (_, v) = d.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Tell me a fortune"}],
                "max_tokens": 24, "temperature": 0}),
    );
    let want_chat = v["choices"][0]["message"]["content"].as_str().unwrap();
    let out = ctl(
        &[&["chat"][..], &greedy].concat(),
        "Tell me a fortune\n/quit\n",
    );
    assert_eq!(
        ok_stdout("mistralctl --dbus chat", &out),
        format!("{want_chat}\n")
    );

    let out = ctl(&["status"], "");
    let text = ok_stdout("status", &out);
    assert!(
        text.contains("fortunes-22m-q8_0") && text.contains("ready:        yes"),
        "{text}"
    );
    assert!(text.contains("128 positions"), "{text}");
    let out = ctl(&["status", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&ok_stdout("status --json", &out)).unwrap();
    assert_eq!(v["model"], "fortunes-22m-q8_0");
    assert_eq!(v["ready"], true);
    let out = ctl(&["models"], "");
    assert_eq!(ok_stdout("models", &out), "fortunes-22m-q8_0\n");

    // Errors: a bad option (1), bench (2), no daemon on the bus (3).
    let out = ctl(&["generate", "--temperature", "5", "Hi"], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("option temperature") && stderr.contains("Error.InvalidArgument"),
        "{stderr}"
    );
    let out = ctl(&["bench"], "");
    assert_eq!(out.status.code(), Some(2));
    let empty = Bus::session();
    let out = empty
        .command(env!("CARGO_BIN_EXE_mistralctl"))
        .args(["--dbus", "session", "models"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not available on the session bus"));
    let out = bus
        .command(env!("CARGO_BIN_EXE_mistralctl"))
        .args(["--dbus", "session", "--socket", "/nowhere", "models"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--dbus and --socket conflict");
}
