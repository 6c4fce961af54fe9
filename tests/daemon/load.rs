//! Load: 32 concurrent clients × 4 requests each on a tiny model, three rounds. Every request
//! gets a complete answer or an explicit 503 — none lost, none hung — and the daemon's resident
//! memory stays flat from round to round.

use crate::common::daemon::{request, Daemon};
use crate::common::tiny_model;
use mistrald::ggml::GgmlType;
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn thirty_two_clients_get_an_answer_or_a_503_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), GgmlType::Q8_0);
    let config = format!(
        "[model]\npath = \"{}\"\nthreads = 2\n[server]\nparallel = 8\nqueue_size = 8\n",
        model.display()
    );
    let d = Daemon::start(&config, &[]);
    let mut rss = Vec::new();
    for round in 0..3 {
        let socket = d.socket.clone();
        let outcomes: Vec<(u16, String)> = crate::common::daemon::block_on(async move {
            let mut clients = Vec::new();
            for c in 0..32 {
                let socket = socket.clone();
                clients.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    for r in 0..4 {
                        let stream = (c + r) % 2 == 0;
                        let body = json!({
                            "prompt": format!("client {c} request {r}"),
                            "max_tokens": 16,
                            "temperature": 0.7,
                            "seed": c * 4 + r,
                            "stream": stream,
                        });
                        let answer = tokio::time::timeout(
                            Duration::from_secs(120),
                            request(
                                &socket,
                                "POST",
                                "/v1/completions",
                                Some(body.to_string().into_bytes()),
                                &[],
                            ),
                        )
                        .await
                        .expect("an answer within 120 s (none hung)")
                        .expect("a response (none lost)");
                        got.push((answer.0, answer.2, stream));
                    }
                    got
                }));
            }
            let mut all = Vec::new();
            for c in clients {
                for (status, body, stream) in c.await.unwrap() {
                    match status {
                        200 if stream => {
                            assert!(
                                body.trim_end().ends_with("data: [DONE]"),
                                "complete stream: {body}"
                            );
                            assert!(
                                body.contains("\"finish_reason\":\"length\"")
                                    || body.contains("\"finish_reason\":\"stop\""),
                                "{body}"
                            );
                        }
                        200 => {
                            let v: Value = serde_json::from_str(&body).unwrap();
                            assert!(v["choices"][0]["finish_reason"].is_string(), "{body}");
                        }
                        503 => {
                            let v: Value = serde_json::from_str(&body).unwrap();
                            assert_eq!(v["error"]["code"], "overloaded", "{body}");
                        }
                        other => panic!("unexpected status {other}: {body}"),
                    }
                    all.push((status, body));
                }
            }
            all
        });
        let ok = outcomes.iter().filter(|(s, _)| *s == 200).count();
        let busy = outcomes.iter().filter(|(s, _)| *s == 503).count();
        assert_eq!(ok + busy, 128);
        assert!(ok >= 16, "at least the first wave is served: {ok}");
        let s = d.status();
        assert_eq!(
            (s["active"].as_u64(), s["queued"].as_u64()),
            (Some(0), Some(0))
        );
        rss.push(d.rss_kib());
        eprintln!(
            "round {}: {ok} answered, {busy} refused with 503; daemon RSS {} KiB",
            round + 1,
            rss[round]
        );
    }
    // Flat: the last round holds no more than the first plus a small allocator margin.
    assert!(
        rss[2] <= rss[0] + rss[0] / 10 + 8192,
        "RSS grew over the rounds: {rss:?} KiB"
    );
}
