//! Named errors (queue full, bad options, plugins), Cancel and its owner, callers that leave
//! the bus mid-request, and SIGTERM.

use crate::common::daemon::{block_on, config_long, config_with, request, Daemon};
use crate::common::dbus::{err_stderr, ok_stdout, root, start_daemon, Bus};
use crate::common::plugins::{cache_dir, component};
use futures_util::StreamExt as _;
use mistrald::api::dbus::{Mistrald1Proxy, BUS_NAME};
use std::collections::HashMap;
use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};
use zbus::zvariant::Value;

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A request that runs until it is stopped.
fn long() -> HashMap<&'static str, Value<'static>> {
    HashMap::from([
        ("max_tokens", Value::from(30000u32)),
        ("ignore_eos", Value::from(true)),
    ])
}

/// The D-Bus error name and message of a failed zbus call.
fn method_error<T: std::fmt::Debug>(r: zbus::Result<T>) -> (String, String) {
    match r {
        Err(zbus::Error::MethodError(name, message, _)) => {
            (name.to_string(), message.unwrap_or_default())
        }
        other => panic!("expected a D-Bus error, got {other:?}"),
    }
}

fn active(d: &Daemon) -> u64 {
    d.status()["active"].as_u64().unwrap()
}

/// `GET /v1/status` from inside a runtime.
async fn status(d: &Daemon) -> serde_json::Value {
    let (code, _, body) = request(&d.socket, "GET", "/v1/status", None, &[])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_full_queue_is_busy_and_bad_options_are_invalid_arguments_naming_them() {
    let bus = Bus::session();
    let d = start_daemon(
        &bus,
        &config_long("[server]\nparallel = 1\nqueue_size = 1\n"),
        &[],
    );

    // Bad options and messages, with stock clients: InvalidArgument naming the problem.
    let invalid = "org.mistrald.Mistrald1.Error.InvalidArgument";
    for (options, want) in [
        (
            "{'temperature': <'hot'>}",
            "option temperature: expected a number",
        ),
        (
            "{'temperature': <2.5>}",
            "option temperature: 2.5 is out of range",
        ),
        (
            "{'max_tokens': <0>}",
            "option max_tokens: 0 is out of range",
        ),
        (
            "{'max_tokens': <24.5>}",
            "option max_tokens: expected an integer, got 24.5",
        ),
        (
            "{'max_tokens': <int64 -3>}",
            "option max_tokens: -3 is out of range",
        ),
        ("{'top_k': <true>}", "option top_k: expected a number"),
        ("{'stop': <[1, 2]>}", "option stop[0]: expected a string"),
        ("{'bogus': <1>}", "unknown option 'bogus'"),
    ] {
        let out = bus.gdbus_call("Generate", &["Hello", options]);
        let stderr = err_stderr(options, &out);
        assert!(stderr.contains(invalid), "{options}: {stderr}");
        assert!(stderr.contains(want), "{options}: {stderr} lacks {want}");
    }
    let out = bus.gdbus_call("Chat", &["[('robot', 'beep'), ('user', 'Hi')]", "{}"]);
    let stderr = err_stderr("Chat with a bad role", &out);
    assert!(stderr.contains(invalid) && stderr.contains("messages[0]: unknown role 'robot'"));
    let out = bus.gdbus_call("Chat", &["[('system', 'Be brief.')]", "{}"]);
    assert!(err_stderr("Chat without a user message", &out).contains("user message"));
    let out = bus.busctl(&[
        "call",
        BUS_NAME,
        "/org/mistrald/Mistrald1",
        "org.mistrald.Mistrald1",
        "Complete",
        "sa{sv}",
        "Hello",
        "1",
        "stop",
        "as",
        "1",
        "",
    ]);
    let stderr = err_stderr("busctl with an empty stop string", &out);
    assert!(
        stderr.contains("stop strings must not be empty"),
        "{stderr}"
    );
    // A prompt longer than the context.
    let small = Bus::session();
    let ds = start_daemon(&small, &config_with(""), &["--ctx-size", "16"]);
    let out = small.gdbus_call("Complete", &[&"word ".repeat(40), "{}"]);
    let stderr = err_stderr("a prompt over the context", &out);
    assert!(
        stderr.contains(invalid) && stderr.contains("the context holds 16"),
        "{stderr}"
    );
    drop(ds);

    block_on(async {
        let proxy = bus.proxy().await;
        let mut dones = proxy.receive_done().await.unwrap();
        let running = proxy.generate("Never", long()).await.unwrap();
        // Until the engine thread admits it, the first request holds the one queue place.
        while status(&d).await["active"] != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let queued = proxy.generate("Always", long()).await.unwrap();
        loop {
            let s = status(&d).await;
            if s["active"] == 1 && s["queued"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.queue_length().await.unwrap(), 1);
        // Full: refused at once with Busy, saying when to retry.
        let t0 = Instant::now();
        let (name, message) = method_error(proxy.generate("Love is", long()).await);
        assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
        assert_eq!(name, "org.mistrald.Mistrald1.Error.Busy");
        assert!(
            message.contains("busy") && message.contains("retry in"),
            "{message}"
        );
        // A stock client sees the same.
        let out = bus.gdbus_call("Complete", &["Love is", "{}"]);
        assert!(
            err_stderr("Complete while full", &out).contains("org.mistrald.Mistrald1.Error.Busy")
        );
        // The Python example reports it with exit status 4.
        let out = bus
            .command("/usr/bin/python3")
            .arg(root().join("examples/dbus_client.py"))
            .arg("Love is")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Error.Busy"));

        // Cancel both; each ends with a Done saying so.
        proxy.cancel(queued).await.unwrap();
        proxy.cancel(running).await.unwrap();
        let mut ended = Vec::new();
        while ended.len() < 2 {
            let done = dones.next().await.unwrap();
            let a = done.args().unwrap();
            assert_eq!(a.finish_reason, "cancelled", "{:?}", a.usage);
            assert_eq!(
                String::try_from(a.usage["error"].try_clone().unwrap()).unwrap(),
                "org.mistrald.Mistrald1.Error.Cancelled"
            );
            ended.push(a.request_id);
        }
        ended.sort();
        assert_eq!(ended, vec![running, queued]);
    });
    wait_until("idle", Duration::from_secs(10), || {
        d.status()["active"] == 0 && d.status()["queued"] == 0
    });
}

#[test]
fn only_the_owner_cancels_and_callers_that_leave_have_their_requests_cancelled() {
    let bus = Bus::session();
    let d = start_daemon(&bus, &config_long(""), &[]);
    block_on(async {
        let owner = bus.proxy().await;
        let other = bus.proxy().await;
        let mut tokens = owner.receive_token().await.unwrap();
        let mut dones = owner.receive_done().await.unwrap();
        let id = owner.generate("Never", long()).await.unwrap();
        tokens.next().await.unwrap();
        // A stream nobody reads stalls the connection once 64 signals wait in it (zbus applies
        // back-pressure), and with it the replies below.
        drop(tokens);

        // Another connection may not cancel it; an unknown id is NotFound.
        let (name, message) = method_error(other.cancel(id).await);
        assert_eq!(name, "org.mistrald.Mistrald1.Error.AccessDenied");
        assert!(message.contains("another connection"), "{message}");
        let (name, message) = method_error(owner.cancel(id + 1000).await);
        assert_eq!(name, "org.mistrald.Mistrald1.Error.NotFound");
        assert!(message.contains(&format!("no request {}", id + 1000)));
        let out = bus.dbus_send(&[
            "--print-reply",
            &format!("--dest={BUS_NAME}"),
            "/org/mistrald/Mistrald1",
            "org.mistrald.Mistrald1.Cancel",
            &format!("uint64:{id}"),
        ]);
        assert!(err_stderr("dbus-send Cancel", &out).contains("Error.AccessDenied"));
        assert_eq!(status(&d).await["active"], 1, "still running");

        // The owner may.
        owner.cancel(id).await.unwrap();
        let done = dones.next().await.unwrap();
        let a = done.args().unwrap();
        assert_eq!((a.request_id, a.finish_reason), (id, "cancelled"));
        assert!(!a.text.is_empty(), "the text sent so far");
    });
    wait_until("idle", Duration::from_secs(10), || active(&d) == 0);

    // A connection that closes mid-stream: its request is cancelled at once.
    block_on(async {
        let conn = bus.connect().await;
        let proxy = Mistrald1Proxy::new(&conn).await.unwrap();
        let mut tokens = proxy.receive_token().await.unwrap();
        proxy.generate("Never", long()).await.unwrap();
        tokens.next().await.unwrap();
        drop(tokens);
        drop(proxy);
        conn.close().await.unwrap();
    });
    wait_until("the sequence is freed", Duration::from_secs(5), || {
        active(&d) == 0
    });
    wait_until("the cancellation is logged", Duration::from_secs(5), || {
        d.log_text()
            .contains("left the bus; cancelled its 1 request")
    });

    // A client process killed mid-stream (the Python example).
    let mut child = bus
        .command("/usr/bin/python3")
        .arg(root().join("examples/dbus_client.py"))
        .args(["--max-tokens", "30000", "--ignore-eos", "Never"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(active(&d), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        "the killed client's sequence is freed",
        Duration::from_secs(5),
        || active(&d) == 0,
    );

    // A blocking Complete whose caller is killed.
    let mut gdbus = bus
        .command("gdbus")
        .args([
            "call",
            "--session",
            "--dest",
            BUS_NAME,
            "--object-path",
            "/org/mistrald/Mistrald1",
            "--method",
            "org.mistrald.Mistrald1.Complete",
            "--timeout",
            "600",
            "Never",
            "{'max_tokens': <30000>, 'ignore_eos': <true>}",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("Complete runs", Duration::from_secs(10), || active(&d) == 1);
    gdbus.kill().unwrap();
    gdbus.wait().unwrap();
    wait_until("the Complete is cancelled", Duration::from_secs(5), || {
        active(&d) == 0
    });
    let log = d.log_text();
    // Three callers left mid-request (a fourth line may come from a caller that left just as
    // its request ended).
    assert!(
        log.matches("left the bus; cancelled its 1 request").count() >= 3,
        "{log}"
    );
}

#[test]
fn a_plugin_sees_the_callers_uid_and_its_refusal_is_a_rejected_error() {
    // on-prompt refuses prompts that start with '?', giving request-info.client as the reason.
    let wasm = component(
        "(if (result i32) (i32.eq (i32.load8_u (local.get 0)) (i32.const 63)) \
           (then (i32.store8 (i32.const 160) (i32.const 1)) \
                 (i32.store (i32.const 164) (local.get 5)) \
                 (i32.store (i32.const 168) (local.get 6)) (i32.const 160)) \
           (else (i32.store8 (i32.const 160) (i32.const 0)) \
                 (i32.store (i32.const 164) (local.get 0)) \
                 (i32.store (i32.const 168) (local.get 1)) (i32.const 160)))",
        "",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("whoami.wasm"), wasm).unwrap();
    let plugins = format!(
        "[plugins]\ndir = \"{}\"\nautoload = false\ncache_dir = \"{}\"\n\n\
         [[plugins.chain]]\nname = \"whoami\"\npath = \"whoami.wasm\"\n",
        dir.path().display(),
        cache_dir().display()
    );
    let bus = Bus::session();
    let _d = start_daemon(&bus, &config_with(&plugins), &[]);
    let uid = unsafe { libc::geteuid() };
    let out = bus.gdbus_call("Complete", &["?who am I", "{}"]);
    let stderr = err_stderr("a refused prompt", &out);
    assert!(
        stderr.contains("org.mistrald.Mistrald1.Error.Rejected")
            && stderr.contains(&format!("refused by plugin 'whoami': uid:{uid}")),
        "{stderr}"
    );
    block_on(async {
        let proxy = bus.proxy().await;
        let (name, message) = method_error(proxy.generate("?again", HashMap::new()).await);
        assert_eq!(name, "org.mistrald.Mistrald1.Error.Rejected");
        assert!(message.contains(&format!("uid:{uid}")), "{message}");
    });
    // Other prompts pass.
    let out = bus.gdbus_call("Complete", &["Hello", "{'max_tokens': <4>}"]);
    ok_stdout("an accepted prompt", &out);
}

#[test]
fn sigterm_ends_dbus_streams_with_a_done_and_releases_the_name() {
    let bus = Bus::session();
    let mut d = start_daemon(&bus, &config_long("[server]\nshutdown_grace = 0.3\n"), &[]);
    let done = block_on(async {
        let proxy = bus.proxy().await;
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut dones = proxy.receive_done().await.unwrap();
        let id = proxy.generate("Never", long()).await.unwrap();
        // Bounded waits: a lost signal fails the test with the daemon's log, never hangs it.
        let limit = Duration::from_secs(30);
        tokio::time::timeout(limit, tokens.next())
            .await
            .unwrap_or_else(|_| panic!("no Token signal in {limit:?}:\n{}", d.log_text()))
            .unwrap();
        // Unread, the Token stream would stall the connection (and the Done behind it) once 64
        // signals wait in it.
        drop(tokens);
        d.signal(libc::SIGTERM);
        let done = tokio::time::timeout(limit, dones.next())
            .await
            .unwrap_or_else(|_| panic!("no Done signal {limit:?} after SIGTERM:\n{}", d.log_text()))
            .unwrap();
        let a = done.args().unwrap();
        assert_eq!(a.request_id, id);
        let error = a
            .usage
            .get("error")
            .unwrap_or_else(|| panic!("no error in {} {:?}", a.finish_reason, a.usage));
        (
            a.finish_reason.to_string(),
            String::try_from(error.try_clone().unwrap()).unwrap(),
        )
    });
    assert_eq!(
        done,
        (
            "error".to_string(),
            "org.mistrald.Mistrald1.Error.ShuttingDown".to_string()
        )
    );
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(!block_on(bus.name_owned()), "the name is released");
}
