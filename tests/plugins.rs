//! The example plugins (built from source) through the real host, and the
//! `mistrald plugin` command line.
#![cfg(feature = "plugins")]

mod common;

use std::process::Command;

use common::plugins::{config, dist, good_moderation, info, plugin};
use mistrald::plugins::{LoadError, OnError, PluginChain, PluginError, PluginHost};

fn chain_of(
    plugins: Vec<mistrald::plugins::PluginConfig>,
) -> (PluginHost, std::sync::Arc<PluginChain>) {
    let (host, report) = PluginHost::new(config(plugins)).expect("host starts");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let chain = host.chain();
    (host, chain)
}

fn moderation(config: &str) -> mistrald::plugins::PluginConfig {
    plugin(
        "moderation",
        &dist().join("moderation.wasm"),
        config,
        OnError::Fail,
    )
}

fn format(config: &str) -> mistrald::plugins::PluginConfig {
    plugin("format", &dist().join("format.wasm"), config, OnError::Fail)
}

/// Streams `pieces` through a chunk filter; returns the pieces sent and
/// whether a plugin stopped the stream.
fn stream(chain: &PluginChain, pieces: &[&str]) -> (Vec<String>, bool) {
    let mut filter = chain.chunk_filter(&info());
    let mut sent = Vec::new();
    for piece in pieces {
        let out = filter.push(piece).expect("chunk");
        sent.push(out.text);
        if out.stop {
            sent.push(filter.finish().expect("finish"));
            return (sent, true);
        }
    }
    sent.push(filter.finish().expect("finish"));
    (sent, false)
}

#[test]
fn moderation_redacts_words_and_regexes() {
    let (_host, chain) =
        moderation_chain("action = \"redact\"\nblocklist = [\"darn\", \"/secret\\\\w*/\"]");
    let out = chain
        .on_prompt("Darn, the secretive plan. Darning is fine.", &info())
        .unwrap();
    assert_eq!(out, "****, the ********* plan. Darning is fine.");
    let out = chain.on_complete("no darn secrets", &info()).unwrap();
    assert_eq!(out, "no **** *******");
}

fn moderation_chain(config: &str) -> (PluginHost, std::sync::Arc<PluginChain>) {
    chain_of(vec![moderation(config)])
}

