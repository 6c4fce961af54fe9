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
