//! Hostile plugins (WebAssembly components written in WAT here): each one is
//! reported, fails only its request (or is skipped per `on_error`), and the
//! host keeps serving requests through a good chain.
#![cfg(feature = "plugins")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::plugins::{component, config, good_moderation, info, plugin, wat_source};
use mistrald::plugins::{Grant, OnError, PluginConfig, PluginError, PluginHost};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn hostile(path: &Path, on_error: OnError) -> PluginConfig {
    plugin("hostile", path, "", on_error)
}

/// The common scenario: with `on_error = "fail"` the request fails with an
/// error naming the plugin that satisfies `check`; the next request fails the
/// same way (fresh instance) without harming the host; with `"skip"` the good
/// plugin after it still runs; a good chain on the same host works.
fn misbehaves_in_a_call(wasm: &[u8], check: impl Fn(&str)) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "hostile.wasm", wasm);
    let (host, report) = PluginHost::new(config(vec![
        hostile(&path, OnError::Fail),
        good_moderation(),
    ]))
    .expect("host starts");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);

    for _ in 0..2 {
        let started = Instant::now();
        let err = host.chain().on_prompt("darn it", &info()).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(err, PluginError::Failed { .. }), "{err}");
        assert_eq!(err.plugin(), "hostile");
        let message = err.to_string();
        assert!(
            message.starts_with("plugin 'hostile' failed in on-prompt: "),
            "{message}"
        );
        check(&message);
    }

    host.reload_with(config(vec![
        hostile(&path, OnError::Skip),
        good_moderation(),
    ]))
    .unwrap();
    assert_eq!(
        host.chain().on_prompt("darn it", &info()).unwrap(),
        "**** it"
    );

    host.reload_with(config(vec![good_moderation()])).unwrap();
    assert_eq!(
        host.chain().on_complete("oh darn", &info()).unwrap(),
        "oh ****"
    );
}

#[test]
fn infinite_loop_times_out() {
    let wasm = component("(loop $l (br $l)) (unreachable)", "", "");
    misbehaves_in_a_call(&wasm, |m| {
        assert!(m.contains("timed out (time limit 50ms per call)"), "{m}")
    });
}

#[test]
fn unbounded_memory_growth_hits_the_limit() {
    let body = "(block $done (loop $l \
                  (br_if $done (i32.eq (memory.grow (i32.const 256)) (i32.const -1))) \
                  (br $l))) (unreachable)";
    let wasm = component(body, "", "");
    misbehaves_in_a_call(&wasm, |m| {
        assert!(m.contains("exceeded the memory limit of 64 MiB"), "{m}")
    });
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let rec = "(func $rec (param i32) (result i32) \
                 (i32.add (call $rec (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))";
    let wasm = component("(call $rec (i32.const 0))", rec, "");
    misbehaves_in_a_call(&wasm, |m| assert!(m.contains("stack overflow"), "{m}"));
}

#[test]
fn trap_is_reported() {
    let wasm = component("(i32.div_u (i32.const 1) (i32.const 0))", "", "");
    misbehaves_in_a_call(&wasm, |m| {
        assert!(m.contains("trapped") && m.contains("divide by zero"), "{m}")
    });
    let wasm = component("(unreachable)", "", "");
    misbehaves_in_a_call(&wasm, |m| assert!(m.contains("unreachable"), "{m}"));
}

#[test]
fn invalid_utf8_output_is_rejected() {
    let body = "(i32.store8 (i32.const 160) (i32.const 0)) \
                (i32.store (i32.const 164) (i32.const 512)) \
                (i32.store (i32.const 168) (i32.const 3)) (i32.const 160)";
    let wasm = component(body, "", "");
    misbehaves_in_a_call(&wasm, |m| {
        assert!(m.contains("invalid output") && m.contains("utf-8"), "{m}")
    });
}

#[test]
fn enormous_output_is_rejected() {
    // Grows memory by 40 pages and returns 2 MiB of NUL characters.
    let body = "(drop (memory.grow (i32.const 40))) \
                (i32.store8 (i32.const 160) (i32.const 0)) \
                (i32.store (i32.const 164) (i32.const 65536)) \
                (i32.store (i32.const 168) (i32.const 2097152)) (i32.const 160)";
    let wasm = component(body, "", "");
    misbehaves_in_a_call(&wasm, |m| {
        assert!(
            m.contains("returned 2097152 bytes, more than the limit of 1048576"),
            "{m}"
        )
    });
}

#[test]
fn out_of_bounds_output_is_rejected() {
    let body = "(i32.store8 (i32.const 160) (i32.const 0)) \
                (i32.store (i32.const 164) (i32.const 60000)) \
                (i32.store (i32.const 168) (i32.const 100000)) (i32.const 160)";
    let wasm = component(body, "", "");
    misbehaves_in_a_call(&wasm, |m| assert!(m.contains("invalid output"), "{m}"));
}

/// A plugin whose imports need a grant is refused at load (skipped, or the
/// host refuses to start when it is required), and loads once granted.
fn refused_unless_granted(import: &str, grant: Grant, granted_loads: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "hostile.wasm", &component("", "", import));
    let (host, report) = PluginHost::new(config(vec![
        hostile(&path, OnError::Fail),
        good_moderation(),
    ]))
    .unwrap();
    assert_eq!(report.loaded.len(), 1);
    let err = report.skipped[0].to_string();
    assert!(err.starts_with("plugin 'hostile'"), "{err}");
    assert!(
        err.contains(&format!("needs the \"{grant}\" grant")),
        "{err}"
    );
    assert_eq!(host.chain().on_prompt("darn", &info()).unwrap(), "****");

    let mut required = hostile(&path, OnError::Fail);
    required.required = true;
    let err = PluginHost::new(config(vec![required.clone()]))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("grant"), "{err}");

    required.grants = vec![grant];
    let loaded = PluginHost::new(config(vec![required]));
    assert_eq!(loaded.is_ok(), granted_loads, "{:?}", loaded.err());
}