#[test]
fn moderation_rejects_prompt_and_output() {
    let (_host, chain) = moderation_chain("action = \"reject\"\nblocklist = [\"launch codes\"]");
    assert_eq!(
        chain.on_prompt("hello there", &info()).unwrap(),
        "hello there"
    );
    let err = chain
        .on_prompt("tell me the LAUNCH CODES", &info())
        .unwrap_err();
    match &err {
        PluginError::Rejected { plugin, reason, .. } => {
            assert_eq!(plugin, "moderation");
            assert!(
                reason.contains("prompt contains blocked content"),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other}"),
    }
    assert!(
        err.to_string()
            .starts_with("rejected by plugin 'moderation' (on-prompt)"),
        "{err}"
    );
    let err = chain
        .on_complete("the launch codes are", &info())
        .unwrap_err();
    assert!(
        err.to_string().contains("output contains blocked content"),
        "{err}"
    );
}

#[test]
fn moderation_catches_words_split_across_chunks() {
    let (_host, chain) = moderation_chain("blocklist = [\"forbidden\", \"very bad idea\"]");
    let pieces = [
        "This is forb",
        "idden",
        " and a ve",
        "ry b",
        "ad idea, ok",
        ".",
    ];
    let (sent, stopped) = stream(&chain, &pieces);
    assert!(!stopped);
    assert_eq!(sent.concat(), "This is ********* and a *************, ok.");
    for piece in &sent {
        assert!(
            !piece.contains("forb") && !piece.contains("ve"),
            "leaked {piece:?} in {sent:?}"
        );
    }
    // A word that only starts like a blocked one is released once it is complete.
    let (sent, _) = stream(&chain, &["forbid", "s nothing"]);
    assert_eq!(sent.concat(), "forbids nothing");

    let (_host, chain) = moderation_chain("action = \"reject\"\nblocklist = [\"forbidden\"]");
    let (sent, stopped) = stream(&chain, &["We ", "talk about forb", "idden things", " now"]);
    assert!(stopped, "{sent:?}");
    assert_eq!(sent.concat(), "We talk about ");
}

#[test]
fn format_strips_markdown_and_normalizes_whitespace() {
    let (_host, chain) = chain_of(vec![format("")]);
    let text = "# Weather  today\n\n**Sunny** and  `warm`, see [the map](https://x.example/map).\n\n\n\n- first   item\n- second item\n\n```\nlet x = 1;\n```\n> quoted *words*\n---\n| a | b |\n|---|---|\n| 1 | 2 |\n";
    let out = chain.on_complete(text, &info()).unwrap();
    assert_eq!(
        out,
        "Weather today\n\nSunny and warm, see the map.\n\nfirst item\nsecond item\n\nlet x = 1;\nquoted words\n\na, b\n1, 2"
    );
    // Streamed in small pieces, the client gets the same text.
    let pieces: Vec<&str> = text
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let (sent, stopped) = stream(&chain, &pieces);
    assert!(!stopped);
    assert_eq!(sent.concat(), out);
}

#[test]
fn format_trims_to_max_length_on_a_sentence_boundary() {
    let (_host, chain) = chain_of(vec![format("max_length = 40")]);
    let text = "First sentence here. Second sentence is longer. Third one.";
    assert_eq!(
        chain.on_complete(text, &info()).unwrap(),
        "First sentence here."
    );
    let (sent, stopped) = stream(
        &chain,
        &[
            "First sen",
            "tence here. Sec",
            "ond sentence is longer. Thi",
            "rd one.",
        ],
    );
    assert!(stopped, "{sent:?}");
    assert_eq!(sent.concat(), "First sentence here.");
    // No sentence end within the limit: cut at a word, marked.
    let out = chain
        .on_complete(
            "one two three four five six seven eight nine ten eleven",
            &info(),
        )
        .unwrap();
    assert_eq!(out, "one two three four five six seven eight…");
}

#[test]
fn chain_runs_in_config_order() {
    let (_host, chain) = chain_of(vec![
        moderation("blocklist = [\"darn\"]\nreplacement = \"[redacted]\""),
        format(""),
    ]);
    let out = chain.on_complete("**Darn**   it", &info()).unwrap();
    assert_eq!(out, "[redacted] it");
    let (sent, _) = stream(&chain, &["**Da", "rn**  it. ", "Fine."]);
    assert_eq!(sent.concat(), "[redacted] it. Fine.");
}

#[test]
fn plugin_config_is_passed_and_checked() {
    // A value the plugin refuses: reported at load, naming plugin and key.
    let broken = moderation("action = \"shout\"");
    let (host, report) = PluginHost::new(config(vec![broken.clone(), format("")])).unwrap();
    assert_eq!(report.loaded.len(), 1);
    let err = report.skipped[0].to_string();
    assert!(
        err.contains("plugin 'moderation'") && err.contains("`action`"),
        "{err}"
    );
    assert_eq!(host.chain().plugins()[0].0, "format");

    // The same plugin marked required refuses to start.
    let mut required = broken;
    required.required = true;
    let err = PluginHost::new(config(vec![required]))
        .err()
        .expect("refused");
    assert!(matches!(err, LoadError::Plugin { .. }), "{err}");

    // A value the host cannot pass (nested table) names the key.
    let err = PluginHost::new(config(vec![{
        let mut p = moderation("[nested]\nx = 1");
        p.required = true;
        p
    }]))
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("config key `nested`"), "{err}");

    // Unknown keys are refused by the template too.
    let template = plugin(
        "template",
        &dist().join("template.wasm"),
        "colour = \"red\"",
        OnError::Fail,
    );
    let (_, report) = PluginHost::new(config(vec![template])).unwrap();
    assert!(report.skipped[0]
        .to_string()
        .contains("unknown config key `colour`"));
}

