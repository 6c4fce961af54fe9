//! Plugins in the request path: the example moderation plugin (built from `plugins/`) redacting
//! and rejecting, and a hostile plugin (an infinite loop, written in WAT) that fails only the
//! request that triggers it.

use crate::common::daemon::{
    block_on, config_with, generate_cli, request, stream_events, streamed_text, Daemon,
};
use crate::common::plugins::{cache_dir, component, dist};
use serde_json::{json, Value};

/// A `[plugins]` section with one chain entry.
fn plugins_section(dir: &std::path::Path, name: &str, path: &str, extra: &str) -> String {
    format!(
        "[plugins]\ndir = \"{}\"\nautoload = false\ncache_dir = \"{}\"\n\n[[plugins.chain]]\nname = \"{name}\"\npath = \"{path}\"\n{extra}\n",
        dir.display(),
        cache_dir().display()
    )
}

/// The greedy completion of "The" and a word of it to block.
fn output_and_word() -> (String, String) {
    let text = generate_cli("The", 30, false);
    let word = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|w| w.len() >= 4)
        .expect("a word of four letters or more")
        .to_string();
    (text, word)
}

fn redacted(text: &str, word: &str) -> String {
    // Whole-word, case-insensitive, as the moderation plugin matches.
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest
            .find(|c: char| c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        let w = &rest[..end];
        out.push_str(if w.eq_ignore_ascii_case(word) {
            "[gone]"
        } else {
            w
        });
        rest = &rest[end..];
    }
    out
}

#[test]
fn moderation_redacts_streamed_and_final_output_and_rejects_prompts_and_outputs() {
    let (text, word) = output_and_word();
    let cfg = plugins_section(
        dist(),
        "moderation",
        "moderation.wasm",
        &format!("[plugins.chain.config]\naction = \"redact\"\nreplacement = \"[gone]\"\nblocklist = [\"{word}\"]"),
    );
    let d = Daemon::start(&config_with(&cfg), &[]);
    let want = redacted(&text, &word);
    assert_ne!(want, text);
    let body = json!({"prompt": "The", "max_tokens": 30, "temperature": 0});
    let (code, v) = d.post_json("/v1/completions", &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        want.as_str(),
        "on-complete redacts"
    );
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (_, events) = d.stream("/v1/completions", &streaming);
    assert_eq!(streamed_text(&events), want, "on-chunk redacts the stream");
    // The prompt goes through on-prompt too (a redacted prompt still generates).
    let (code, _) = d.post_json(
        "/v1/completions",
        &json!({"prompt": format!("The {word}"), "max_tokens": 3}),
    );
    assert_eq!(code, 200);
    assert!(
        d.log_text().contains("plugins: moderation"),
        "{}",
        d.log_text()
    );
    drop(d);

    let cfg = plugins_section(
        dist(),
        "moderation",
        "moderation.wasm",
        &format!(
            "[plugins.chain.config]\naction = \"reject\"\nblocklist = [\"forbidden\", \"{word}\"]"
        ),
    );
    let d = Daemon::start(&config_with(&cfg), &[]);
    // A refused prompt: 400 with code content_filter, naming the plugin.
    let (code, v) = d.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "tell me something forbidden"}]}),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["code"], "content_filter");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("moderation"));
    // A refused output: finish_reason content_filter, not streamed and streamed.
    let (code, v) = d.post_json("/v1/completions", &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    let (_, events) = d.stream("/v1/completions", &streaming);
    let finish: Vec<Value> = events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|v| v["choices"][0]["finish_reason"].is_string())
        .collect();
    assert_eq!(
        finish.last().unwrap()["choices"][0]["finish_reason"],
        "content_filter"
    );
    assert!(!streamed_text(&events)
        .to_lowercase()
        .contains(&word.to_lowercase()));
    // Other requests are unaffected.
    let (code, _) = d.post_json(
        "/v1/completions",
        &json!({"prompt": "Never", "max_tokens": 3}),
    );
    assert_eq!(code, 200);
}

#[test]
fn a_hostile_plugin_fails_only_the_request_that_triggers_it() {
    // on-prompt / on-complete loop forever when the text starts with '!', else pass it on.
    let wasm = component(
        "(if (i32.eq (i32.load8_u (local.get 0)) (i32.const 33)) (then (loop $l (br $l)))) \
         (i32.store8 (i32.const 160) (i32.const 0)) \
         (i32.store (i32.const 164) (local.get 0)) \
         (i32.store (i32.const 168) (local.get 1)) (i32.const 160)",
        "",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hostile.wasm"), wasm).unwrap();
    let cfg = plugins_section(dir.path(), "hostile", "hostile.wasm", "on_error = \"fail\"");
    let d = Daemon::start(&config_with(&cfg), &[]);
    let socket = d.socket.clone();
    let (hostile, friendly) = block_on(async move {
        let bad = tokio::spawn({
            let socket = socket.clone();
            async move {
                request(
                    &socket,
                    "POST",
                    "/v1/completions",
                    Some(
                        json!({"prompt": "!loop", "max_tokens": 4})
                            .to_string()
                            .into_bytes(),
                    ),
                    &[],
                )
                .await
            }
        });
        let good = tokio::spawn(async move {
            stream_events(
                &socket,
                "/v1/completions",
                &json!({"prompt": "Never", "max_tokens": 20, "temperature": 0, "stream": true})
                    .to_string(),
                usize::MAX,
            )
            .await
        });
        (bad.await.unwrap().unwrap(), good.await.unwrap().unwrap())
    });
    assert_eq!(hostile.0, 500, "{}", hostile.2);
    let v: Value = serde_json::from_str(&hostile.2).unwrap();
    assert_eq!(v["error"]["code"], "plugin_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("hostile") && message.contains("timed out"),
        "{message}"
    );
    assert_eq!(friendly.0, 200);
    assert_eq!(streamed_text(&friendly.1), generate_cli("Never", 20, false));
    assert_eq!(d.get("/health").0, 200);
    let (code, _) = d.post_json(
        "/v1/completions",
        &json!({"prompt": "Love is", "max_tokens": 3}),
    );
    assert_eq!(code, 200);
}