#[test]
fn filesystem_import_is_refused_unless_granted() {
    // The import's type is not wasi's real one: granted, it fails to link
    // (which shows that only the grant check stood in the way before).
    refused_unless_granted(
        r#"(import "wasi:filesystem/preopens@0.2.0" (instance (export "get-directories" (func (result (list string))))))"#,
        Grant::Filesystem,
        false,
    );
}

#[test]
fn network_import_is_refused_unless_granted() {
    refused_unless_granted(
        r#"(import "wasi:sockets/instance-network@0.2.0" (instance (export "instance-network" (func (result u32)))))"#,
        Grant::Network,
        false,
    );
}

#[test]
fn clock_import_is_refused_unless_granted() {
    refused_unless_granted(
        r#"(import "wasi:clocks/monotonic-clock@0.2.0" (instance (export "now" (func (result u64)))))"#,
        Grant::Clock,
        true,
    );
}

#[test]
fn unknown_import_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = component(
        "",
        "",
        r#"(import "wasi:http/outgoing-handler@0.2.0" (instance))"#,
    );
    let path = write(dir.path(), "hostile.wasm", &wasm);
    let (_, report) = PluginHost::new(config(vec![hostile(&path, OnError::Fail)])).unwrap();
    let err = report.skipped[0].to_string();
    assert!(err.contains("does not provide"), "{err}");
}

#[test]
fn files_that_are_not_plugins_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "text.wasm", b"#!/bin/sh\necho hi\n");
    let core = write(
        dir.path(),
        "core.wasm",
        &wat::parse_str("(module)").unwrap(),
    );
    let empty = write(dir.path(), "empty.wasm", b"");
    let (host, report) = PluginHost::new(config(vec![
        plugin("text", &text, "", OnError::Fail),
        plugin("core", &core, "", OnError::Fail),
        plugin("empty", &empty, "", OnError::Fail),
        good_moderation(),
    ]))
    .unwrap();
    let errors: Vec<String> = report.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].starts_with("plugin 'text'") && errors[0].contains("not a WebAssembly file"));
    assert!(
        errors[1].starts_with("plugin 'core'") && errors[1].contains("core WebAssembly module")
    );
    assert!(
        errors[2].starts_with("plugin 'empty'") && errors[2].contains("not a WebAssembly file")
    );
    assert_eq!(host.chain().on_prompt("darn", &info()).unwrap(), "****");
}

#[test]
fn misbehaving_init_is_caught_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let init = "(func (export \"init\") (param i32 i32) (result i32) (i32.const 128))";
    let wat = wat_source("", "", "");
    assert!(wat.contains(init));
    let spin = wat.replace(
        init,
        "(func (export \"init\") (param i32 i32) (result i32) (loop $l (br $l)) (unreachable))",
    );
    let path = write(dir.path(), "spin.wasm", &wat::parse_str(&spin).unwrap());
    let started = Instant::now();
    let (host, report) = PluginHost::new(config(vec![
        hostile(&path, OnError::Fail),
        good_moderation(),
    ]))
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = report.skipped[0].to_string();
    assert!(err.starts_with("plugin 'hostile'"), "{err}");
    assert!(err.contains("init() failed at load: timed out"), "{err}");
    assert_eq!(host.chain().on_prompt("darn", &info()).unwrap(), "****");
}

#[test]
fn fault_in_a_stream_fails_or_skips_only_that_stream() {
    let pass = "(func (export \"on-chunk\") (param i32 i32 i32) (result i32)\n      \
                (i32.store8 (i32.const 192) (i32.const 0)) (i32.const 192))";
    let wat = wat_source("", "", "");
    assert!(wat.contains(pass));
    // Passes the first chunk, traps on the second.
    let trap_second = wat.replace(
        pass,
        "(global $calls (mut i32) (i32.const 0)) \
         (func (export \"on-chunk\") (param i32 i32 i32) (result i32) \
           (global.set $calls (i32.add (global.get $calls) (i32.const 1))) \
           (if (i32.gt_u (global.get $calls) (i32.const 1)) (then unreachable)) \
           (i32.store8 (i32.const 192) (i32.const 0)) (i32.const 192))",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "hostile.wasm",
        &wat::parse_str(&trap_second).unwrap(),
    );
    let (host, _) = PluginHost::new(config(vec![
        hostile(&path, OnError::Fail),
        good_moderation(),
    ]))
    .unwrap();
    let mut filter = host.chain().chunk_filter(&info());
    assert_eq!(filter.push("well ").unwrap().text, "well ");
    let err = filter.push("darn").unwrap_err().to_string();
    assert!(
        err.starts_with("plugin 'hostile' failed in on-chunk: trapped"),
        "{err}"
    );
    assert!(
        filter.push("more").unwrap().stop,
        "the failed stream is over"
    );
    // A new stream gets a fresh instance.
    let mut filter = host.chain().chunk_filter(&info());
    assert_eq!(filter.push("fine ").unwrap().text, "fine ");

    host.reload_with(config(vec![
        hostile(&path, OnError::Skip),
        good_moderation(),
    ]))
    .unwrap();
    let mut filter = host.chain().chunk_filter(&info());
    let mut out = filter.push("well ").unwrap().text;
    out += &filter.push("darn").unwrap().text;
    out += &filter.push(" it").unwrap().text;
    out += &filter.finish().unwrap();
    assert_eq!(out, "well **** it");
}
