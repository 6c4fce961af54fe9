//! The `[plugins]` section of the daemon configuration (serde types, defaults,
//! validation).
//!
//! ```toml
//! [plugins]
//! dir = "/etc/mistrald/plugins"    # where *.wasm files live
//! autoload = true                  # also load unlisted *.wasm files of `dir`
//! time_limit_ms = 50               # per hook call
//! memory_limit_mib = 64            # per plugin instance
//! max_output_kib = 1024            # largest text a plugin may return
//! cache_dir = "/var/cache/mistrald/plugins"   # optional compiled-code cache
//!
//! [[plugins.chain]]                # in chain order
//! name = "moderation"              # file `<dir>/moderation.wasm` unless `path` is set
//! required = true                  # refuse to start if it cannot be loaded
//! on_error = "fail"                # or "skip": what a fault in a call does
//! grants = []                      # "clock", "env", "filesystem", "network"
//! [plugins.chain.config]           # passed to the plugin's `init`
//! action = "redact"
//! blocklist = ["darn", "/secret\\w*/"]
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::LoadError;
use super::limits::Limits;

/// Default plugin directory.
pub const DEFAULT_PLUGIN_DIR: &str = "/etc/mistrald/plugins";

/// Upper bound accepted for `time_limit_ms`.
const MAX_TIME_LIMIT_MS: u64 = 60_000;
/// Upper bound accepted for `memory_limit_mib`.
const MAX_MEMORY_LIMIT_MIB: u64 = 4096;
/// Upper bound accepted for `max_output_kib`.
const MAX_OUTPUT_KIB: u64 = 64 * 1024;

/// The daemon's `[plugins]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directory holding the plugin files (`*.wasm`).
    pub dir: PathBuf,
    /// Whether `*.wasm` files in `dir` that no `chain` entry names are loaded
    /// too (after the listed ones, in file name order, with default settings).
    pub autoload: bool,
    /// Wall-clock limit of one hook call, in milliseconds.
    pub time_limit_ms: u64,
    /// Memory limit of one plugin instance (all its linear memories), in MiB.
    pub memory_limit_mib: u64,
    /// Largest text (prompt, chunk or output) a plugin may return, in KiB.
    pub max_output_kib: u64,
    /// Directory for compiled plugin code, so a restart or reload does not
    /// compile unchanged plugins again. `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// The plugins, in chain order.
    pub chain: Vec<PluginConfig>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        let limits = Limits::default();
        PluginsConfig {
            dir: PathBuf::from(DEFAULT_PLUGIN_DIR),
            autoload: true,
            time_limit_ms: limits.time_limit.as_millis() as u64,
            memory_limit_mib: limits.memory_bytes >> 20,
            max_output_kib: (limits.max_output_bytes >> 10) as u64,
            cache_dir: None,
            chain: Vec::new(),
        }
    }
}

/// One plugin of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Name used in logs and errors; also the file name (`<name>.wasm`)
    /// when `path` is not set.
    pub name: String,
    /// Plugin file; a relative path is relative to the plugin directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Refuse to start (or to reload) if this plugin cannot be loaded.
    #[serde(default)]
    pub required: bool,
    /// What a trap, timeout or invalid output in one call of this plugin does.
    #[serde(default)]
    pub on_error: OnError,
    /// WASI capabilities granted to this plugin (none by default).
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Host directories made visible, read-only, at the same path inside the
    /// plugin; needs the `filesystem` grant.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// Configuration passed to the plugin's `init` (string, integer, float,
    /// boolean and array-of-strings values).
    #[serde(default)]
    pub config: toml::Table,
}

impl PluginConfig {
    /// A plugin entry with default settings: not required, `on_error = "fail"`,
    /// no grants, empty configuration.
    pub fn new(name: impl Into<String>) -> Self {
        PluginConfig {
            name: name.into(),
            path: None,
            required: false,
            on_error: OnError::default(),
            grants: Vec::new(),
            dirs: Vec::new(),
            config: toml::Table::new(),
        }
    }

    /// The plugin file: `path` (relative to `dir`) or `<dir>/<name>.wasm`.
    pub fn resolved_path(&self, dir: &Path) -> PathBuf {
        match &self.path {
            Some(path) => dir.join(path),
            None => dir.join(format!("{}.wasm", self.name)),
        }
    }

    /// Whether `grant` is in `grants`.
    pub fn grants(&self, grant: Grant) -> bool {
        self.grants.contains(&grant)
    }
}

/// What a fault (trap, timeout, memory limit, invalid output) in one call of
/// a plugin does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The request fails with an error naming the plugin.
    #[default]
    Fail,
    /// The plugin is left out for this request (its input passes unchanged);
    /// the fault is logged.
    Skip,
}