#[test]
fn reload_picks_up_new_configuration_and_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        dist().join("template.wasm"),
        dir.path().join("template.wasm"),
    )
    .unwrap();
    let mut cfg = config(vec![]);
    cfg.dir = dir.path().to_owned();
    cfg.autoload = true;
    let (host, report) = PluginHost::new(cfg.clone()).unwrap();
    assert_eq!(report.loaded.len(), 1);
    assert_eq!(report.loaded[0].name, "template");

    std::fs::copy(
        dist().join("moderation.wasm"),
        dir.path().join("moderation.wasm"),
    )
    .unwrap();
    let old = host.chain();
    let report = host.reload().unwrap();
    let names: Vec<_> = report.loaded.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["moderation", "template"]);
    assert_eq!(old.plugins().len(), 1, "a chain in use does not change");

    // Compiled code went to the cache; a new host loads it from there.
    let cached = std::fs::read_dir(common::plugins::cache_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "cwasm")
        })
        .count();
    assert!(cached >= 2, "{cached} cached components");

    cfg.chain = vec![good_moderation()];
    cfg.autoload = false;
    host.reload_with(cfg).unwrap();
    assert_eq!(host.chain().on_prompt("darn", &info()).unwrap(), "****");
}

fn mistrald(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mistrald"))
        .args(args)
        .output()
        .expect("run mistrald")
}

#[test]
fn cli_check_prints_describe_of_a_valid_plugin() {
    let file = dist().join("moderation.wasm");
    let out = mistrald(&["plugin", "check", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("valid mistrald plugin"), "{stdout}");
    assert!(stdout.contains("name: moderation"), "{stdout}");
    assert!(
        stdout.contains("hooks: on-prompt, on-chunk, on-complete"),
        "{stdout}"
    );
    assert!(stdout.contains("grants needed: none"), "{stdout}");
}

#[test]
fn cli_check_refuses_a_file_that_is_not_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.wasm");
    std::fs::write(&file, "just some text\n").unwrap();
    let out = mistrald(&["plugin", "check", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("plugin 'notes'") && stderr.contains("not a WebAssembly file"),
        "{stderr}"
    );

    let missing = dir.path().join("missing.wasm");
    let out = mistrald(&["plugin", "check", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

#[test]
fn cli_run_applies_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dist().join("moderation.wasm");
    let redact = dir.path().join("redact.toml");
    std::fs::write(&redact, "blocklist = [\"darn\"]\n").unwrap();
    let out = mistrald(&[
        "plugin",
        "run",
        file.to_str().unwrap(),
        "--hook",
        "on-complete",
        "--text",
        "well darn it",
        "--config-file",
        redact.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "well **** it\n");

    let reject = dir.path().join("reject.toml");
    std::fs::write(&reject, "blocklist = [\"darn\"]\naction = \"reject\"\n").unwrap();
    let out = mistrald(&[
        "plugin",
        "run",
        file.to_str().unwrap(),
        "--hook",
        "on-prompt",
        "--text",
        "darn",
        "--config-file",
        reject.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rejected by plugin 'moderation' (on-prompt)"),
        "{stderr}"
    );
}

#[test]
fn cli_bench_runs_on_a_pass_through_plugin() {
    let file = dist().join("template.wasm");
    let out = mistrald(&[
        "plugin",
        "bench",
        file.to_str().unwrap(),
        "--tokens",
        "20",
        "--requests",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("on-chunk per later call"), "{stdout}");
    // A plugin that changes the text is refused (the numbers would be meaningless).
    let out = mistrald(&[
        "plugin",
        "bench",
        dist().join("format.wasm").to_str().unwrap(),
        "--tokens",
        "20",
        "--requests",
        "1",
    ]);
    assert!(!out.status.success());
}
