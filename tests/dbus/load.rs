//! Unicast signals, and D-Bus and socket clients at once.

use crate::common::daemon::{block_on, config_with, stream_events, streamed_text};
use crate::common::dbus::{start_daemon, Bus};
use futures_util::StreamExt as _;
use mistrald::api::dbus::{Mistrald1Proxy, BUS_NAME};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::BufRead as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zbus::zvariant::Value;

fn greedy(max_tokens: u32) -> HashMap<&'static str, Value<'static>> {
    HashMap::from([
        ("max_tokens", Value::from(max_tokens)),
        ("temperature", Value::from(0.0)),
    ])
}

#[test]
fn token_and_done_signals_reach_only_the_caller() {
    let bus = Bus::session();
    let _d = start_daemon(&bus, &config_with(""), &[]);

    // A stock watcher: gdbus monitor of everything the daemon sends that it may see.
    let mut monitor = bus
        .command("gdbus")
        .args(["monitor", "--session", "--dest", BUS_NAME])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = std::thread::spawn({
        let lines = lines.clone();
        let stdout = monitor.stdout.take().unwrap();
        move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(line);
            }
        }
    });
    let t0 = Instant::now();
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("is owned by"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "gdbus monitor did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let (seen, properties) = block_on(async {
        // A zbus watcher with a match rule for every signal of the daemon.
        let watcher = bus.connect().await;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(BUS_NAME)
            .unwrap()
            .build();
        let mut watched = zbus::MessageStream::for_match_rule(rule, &watcher, None)
            .await
            .unwrap();

        let proxy = bus.proxy().await;
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut dones = proxy.receive_done().await.unwrap();
        // Long enough (it is cancelled below) for ActiveRequests = 1 to be published: the
        // properties are snapshots taken at most every 250 ms.
        let mut options = greedy(2000);
        options.insert("ignore_eos", Value::from(true));
        let id = proxy
            .generate("The meaning of life is", options)
            .await
            .unwrap();
        let mut received = 0;
        let mut cancel_at = None;
        let mut cancelled = false;
        loop {
            tokio::select! {
                biased;
                Some(t) = tokens.next() => {
                    assert_eq!(t.args().unwrap().request_id, id);
                    received += 1;
                    let at = *cancel_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(700));
                    if received > 10 && Instant::now() >= at && !cancelled {
                        proxy.cancel(id).await.unwrap();
                        cancelled = true;
                    }
                }
                Some(d) = dones.next() => {
                    assert_eq!(d.args().unwrap().request_id, id);
                    break;
                }
            }
        }
        assert!(received > 10, "the caller gets its tokens");
        // Wait for the rate-limited PropertiesChanged of ActiveRequests going back to 0.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut members = Vec::new();
        while let Some(Some(msg)) = futures_util::FutureExt::now_or_never(watched.next()) {
            let msg = msg.unwrap();
            members.push(
                msg.header()
                    .member()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            );
        }
        let properties = members.iter().filter(|m| *m == "PropertiesChanged").count();
        (members, properties)
    });
    assert!(
        !seen.iter().any(|m| m == "Token" || m == "Done"),
        "another connection received {seen:?}"
    );
    assert!(properties > 0, "the watcher works: it saw {seen:?}");

    let _ = monitor.kill();
    let _ = monitor.wait();
    reader.join().unwrap();
    let lines = lines.lock().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("PropertiesChanged")),
        "gdbus monitor works: {lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("Mistrald1.Token") || l.contains("Mistrald1.Done")),
        "gdbus monitor saw another client's text: {lines:?}"
    );
}

/// What one D-Bus client got: per request id, the concatenated Token texts and Done's text.
type Answers = HashMap<u64, (String, String)>;

/// One D-Bus client: its own connection, two requests at once; checks that every signal it
/// receives carries one of its own ids.
async fn dbus_client(bus: &Bus, prompts: [String; 2]) -> Result<Vec<(String, String)>, String> {
    let conn = bus.connect().await;
    let proxy = Mistrald1Proxy::new(&conn).await.unwrap();
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut dones = proxy.receive_done().await.unwrap();
    let mut ids = Vec::new();
    for p in &prompts {
        match proxy.generate(p, greedy(12)).await {
            Ok(id) => ids.push(id),
            Err(zbus::Error::MethodError(name, message, _)) => {
                // Refused explicitly: only Busy is acceptable under this load.
                assert_eq!(
                    name.as_str(),
                    "org.mistrald.Mistrald1.Error.Busy",
                    "{message:?}"
                );
                return Err(name.to_string());
            }
            Err(e) => panic!("{e}"),
        }
    }
    let own: HashSet<u64> = ids.iter().copied().collect();
    let mut answers: Answers = HashMap::new();
    let mut done = 0;
    while done < ids.len() {
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                let a = t.args().unwrap();
                assert!(own.contains(&a.request_id), "a foreign Token {} (own {own:?})", a.request_id);
                answers.entry(a.request_id).or_default().0.push_str(a.text);
            }
            Some(d) = dones.next() => {
                let a = d.args().unwrap();
                assert!(own.contains(&a.request_id), "a foreign Done {}", a.request_id);
                assert_eq!(a.finish_reason, "length", "{:?}", a.usage);
                answers.entry(a.request_id).or_default().1 = a.text.to_string();
                done += 1;
            }
        }
    }
    Ok(ids
        .iter()
        .map(|id| answers.remove(id).unwrap_or_default())
        .collect())
}

#[test]
fn sixteen_dbus_and_sixteen_socket_clients_at_once_get_their_own_answers() {
    let bus = Bus::session();
    let d = start_daemon(&bus, &config_with(""), &[]);
    let prompt = |i: usize| format!("Fortune number {i} says");
    let bus = &bus;
    let d = &d;
    let (dbus_results, socket_results) = std::thread::scope(|s| {
        let dbus: Vec<_> = (0..16)
            .map(|i| s.spawn(move || block_on(dbus_client(bus, [prompt(i), prompt(i + 16)]))))
            .collect();
        let socket: Vec<_> = (0..16)
            .map(|i| {
                let socket = d.socket.clone();
                s.spawn(move || {
                    let body = json!({"prompt": prompt(i), "max_tokens": 12,
                                      "temperature": 0, "stream": true});
                    block_on(stream_events(
                        &socket,
                        "/v1/completions",
                        &body.to_string(),
                        usize::MAX,
                    ))
                    .unwrap()
                })
            })
            .collect();
        (
            dbus.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            socket
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });
    let mut answered = 0;
    for (i, result) in dbus_results.iter().enumerate() {
        let Ok(pairs) = result else { continue };
        for (j, (streamed, done)) in pairs.iter().enumerate() {
            assert_eq!(
                streamed, done,
                "client {i} request {j}: Tokens and Done agree"
            );
            assert!(!done.is_empty());
            answered += 1;
        }
        // Same prompt, same greedy answer as the socket client with it.
        let (code, events) = &socket_results[i];
        if *code == 200 {
            assert_eq!(
                pairs[0].1,
                streamed_text(events),
                "client {i}: D-Bus and socket agree"
            );
        }
    }
    let socket_ok = socket_results
        .iter()
        .filter(|(code, _)| *code == 200)
        .count();
    for (code, events) in &socket_results {
        assert!(*code == 200 || *code == 503, "{code} {events:?}");
    }
    assert_eq!(answered, 32, "the queue holds them all: none refused");
    assert_eq!(socket_ok, 16);
    let status = d.status();
    assert_eq!(status["active"], 0);
    assert_eq!(status["queued"], 0);
}
