//! Bad input, table-driven: every case gets the right status and an OpenAI-shaped JSON error,
//! and the daemon keeps serving.

use crate::common::daemon::{block_on, config_with, raw_exchange, request, Daemon};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    /// The field the error must name (`error.param`), when there is one.
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: Value,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        path,
        body: body.to_string().into_bytes(),
        status,
        param,
    }
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn cases() -> Vec<Case> {
    let long_prompt = "word ".repeat(3000);
    let many_stops: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let raw = |name, path, body: &[u8], status| Case {
        name,
        method: "POST",
        path,
        body: body.to_vec(),
        status,
        param: None,
    };
    let mut v = vec![
        raw(
            "malformed JSON",
            CHAT,
            br#"{"messages": [{"role": "user""#,
            400,
        ),
        raw("empty body", CHAT, b"", 400),
        raw(
            "invalid UTF-8",
            COMPLETIONS,
            b"{\"prompt\": \"\xff\xfe\"}",
            400,
        ),
        raw("JSON array instead of an object", CHAT, b"[1, 2, 3]", 400),
        case(
            "messages missing",
            CHAT,
            json!({"max_tokens": 5}),
            400,
            Some("messages"),
        ),
        case(
            "empty messages",
            CHAT,
            json!({"messages": []}),
            400,
            Some("messages"),
        ),
        case(
            "unknown role",
            CHAT,
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            Some("messages[0].role"),
        ),
        case(
            "content of the wrong type",
            CHAT,
            json!({"messages": [{"role": "user", "content": 42}]}),
            400,
            Some("messages[0].content"),
        ),
        case(
            "messages not a list",
            CHAT,
            json!({"messages": "hello"}),
            400,
            Some("messages"),
        ),
        case(
            "negative max_tokens",
            CHAT,
            json!({"messages": user("hi"), "max_tokens": -5}),
            400,
            Some("max_tokens"),
        ),
        case(
            "huge max_tokens",
            CHAT,
            json!({"messages": user("hi"), "max_tokens": 1_000_000_000_000u64}),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens as a string",
            CHAT,
            json!({"messages": user("hi"), "max_tokens": "ten"}),
            400,
            Some("max_tokens"),
        ),
        case(
            "zero max_completion_tokens",
            CHAT,
            json!({"messages": user("hi"), "max_completion_tokens": 0}),
            400,
            Some("max_completion_tokens"),
        ),
        case(
            "temperature as a string",
            CHAT,
            json!({"messages": user("hi"), "temperature": "hot"}),
            400,
            Some("temperature"),
        ),
        case(
            "temperature out of range",
            CHAT,
            json!({"messages": user("hi"), "temperature": 7.5}),
            400,
            Some("temperature"),
        ),
        case(
            "top_p of zero",
            CHAT,
            json!({"messages": user("hi"), "top_p": 0}),
            400,
            Some("top_p"),
        ),
        case(
            "n = 2",
            CHAT,
            json!({"messages": user("hi"), "n": 2}),
            400,
            Some("n"),
        ),
        case(
            "100 stop strings",
            CHAT,
            json!({"messages": user("hi"), "stop": many_stops}),
            400,
            Some("stop"),
        ),
        case(
            "stop of the wrong type",
            CHAT,
            json!({"messages": user("hi"), "stop": 5}),
            400,
            Some("stop"),
        ),
        case(
            "top_logprobs too large",
            CHAT,
            json!({"messages": user("hi"), "logprobs": true, "top_logprobs": 50}),
            400,
            Some("top_logprobs"),
        ),
        case(
            "stream not a boolean",
            CHAT,
            json!({"messages": user("hi"), "stream": "yes"}),
            400,
            Some("stream"),
        ),
        case(
            "negative seed",
            CHAT,
            json!({"messages": user("hi"), "seed": -1}),
            400,
            Some("seed"),
        ),
        case(
            "presence_penalty out of range",
            CHAT,
            json!({"messages": user("hi"), "presence_penalty": 3}),
            400,
            Some("presence_penalty"),
        ),
        case(
            "prompt missing",
            COMPLETIONS,
            json!({"max_tokens": 5}),
            400,
            Some("prompt"),
        ),
        case(
            "prompt of the wrong type",
            COMPLETIONS,
            json!({"prompt": 17}),
            400,
            Some("prompt"),
        ),
        case(
            "several prompts",
            COMPLETIONS,
            json!({"prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        case(
            "prompt longer than the context",
            COMPLETIONS,
            json!({"prompt": long_prompt}),
            400,
            None,
        ),
        case(
            "detokenize an id outside the vocabulary",
            "/detokenize",
            json!({"tokens": [99999999]}),
            400,
            None,
        ),
        case(
            "tokenize without content",
            "/tokenize",
            json!({"text": "hi"}),
            400,
            None,
        ),
    ];
    v.push(Case {
        name: "unknown route",
        method: "GET",
        path: "/v1/nothing-here",
        body: Vec::new(),
        status: 404,
        param: None,
    });
    v.push(Case {
        name: "wrong method",
        method: "GET",
        path: CHAT,
        body: Vec::new(),
        status: 405,
        param: None,
    });
    v.push(Case {
        name: "wrong method on a GET route",
        method: "DELETE",
        path: "/v1/models",
        body: Vec::new(),
        status: 405,
        param: None,
    });
    v
}

#[test]
fn bad_requests_get_the_right_status_and_a_json_error_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&config_with(""), &[]);
    let cases = cases();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in &cases {
        let body = (!c.body.is_empty() || c.method == "POST").then(|| c.body.clone());
        let (status, _, text) = block_on(request(&d.socket, c.method, c.path, body, &[])).unwrap();
        let json: Option<Value> = serde_json::from_str(&text).ok();
        let error = json.as_ref().map(|j| &j["error"]);
        let ok = status == c.status
            && error.is_some_and(|e| {
                e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string()
            })
            && c.param
                .is_none_or(|p| error.is_some_and(|e| e["param"] == p));
        if !ok {
            failures.push(format!(
                "{}: got {status} {}",
                c.name,
                &text[..text.len().min(300)]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // A 10 MB body: refused from its Content-Length, before it is read.
    let mut head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    )
    .into_bytes();
    head.extend(std::iter::repeat_n(b'a', 64 << 10));
    let answer = raw_exchange(&d.socket, &head, Duration::from_secs(10));
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: Value = serde_json::from_str(json.trim()).unwrap_or_else(|_| panic!("{answer}"));
    assert!(v["error"]["message"].is_string());
    // A request sent halfway, then the connection dropped.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"hal").unwrap();
    drop(s);
    // Bytes that are not HTTP at all.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x01\x02 hello there\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    // Still serving, and nothing leaked.
    assert_eq!(d.get("/health").0, 200);
    let (code, v) = d.post_json(COMPLETIONS, &json!({"prompt": "Never", "max_tokens": 4}));
    assert_eq!(code, 200, "{v}");
    let s = d.status();
    assert_eq!(
        (s["active"].as_u64(), s["queued"].as_u64()),
        (Some(0), Some(0))
    );
}