/// A WASI capability a plugin may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// `wasi:clocks` (wall clock and monotonic clock).
    Clock,
    /// The daemon's environment variables (otherwise the plugin sees none).
    Env,
    /// `wasi:filesystem`, limited to the plugin's `dirs`, read-only.
    Filesystem,
    /// `wasi:sockets` (TCP, UDP, name lookup) to any address.
    Network,
}

impl Grant {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Clock => "clock",
            Grant::Env => "env",
            Grant::Filesystem => "filesystem",
            Grant::Network => "network",
        }
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PluginsConfig {
    /// The per-call limits this configuration asks for.
    pub fn limits(&self) -> Limits {
        Limits {
            time_limit: Duration::from_millis(self.time_limit_ms),
            memory_bytes: self.memory_limit_mib << 20,
            max_output_bytes: (self.max_output_kib << 10) as usize,
        }
    }

    /// Checks ranges and consistency; the error names the offending key.
    pub fn validate(&self) -> Result<(), LoadError> {
        let range = |key: &str, value: u64, max: u64| {
            if value == 0 || value > max {
                Err(LoadError::Config(format!(
                    "plugins.{key} = {value} is out of range (1..={max})"
                )))
            } else {
                Ok(())
            }
        };
        range("time_limit_ms", self.time_limit_ms, MAX_TIME_LIMIT_MS)?;
        range(
            "memory_limit_mib",
            self.memory_limit_mib,
            MAX_MEMORY_LIMIT_MIB,
        )?;
        range("max_output_kib", self.max_output_kib, MAX_OUTPUT_KIB)?;
        let mut names = HashSet::new();
        for plugin in &self.chain {
            let name = &plugin.name;
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid_name {
                return Err(LoadError::Config(format!(
                    "plugins.chain: name {name:?} is not valid (1 to 64 of a-z, A-Z, 0-9, '-', '_', '.')"
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(LoadError::Config(format!(
                    "plugins.chain: plugin '{name}' is listed twice"
                )));
            }
            if !plugin.dirs.is_empty() && !plugin.grants(Grant::Filesystem) {
                return Err(LoadError::Config(format!(
                    "plugins.chain: plugin '{name}' lists `dirs` but is not granted \"filesystem\""
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_section_and_fills_defaults() {
        let text = r#"
            dir = "/opt/plugins"
            time_limit_ms = 20
            [[chain]]
            name = "moderation"
            required = true
            on_error = "skip"
            grants = ["clock"]
            [chain.config]
            action = "reject"
            blocklist = ["a", "b"]
            [[chain]]
            name = "format"
            path = "fmt/format.wasm"
        "#;
        let config: PluginsConfig = toml::from_str(text).unwrap();
        assert_eq!(config.dir, PathBuf::from("/opt/plugins"));
        assert_eq!(config.time_limit_ms, 20);
        assert_eq!(config.memory_limit_mib, 64);
        assert!(config.autoload);
        assert_eq!(config.chain.len(), 2);
        assert!(config.chain[0].required);
        assert_eq!(config.chain[0].on_error, OnError::Skip);
        assert_eq!(config.chain[0].grants, vec![Grant::Clock]);
        assert_eq!(config.chain[0].config["action"].as_str(), Some("reject"));
        assert_eq!(config.chain[1].on_error, OnError::Fail);
        assert_eq!(
            config.chain[1].resolved_path(&config.dir),
            PathBuf::from("/opt/plugins/fmt/format.wasm")
        );
        assert_eq!(
            config.chain[0].resolved_path(&config.dir),
            PathBuf::from("/opt/plugins/moderation.wasm")
        );
        config.validate().unwrap();
        assert_eq!(config.limits().time_limit, Duration::from_millis(20));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = toml::from_str::<PluginsConfig>("time_limit = 5").unwrap_err();
        assert!(err.to_string().contains("time_limit"), "{err}");
        let err = toml::from_str::<PluginsConfig>("[[chain]]\nname = \"x\"\ngrants = [\"root\"]")
            .unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");

        let mut config = PluginsConfig {
            time_limit_ms: 0,
            ..PluginsConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("time_limit_ms"), "{err}");

        config.time_limit_ms = 50;
        config.chain = vec![PluginConfig::new("a"), PluginConfig::new("a")];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("'a' is listed twice"), "{err}");

        config.chain = vec![PluginConfig::new("../evil")];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");

        let mut fs = PluginConfig::new("fs");
        fs.dirs = vec![PathBuf::from("/srv")];
        config.chain = vec![fs];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("filesystem"), "{err}");
    }
}
