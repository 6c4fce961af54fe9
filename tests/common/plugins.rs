//! Helpers shared by the plugin integration tests: building the example
//! plugins once per test binary, a shared compiled-code cache, configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mistrald::plugins::{OnError, PluginConfig, PluginsConfig, RequestInfo};

/// Builds the example plugins (once per test binary) and returns `plugins/dist`.
pub fn dist() -> &'static Path {
    static DIST: OnceLock<PathBuf> = OnceLock::new();
    DIST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let output = Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("run plugins/build.sh");
        assert!(
            output.status.success(),
            "plugins/build.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        root.join("plugins/dist")
    })
}

/// A compiled-code cache shared by the tests of this binary (so each plugin
/// is compiled once).
pub fn cache_dir() -> PathBuf {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
        .to_owned()
}

/// A plugin entry for `path` named `name` with a config table in TOML.
pub fn plugin(name: &str, path: &Path, config: &str, on_error: OnError) -> PluginConfig {
    let mut plugin = PluginConfig::new(name);
    plugin.path = Some(path.to_owned());
    plugin.on_error = on_error;
    plugin.config = toml::from_str(config).expect("config table");
    plugin
}

/// A `[plugins]` config with exactly `chain` (no autoload).
pub fn config(chain: Vec<PluginConfig>) -> PluginsConfig {
    PluginsConfig {
        dir: PathBuf::from("/nonexistent"),
        autoload: false,
        cache_dir: Some(cache_dir()),
        chain,
        ..PluginsConfig::default()
    }
}

/// Request facts for tests.
pub fn info() -> RequestInfo {
    RequestInfo {
        id: 7,
        model: "test".into(),
        client: "uid:1000".into(),
        streaming: true,
    }
}

/// The moderation plugin redacting "darn", used as the good plugin.
pub fn good_moderation() -> PluginConfig {
    plugin(
        "moderation",
        &dist().join("moderation.wasm"),
        "blocklist = [\"darn\"]",
        OnError::Fail,
    )
}

/// Little-endian bytes of `n` as a WAT string escape.
pub fn le(n: u32) -> String {
    n.to_le_bytes()
        .iter()
        .map(|b| format!("\\{b:02x}"))
        .collect()
}

/// A component implementing the `mistrald:plugin` world whose `on-prompt`
/// (and `on-complete`) run `prompt_body`, a core function body returning a
/// pointer to a `result<string, rejection>` (default: pass the text). `funcs`
/// adds core functions, `imports` component-level imports.
pub fn component(prompt_body: &str, funcs: &str, imports: &str) -> Vec<u8> {
    let wat = wat_source(prompt_body, funcs, imports);
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("WAT does not parse: {e}\n{wat}"))
}

/// The WAT text of [`component`].
pub fn wat_source(prompt_body: &str, funcs: &str, imports: &str) -> String {
    let name = "hostile";
    let version = "1.0";
    // describe's return area at 64: name, version, description, hooks.
    let describe = format!(
        "{}{}{}{}{}{}{}{}",
        le(256),
        le(name.len() as u32),
        le(320),
        le(version.len() as u32),
        le(256),
        le(0),
        le(336),
        le(3)
    );
    let pass = "(i32.store8 (i32.const 160) (i32.const 0)) \
                (i32.store (i32.const 164) (local.get 0)) \
                (i32.store (i32.const 168) (local.get 1)) (i32.const 160)";
    let body = if prompt_body.is_empty() {
        pass
    } else {
        prompt_body
    };
    format!(
        r#"(component
  {imports}
  (core module $m
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (func $realloc (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
      (global.set $heap (i32.add (local.get $p) (local.get 3)))
      (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
        (then
          (if (i32.eq (memory.grow (i32.add (i32.shr_u (global.get $heap) (i32.const 16)) (i32.const 1)))
                      (i32.const -1))
            (then unreachable))))
      (local.get $p))
    (data (i32.const 64) "{describe}")
    (data (i32.const 256) "{name}")
    (data (i32.const 320) "{version}")
    (data (i32.const 336) "\00\01\02")
    (data (i32.const 512) "\ff\fe\fd")
    (func (export "describe") (result i32) (i32.const 64))
    (func (export "init") (param i32 i32) (result i32) (i32.const 128))
    (func (export "on-prompt") (param i32 i32 i64 i32 i32 i32 i32 i32) (result i32) {body})
    (func (export "on-chunk") (param i32 i32 i32) (result i32)
      (i32.store8 (i32.const 192) (i32.const 0)) (i32.const 192))
    (func (export "on-complete") (param i32 i32 i64 i32 i32 i32 i32 i32) (result i32) {body})
    {funcs}
  )
  (core instance $i (instantiate $m))
  (type $hook' (enum "on-prompt" "on-chunk" "on-complete"))
  (export $hook "hook" (type $hook'))
  (type $plugin-info' (record (field "name" string) (field "version" string)
    (field "description" string) (field "hooks" (list $hook))))
  (export $plugin-info "plugin-info" (type $plugin-info'))
  (type $config-value' (variant (case "text" string) (case "integer" s64) (case "float" f64)
    (case "boolean" bool) (case "text-list" (list string))))
  (export $config-value "config-value" (type $config-value'))
  (type $request-info' (record (field "id" u64) (field "model" string) (field "client" string)
    (field "streaming" bool)))
  (export $request-info "request-info" (type $request-info'))
  (type $rejection' (record (field "reason" string)))
  (export $rejection "rejection" (type $rejection'))
  (type $held' (record (field "release" string) (field "keep" string)))
  (export $held "held" (type $held'))
  (type $chunk-action' (variant (case "pass") (case "replace" string) (case "hold" $held)
    (case "stop" string)))
  (export $chunk-action "chunk-action" (type $chunk-action'))
  (func (export "describe") (result $plugin-info)
    (canon lift (core func $i "describe") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "init") (param "config" (list (tuple string $config-value))) (result (result (error string)))
    (canon lift (core func $i "init") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "on-prompt") (param "prompt" string) (param "info" $request-info)
    (result (result string (error $rejection)))
    (canon lift (core func $i "on-prompt") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "on-chunk") (param "text" string) (param "last" bool) (result $chunk-action)
    (canon lift (core func $i "on-chunk") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "on-complete") (param "text" string) (param "info" $request-info)
    (result (result string (error $rejection)))
    (canon lift (core func $i "on-complete") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
)"#
    )
}
