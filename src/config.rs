//! The daemon's configuration (`mistrald serve`): a TOML file, overridden by flags.
//!
//! ```toml
//! [model]
//! path = "/var/lib/mistrald/models/mistral-7b-instruct.Q4_0.gguf"
//! sliding_window = 4096
//!
//! [server]
//! socket_group = "mistrald"
//! parallel = 4
//!
//! [limits]
//! max_tokens = 4096
//! ```
//!
//! Where it comes from ([`ServeConfig::resolve`]): the file given with `--config FILE`;
//! otherwise [`SYSTEM_CONFIG_PATH`] (or the file named by [`CONFIG_PATH_ENV`]) when it exists;
//! otherwise the defaults. Flags ([`ServeFlags`]) then override it ([`ServeConfig::apply`]).
//!
//! Every option is described once, in a static table of option descriptors (section, key,
//! description, allowed range, flag). The loader checks ranges from that table, and
//! [`print_default`] renders the table, with the default values taken from
//! [`ServeConfig::default`] serialized to TOML, so the printed file cannot drift from what the
//! loader accepts (the unit tests parse it back).
//!
//! Every error names its origin (the file, or the flag), the key (such as `server.parallel`)
//! and, for files, the line:
//! `/etc/mistrald/config.toml: line 7, key server.parallel: 0 is out of range (1..=64)`.

use std::ffi::{CString, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::engine::{AttentionChoice, EngineConfig, MatmulChoice};
use crate::kv_cache::KvType;
use crate::model::offload::{GpuLayers, GpuRequest};
use crate::model::LoadOptions;
use crate::plugins::{LoadError, PluginConfig, PluginsConfig};

/// The system configuration file, read when no `--config` is given and it exists.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/mistrald/config.toml";

/// Environment variable that, when set and not empty, replaces [`SYSTEM_CONFIG_PATH`] (for
/// tests and unusual installations).
pub const CONFIG_PATH_ENV: &str = "MISTRALD_CONFIG";

/// The socket used as root, or when `XDG_RUNTIME_DIR` is not set.
pub const SYSTEM_SOCKET_PATH: &str = "/run/mistrald/mistrald.sock";

/// Name of the socket file inside `$XDG_RUNTIME_DIR`.
pub const SOCKET_FILE_NAME: &str = "mistrald.sock";

/// Default permission bits of the socket.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// Upper bound of `model.threads`.
const MAX_THREADS: u64 = 1024;
/// Lower bound of `model.ctx_size`.
const MIN_CTX_SIZE: u64 = 16;
/// Upper bound of `model.ctx_size` and `model.sliding_window`.
const MAX_POSITIONS: u64 = 1 << 20;
/// Upper bound of `model.batch_size`.
const MAX_BATCH_SIZE: u64 = 8192;
/// Upper bound of `server.parallel`.
const MAX_PARALLEL: u64 = 64;
/// Upper bound of `server.queue_size`.
const MAX_QUEUE_SIZE: u64 = 4096;
/// Bounds of `server.max_body_bytes`.
const MIN_BODY_BYTES: u64 = 1024;
const MAX_BODY_BYTES: u64 = 1 << 30;
/// Upper bound of `server.shutdown_grace`, in seconds.
const MAX_SHUTDOWN_GRACE: f64 = 3600.0;
/// Upper bound of `limits.default_max_tokens` and `limits.max_tokens`.
const MAX_TOKENS_CAP: u64 = 1 << 20;
/// Upper bound of `limits.max_stop_strings`.
const MAX_STOP_STRINGS: u64 = 1024;
/// Upper bound of `prompt_cache.entries`.
const MAX_CACHE_ENTRIES: u64 = 1024;
/// Upper bound of `prompt_cache.max_mib`.
const MAX_CACHE_MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------
// The configuration types
// ------------------------------------------------------------------------------------------

/// The whole configuration of `mistrald serve`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// `[model]`: the model and how it runs.
    pub model: ModelConfig,
    /// `[server]`: sockets, concurrency, shutdown and logging.
    pub server: ServerConfig,
    /// `[limits]`: what one request may ask for.
    pub limits: LimitsConfig,
    /// `[prompt_cache]`: finished sequences kept for reuse.
    pub prompt_cache: PromptCacheConfig,
    /// `[plugins]`: the WASM plugin chain (empty by default).
    pub plugins: PluginsConfig,
}

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// GGUF model file; `None`: the bundled default model (resolved by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Compute threads (at least 1); `None`: all cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Most positions one request may use (at least 16); `None`: the model's context length,
    /// at most [`crate::engine::DEFAULT_MAX_CTX`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx_size: Option<usize>,
    /// Attention window in positions, `Some(0)` for full attention; `None`: the file's value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// KV cache element type.
    #[serde(with = "kv_type_serde")]
    pub kv_type: KvType,
    /// Prompt chunk size and per-step token budget.
    pub batch_size: usize,
    /// Attention implementation.
    #[serde(with = "attention_serde")]
    pub attention: AttentionChoice,
    /// Repack the weight matrices ggml can repack at load time.
    pub repack: bool,
    /// Matrix-product implementation.
    #[serde(with = "matmul_serde")]
    pub matmul: MatmulChoice,
    /// Transformer blocks to offload to a GPU.
    #[serde(with = "gpu_layers_serde")]
    pub gpu_layers: GpuLayers,
    /// The GPU to offload to; `None`: the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: None,
            threads: None,
            ctx_size: None,
            sliding_window: None,
            kv_type: KvType::F16,
            batch_size: 512,
            attention: AttentionChoice::Native,
            repack: true,
            matmul: MatmulChoice::Native,
            gpu_layers: GpuLayers::Auto,
            device: None,
        }
    }
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Unix socket of the HTTP API; `None`: [`default_socket_path`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket.
    pub socket_mode: SocketMode,
    /// Group owning the socket; `None`: the daemon's group. Checked to exist when loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Optional TCP address to listen on as well.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "listen_serde",
        default
    )]
    pub listen: Option<SocketAddr>,
    /// The D-Bus bus the `org.mistrald.Mistrald1` interface is offered on.
    pub dbus: DbusBus,
    /// Sequences generating at once (1..=64).
    pub parallel: usize,
    /// Requests that may wait for a free sequence (1..=4096).
    pub queue_size: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: u64,
    /// Seconds running requests get to finish on shutdown.
    pub shutdown_grace: f64,
    /// Log level.
    pub log_level: LogLevel,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: None,
            socket_mode: SocketMode::default(),
            socket_group: None,
            listen: None,
            dbus: DbusBus::None,
            parallel: 4,
            queue_size: 64,
            max_body_bytes: 4 << 20,
            shutdown_grace: 30.0,
            log_level: LogLevel::default(),
        }
    }
}

/// The `[limits]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Tokens generated when a request does not say.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for (at least `default_max_tokens`).
    pub max_tokens: usize,
    /// Most stop strings one request may give.
    pub max_stop_strings: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            default_max_tokens: 512,
            max_tokens: 32768,
            max_stop_strings: 16,
        }
    }
}

/// The `[prompt_cache]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptCacheConfig {
    /// Finished sequences kept (0 disables the cache).
    pub entries: usize,
    /// Bound on the KV memory of the kept sequences, in MiB.
    pub max_mib: u64,
}

impl Default for PromptCacheConfig {
    fn default() -> Self {
        PromptCacheConfig {
            entries: 8,
            max_mib: 1024,
        }
    }
}

/// Permission bits of the Unix socket, written in the file as an octal string (`"0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// A mode from its bits; `None` above `0o777`.
    pub fn new(bits: u32) -> Option<SocketMode> {
        (bits <= 0o777).then_some(SocketMode(bits))
    }

    /// The permission bits (at most `0o777`).
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(DEFAULT_SOCKET_MODE)
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for SocketMode {
    type Err = String;

    /// Parses octal digits (`"0660"`, `"660"`, `"0o660"`) no larger than `0777`.
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let octal = !digits.is_empty()
            && digits.len() <= 11
            && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
        if !octal {
            return Err(format!(
                "{s:?} is not an octal file mode (expected octal digits such as \"0660\")"
            ));
        }
        let bits = u32::from_str_radix(digits, 8).map_err(|e| format!("{s:?}: {e}"))?;
        SocketMode::new(bits)
            .ok_or_else(|| format!("{s:?} is out of range (0000..=0777: permission bits only)"))
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(D::Error::custom)
    }
}

/// The daemon's log level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Also start-up, shutdown and configuration messages.
    #[default]
    Info,
    /// Also per-request details.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The name used in the configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(LogLevel::Error),
            "warn" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(format!(
                "unknown log level '{s}' (expected error, warn, info, debug or trace)"
            )),
        }
    }
}

/// Which message bus `mistrald serve` offers its D-Bus interface on (`server.dbus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DbusBus {
    /// No D-Bus interface.
    #[default]
    None,
    /// The user's session bus (`DBUS_SESSION_BUS_ADDRESS`): a daemon run by hand on a desktop.
    Session,
    /// The system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else `/run/dbus/system_bus_socket`): the
    /// packaged service; needs the bus policy file that lets it own the name.
    System,
}

impl DbusBus {
    /// The name used in the configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DbusBus::None => "none",
            DbusBus::Session => "session",
            DbusBus::System => "system",
        }
    }
}

impl fmt::Display for DbusBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DbusBus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

impl FromStr for DbusBus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(DbusBus::None),
            "session" => Ok(DbusBus::Session),
            "system" => Ok(DbusBus::System),
            _ => Err(format!(
                "unknown D-Bus bus '{s}' (expected none, session or system)"
            )),
        }
    }
}

/// The configuration name of a KV cache type.
fn kv_type_name(kv_type: KvType) -> &'static str {
    match kv_type {
        KvType::F32 => "f32",
        KvType::F16 => "f16",
        KvType::Q8_0 => "q8_0",
    }
}

/// The configuration name of an attention implementation.
fn attention_name(attention: AttentionChoice) -> &'static str {
    match attention {
        AttentionChoice::Native => "native",
        AttentionChoice::Ggml => "ggml",
    }
}

/// `model.kv_type` as a string (`KvType` has no serde of its own).
mod kv_type_serde {
    use super::*;

    pub fn serialize<S: Serializer>(value: &KvType, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(kv_type_name(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<KvType, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// `model.gpu_layers`: a number, or the strings "all" and "auto".
mod gpu_layers_serde {
    use super::*;

    pub fn serialize<S: Serializer>(value: &GpuLayers, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            GpuLayers::Count(n) => serializer.serialize_u64(*n as u64),
            other => serializer.serialize_str(&other.to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<GpuLayers, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Name(String),
        }
        match Raw::deserialize(deserializer)
            .map_err(|_| D::Error::custom("expected a number of layers, \"all\" or \"auto\""))?
        {
            Raw::Count(n) => Ok(GpuLayers::Count(n as usize)),
            Raw::Name(s) => s.parse().map_err(D::Error::custom),
        }
    }
}

/// `model.matmul` as a string.
mod matmul_serde {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &MatmulChoice,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(value.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<MatmulChoice, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// `model.attention` as a string (`AttentionChoice` has no serde of its own).
mod attention_serde {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &AttentionChoice,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(attention_name(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<AttentionChoice, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// `server.listen` as an `"ADDR:PORT"` string, with a clearer error than `SocketAddr`'s own.
mod listen_serde {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(addr) => serializer.collect_str(addr),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_listen(&text).map(Some).map_err(D::Error::custom)
    }
}

/// Parses a TCP listen address, `ADDR:PORT`.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not a TCP address (expected ADDR:PORT, such as \"127.0.0.1:8080\" or \
             \"[::1]:8080\")"
        )
    })
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read (including: it does not exist).
    #[error("{}: cannot read the configuration file: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A value of the configuration is invalid: bad TOML syntax, an unknown key, a wrong type,
    /// a value out of range or inconsistent with another.
    #[error("{}", render_invalid(origin, *line, *column, key.as_deref(), message))]
    Invalid {
        /// Where the configuration came from: the file name, or `configuration` for values
        /// not read from a file.
        origin: String,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        /// 1-based column, given for syntax errors only.
        column: Option<usize>,
        /// Dotted key such as `server.parallel` (`plugins.chain[1]` for array entries).
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A command-line flag's value is invalid.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag, such as `--parallel`.
        flag: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => key.as_deref(),
            _ => None,
        }
    }

    /// The 1-based line in the file, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }

    /// The flag the error is about, for errors in flag values.
    pub fn flag(&self) -> Option<&str> {
        match self {
            ConfigError::Flag { flag, .. } => Some(flag),
            _ => None,
        }
    }
}

/// One paragraph: `ORIGIN: line L, key K: MESSAGE` (parts left out when unknown).
fn render_invalid(
    origin: &str,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut out = format!("{origin}:");
    match (line, column) {
        (Some(line), Some(column)) => out.push_str(&format!(" line {line}, column {column}")),
        (Some(line), None) => out.push_str(&format!(" line {line}")),
        _ => {}
    }
    if let Some(key) = key {
        if line.is_some() {
            out.push(',');
        }
        out.push_str(&format!(" key {key}"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

/// A failed check, before it is placed in a file or attributed to a flag.
#[derive(Debug)]
struct Invalid {
    /// The offending key.
    key: String,
    /// Another key to point at when `key` does not appear in the file (cross-field checks).
    fallback_key: Option<String>,
    /// What is wrong.
    message: String,
}

impl Invalid {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            fallback_key: None,
            message: message.into(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The option descriptors
// ------------------------------------------------------------------------------------------

/// How an option's value is checked beyond its type.
#[derive(Clone, Copy)]
enum Check {
    /// Only by its type (names, paths, addresses, booleans), or by a dedicated check in
    /// [`ServeConfig::check`].
    Type,
    /// An integer in `min..=max` (`None` values, "unset", are not checked).
    Int {
        get: fn(&ServeConfig) -> Option<u64>,
        min: u64,
        max: u64,
    },
    /// A number in `min..=max`.
    Float {
        get: fn(&ServeConfig) -> f64,
        min: f64,
        max: f64,
    },
}

/// What an option that is unset by default means, and an example value.
#[derive(Clone, Copy)]
struct Unset {
    /// What leaving the option out does.
    meaning: &'static str,
    /// A valid example value, in TOML.
    example: &'static str,
}

/// One configuration option: the single description used by the loader's checks, the flags
/// and [`print_default`].
#[derive(Clone, Copy)]
struct OptionDesc {
    section: &'static str,
    key: &'static str,
    /// One sentence.
    doc: &'static str,
    /// For options with no default value.
    unset: Option<Unset>,
    /// The `mistrald serve` flag that overrides it.
    flag: Option<&'static str>,
    check: Check,
}

impl OptionDesc {
    /// `section.key`.
    fn path(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// The sections, in file order, with a one-line description.
const SECTIONS: &[(&str, &str)] = &[
    ("model", "The model and how it runs."),
    (
        "server",
        "The HTTP API: sockets, concurrency, shutdown and logging.",
    ),
    ("limits", "What one request may ask for."),
    (
        "prompt_cache",
        "KV caches of finished sequences, kept so that a later request sharing their prompt \
         prefix skips recomputing it.",
    ),
    (
        "plugins",
        "WASM plugins that filter prompts and output (see `mistrald plugin check`); the chain \
         is empty by default.",
    ),
];

/// Every option, in file order within its section.
const OPTIONS: &[OptionDesc] = &[
    // [model]
    OptionDesc {
        section: "model",
        key: "path",
        doc: "GGUF model file to serve.",
        unset: Some(Unset {
            meaning: "the bundled default model",
            example: "\"/var/lib/mistrald/models/mistral-7b-instruct.Q4_0.gguf\"",
        }),
        flag: Some("--model"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "threads",
        doc: "Compute threads.",
        unset: Some(Unset {
            meaning: "all cores",
            example: "4",
        }),
        flag: Some("--threads"),
        check: Check::Int {
            get: |c| c.model.threads.map(|v| v as u64),
            min: 1,
            max: MAX_THREADS,
        },
    },
    OptionDesc {
        section: "model",
        key: "ctx_size",
        doc: "Most positions (prompt and generated tokens) one request may use.",
        unset: Some(Unset {
            meaning: "the model's context length, at most 8192",
            example: "4096",
        }),
        flag: Some("--ctx-size"),
        check: Check::Int {
            get: |c| c.model.ctx_size.map(|v| v as u64),
            min: MIN_CTX_SIZE,
            max: MAX_POSITIONS,
        },
    },
    OptionDesc {
        section: "model",
        key: "sliding_window",
        doc: "Attention window in positions; 0 means full attention (released Mistral 7B GGUFs \
              need 4096).",
        unset: Some(Unset {
            meaning: "the model file's value, else full attention",
            example: "4096",
        }),
        flag: Some("--sliding-window"),
        check: Check::Int {
            get: |c| c.model.sliding_window.map(|v| v as u64),
            min: 0,
            max: MAX_POSITIONS,
        },
    },
    OptionDesc {
        section: "model",
        key: "kv_type",
        doc: "KV cache element type: \"f32\", \"f16\" or \"q8_0\".",
        unset: None,
        flag: Some("--kv-type"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "batch_size",
        doc: "Prompt chunk size, and the tokens one step may process for all sequences together.",
        unset: None,
        flag: Some("--batch-size"),
        check: Check::Int {
            get: |c| Some(c.model.batch_size as u64),
            min: 1,
            max: MAX_BATCH_SIZE,
        },
    },
    OptionDesc {
        section: "model",
        key: "attention",
        doc: "Attention implementation: \"native\" (mistrald's kernels) or \"ggml\" (ggml's \
              flash attention).",
        unset: None,
        flag: Some("--attention"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "repack",
        doc: "Convert the weight matrices ggml can repack into its interleaved layout at load \
              time (about twice as fast on CPUs); false uses every weight in place from the \
              memory-mapped file.",
        unset: None,
        flag: Some("--no-repack"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "matmul",
        doc: "Matrix products: \"native\" (mistrald's kernels for Q4_0, Q8_0, Q4_K and Q6_K \
              matrices, converted into their layout at load time; ggml's for other types) or \
              \"ggml\" (ggml's mul_mat for every matrix).",
        unset: None,
        flag: Some("--matmul"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "gpu_layers",
        doc: "Transformer blocks to offload to a GPU (builds with the vulkan or cuda feature): \
              a number (the last N blocks; 0 = CPU only), \"all\" (every block and the \
              output head; an error without a GPU) or \"auto\" (as many as fit in the GPU's \
              free memory with the KV caches of `server.parallel` sequences; none without a \
              GPU).",
        unset: None,
        flag: Some("--gpu-layers"),
        check: Check::Type,
    },
    OptionDesc {
        section: "model",
        key: "device",
        doc: "The GPU to offload to, by ggml's name (\"Vulkan0\", \"CUDA0\") or its \
              description, as `mistrald info` lists them.",
        unset: Some(Unset {
            meaning: "the first GPU",
            example: "\"Vulkan0\"",
        }),
        flag: Some("--device"),
        check: Check::Type,
    },
    // [server]
    OptionDesc {
        section: "server",
        key: "socket",
        doc: "Unix socket of the HTTP API.",
        unset: Some(Unset {
            meaning: "$XDG_RUNTIME_DIR/mistrald.sock, or /run/mistrald/mistrald.sock as root \
                      or without XDG_RUNTIME_DIR",
            example: "\"/run/mistrald/mistrald.sock\"",
        }),
        flag: Some("--socket"),
        check: Check::Type,
    },
    OptionDesc {
        section: "server",
        key: "socket_mode",
        doc: "Permission bits of the socket, as an octal string (at most \"0777\").",
        unset: None,
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "server",
        key: "socket_group",
        doc: "Group owning the socket; it must exist.",
        unset: Some(Unset {
            meaning: "the daemon's group",
            example: "\"mistrald\"",
        }),
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "server",
        key: "listen",
        doc: "Also serve the HTTP API on this TCP address, ADDR:PORT (no authentication: \
              prefer a loopback address).",
        unset: Some(Unset {
            meaning: "the Unix socket only",
            example: "\"127.0.0.1:8080\"",
        }),
        flag: Some("--listen"),
        check: Check::Type,
    },
    OptionDesc {
        section: "server",
        key: "dbus",
        doc: "Also offer the D-Bus interface org.mistrald.Mistrald1 (for desktop applications) on \
              this bus: \"none\", \"session\" (the user's bus, for a daemon run by hand) or \
              \"system\" (the packaged service; needs the bus policy file that lets its user own \
              the name).",
        unset: None,
        flag: Some("--dbus"),
        check: Check::Type,
    },
    OptionDesc {
        section: "server",
        key: "parallel",
        doc: "Sequences generating at once.",
        unset: None,
        flag: Some("--parallel"),
        check: Check::Int {
            get: |c| Some(c.server.parallel as u64),
            min: 1,
            max: MAX_PARALLEL,
        },
    },
    OptionDesc {
        section: "server",
        key: "queue_size",
        doc: "Requests that may wait for a free sequence; further requests are refused.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.server.queue_size as u64),
            min: 1,
            max: MAX_QUEUE_SIZE,
        },
    },
    OptionDesc {
        section: "server",
        key: "max_body_bytes",
        doc: "Largest request body, in bytes.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.server.max_body_bytes),
            min: MIN_BODY_BYTES,
            max: MAX_BODY_BYTES,
        },
    },
    OptionDesc {
        section: "server",
        key: "shutdown_grace",
        doc: "Seconds running requests get to finish when the daemon is stopped.",
        unset: None,
        flag: None,
        check: Check::Float {
            get: |c| c.server.shutdown_grace,
            min: 0.0,
            max: MAX_SHUTDOWN_GRACE,
        },
    },
    OptionDesc {
        section: "server",
        key: "log_level",
        doc: "Log level: \"error\", \"warn\", \"info\", \"debug\" or \"trace\".",
        unset: None,
        flag: Some("--log-level"),
        check: Check::Type,
    },
    // [limits]
    OptionDesc {
        section: "limits",
        key: "default_max_tokens",
        doc: "Tokens generated for a request that does not give max_tokens.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.limits.default_max_tokens as u64),
            min: 1,
            max: MAX_TOKENS_CAP,
        },
    },
    OptionDesc {
        section: "limits",
        key: "max_tokens",
        doc: "Largest max_tokens a request may ask for; at least default_max_tokens.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.limits.max_tokens as u64),
            min: 1,
            max: MAX_TOKENS_CAP,
        },
    },
    OptionDesc {
        section: "limits",
        key: "max_stop_strings",
        doc: "Most stop strings one request may give.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.limits.max_stop_strings as u64),
            min: 0,
            max: MAX_STOP_STRINGS,
        },
    },
    // [prompt_cache]
    OptionDesc {
        section: "prompt_cache",
        key: "entries",
        doc: "Finished sequences kept; 0 disables the cache.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.prompt_cache.entries as u64),
            min: 0,
            max: MAX_CACHE_ENTRIES,
        },
    },
    OptionDesc {
        section: "prompt_cache",
        key: "max_mib",
        doc: "Bound on the KV memory of the kept sequences, in MiB.",
        unset: None,
        flag: None,
        check: Check::Int {
            get: |c| Some(c.prompt_cache.max_mib),
            min: 0,
            max: MAX_CACHE_MIB,
        },
    },
    // [plugins] (ranges checked by `PluginsConfig::validate`)
    OptionDesc {
        section: "plugins",
        key: "dir",
        doc: "Directory holding the plugin files (*.wasm).",
        unset: None,
        flag: Some("--plugins"),
        check: Check::Type,
    },
    OptionDesc {
        section: "plugins",
        key: "autoload",
        doc: "Also load the *.wasm files of dir that no [[plugins.chain]] entry names (after \
              the listed ones, in file name order, with default settings).",
        unset: None,
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "plugins",
        key: "time_limit_ms",
        doc: "Wall-clock limit of one plugin hook call, in milliseconds.",
        unset: None,
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "plugins",
        key: "memory_limit_mib",
        doc: "Memory limit of one plugin instance, in MiB.",
        unset: None,
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "plugins",
        key: "max_output_kib",
        doc: "Largest text (prompt, chunk or output) a plugin may return, in KiB.",
        unset: None,
        flag: None,
        check: Check::Type,
    },
    OptionDesc {
        section: "plugins",
        key: "cache_dir",
        doc: "Directory for compiled plugin code, so that a restart does not compile unchanged \
              plugins again.",
        unset: Some(Unset {
            meaning: "$CACHE_DIRECTORY/plugins when systemd sets CACHE_DIRECTORY (the \
                      service's CacheDirectory=), else no cache",
            example: "\"/var/cache/mistrald/plugins\"",
        }),
        flag: None,
        check: Check::Type,
    },
];

/// The compiled-plugin cache under the service's cache directory: `$CACHE_DIRECTORY/plugins`
/// (the first directory when systemd lists several), when systemd set `CACHE_DIRECTORY`.
fn service_cache_dir() -> Option<PathBuf> {
    let dirs = std::env::var_os("CACHE_DIRECTORY")?;
    let first = std::env::split_paths(&dirs).next()?;
    (!first.as_os_str().is_empty()).then(|| first.join("plugins"))
}

/// The descriptor of `section.key`.
fn option_desc(path: &str) -> Option<&'static OptionDesc> {
    OPTIONS.iter().find(|d| d.path() == path)
}

// ------------------------------------------------------------------------------------------
// Loading and checking
// ------------------------------------------------------------------------------------------

impl ServeConfig {
    /// Reads and checks a configuration file. Every error names the file, the key and the
    /// line.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        ServeConfig::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and checks a configuration from TOML text; `origin` (usually the file name)
    /// starts every error message.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<ServeConfig, ConfigError> {
        let invalid = |span: Option<Range<usize>>, column: bool, key, message| {
            let position = span.map(|span| line_col(text, span.start));
            ConfigError::Invalid {
                origin: origin.to_string(),
                line: position.map(|(line, _)| line),
                column: if column {
                    position.map(|(_, column)| column)
                } else {
                    None
                },
                key,
                message,
            }
        };
        // The spanned document, to turn the spans of errors into keys and keys into lines.
        let document = DeTable::parse(text).map_err(|e| {
            invalid(
                e.span(),
                true,
                None,
                format!("invalid TOML: {}", e.message()),
            )
        })?;
        let config: ServeConfig = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .and_then(|span| key_at(document.get_ref(), span.start, ""));
            invalid(e.span(), false, key, tidy_serde_message(e.message()))
        })?;
        config.check().map_err(|problem| {
            let mut key = problem.key;
            let mut span = value_span(document.get_ref(), &key);
            if span.is_none() {
                if let Some(fallback) = problem.fallback_key {
                    if let Some(found) = value_span(document.get_ref(), &fallback) {
                        span = Some(found);
                        key = fallback;
                    }
                }
            }
            invalid(span, false, Some(key), problem.message)
        })?;
        Ok(config)
    }

    /// Checks every value (ranges, cross-field rules, that `socket_group` exists, the
    /// `[plugins]` section), for configurations not read through [`ServeConfig::load`], such
    /// as one built in code. The error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|problem| ConfigError::Invalid {
            origin: "configuration".to_string(),
            line: None,
            column: None,
            key: Some(problem.key),
            message: problem.message,
        })
    }

    /// The checks behind [`ServeConfig::validate`], naming the key only.
    fn check(&self) -> Result<(), Invalid> {
        for desc in OPTIONS {
            match desc.check {
                Check::Type => {}
                Check::Int { get, min, max } => {
                    if let Some(value) = get(self) {
                        if !(min..=max).contains(&value) {
                            return Err(Invalid::new(
                                desc.path(),
                                format!("{value} is out of range ({min}..={max})"),
                            ));
                        }
                    }
                }
                Check::Float { get, min, max } => {
                    let value = get(self);
                    if !(min..=max).contains(&value) {
                        return Err(Invalid::new(
                            desc.path(),
                            format!("{value} is out of range ({min}..={max})"),
                        ));
                    }
                }
            }
        }
        if self.limits.max_tokens < self.limits.default_max_tokens {
            return Err(Invalid {
                key: "limits.max_tokens".into(),
                fallback_key: Some("limits.default_max_tokens".into()),
                message: format!(
                    "max_tokens ({}) is less than default_max_tokens ({})",
                    self.limits.max_tokens, self.limits.default_max_tokens
                ),
            });
        }
        if let Some(group) = &self.server.socket_group {
            match lookup_group(group) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(Invalid::new(
                        "server.socket_group",
                        format!("no such group '{group}'"),
                    ))
                }
                Err(e) => {
                    return Err(Invalid::new(
                        "server.socket_group",
                        format!("cannot look up group '{group}': {e}"),
                    ))
                }
            }
        }
        check_plugins(&self.plugins)
    }

    /// The configuration to use: the file given with `--config` (`explicit`; an error if it
    /// cannot be read), else the system file ([`system_config_path`]) when it exists, else the
    /// defaults. Also returns the file that was read, if any.
    pub fn resolve(explicit: Option<&Path>) -> Result<(ServeConfig, Option<PathBuf>), ConfigError> {
        resolve_from(explicit, &system_config_path())
    }

    /// [`ServeConfig::resolve`] with `flags.config`, then [`ServeConfig::apply`] of the flags:
    /// the configuration `mistrald serve` runs with, and the file read, if any.
    pub fn from_flags(flags: &ServeFlags) -> Result<(ServeConfig, Option<PathBuf>), ConfigError> {
        let (mut config, file) = ServeConfig::resolve(flags.config.as_deref())?;
        config.apply(flags)?;
        if config.plugins.cache_dir.is_none() {
            config.plugins.cache_dir = service_cache_dir();
        }
        Ok((config, file))
    }

    /// Overrides values with the flags that were given, then checks the result with the same
    /// rules as a file; an error in a flag's value names the flag.
    pub fn apply(&mut self, flags: &ServeFlags) -> Result<(), ConfigError> {
        let mut given: Vec<&'static str> = Vec::new();
        if let Some(path) = &flags.model {
            self.model.path = Some(path.clone());
            given.push("model.path");
        }
        if let Some(threads) = flags.threads {
            self.model.threads = Some(threads);
            given.push("model.threads");
        }
        if let Some(ctx_size) = flags.ctx_size {
            self.model.ctx_size = Some(ctx_size);
            given.push("model.ctx_size");
        }
        if let Some(window) = flags.sliding_window {
            self.model.sliding_window = Some(window);
            given.push("model.sliding_window");
        }
        if let Some(kv_type) = flags.kv_type {
            self.model.kv_type = kv_type;
            given.push("model.kv_type");
        }
        if let Some(batch_size) = flags.batch_size {
            self.model.batch_size = batch_size;
            given.push("model.batch_size");
        }
        if let Some(attention) = flags.attention {
            self.model.attention = attention;
            given.push("model.attention");
        }
        if flags.no_repack {
            self.model.repack = false;
            given.push("model.repack");
        }
        if let Some(matmul) = flags.matmul {
            self.model.matmul = matmul;
            given.push("model.matmul");
        }
        if let Some(layers) = flags.gpu_layers {
            self.model.gpu_layers = layers;
            given.push("model.gpu_layers");
        }
        if let Some(device) = &flags.device {
            self.model.device = Some(device.clone());
            given.push("model.device");
        }
        if let Some(socket) = &flags.socket {
            self.server.socket = Some(socket.clone());
            given.push("server.socket");
        }
        if let Some(listen) = flags.listen {
            self.server.listen = Some(listen);
            given.push("server.listen");
        }
        if let Some(bus) = flags.dbus {
            self.server.dbus = bus;
            given.push("server.dbus");
        }
        if let Some(parallel) = flags.parallel {
            self.server.parallel = parallel;
            given.push("server.parallel");
        }
        if let Some(level) = flags.log_level {
            self.server.log_level = level;
            given.push("server.log_level");
        }
        if let Some(dir) = &flags.plugins {
            self.plugins.dir = dir.clone();
            given.push("plugins.dir");
        }
        self.check().map_err(|problem| {
            let flag = option_desc(&problem.key)
                .filter(|desc| given.iter().any(|key| *key == desc.path()))
                .and_then(|desc| desc.flag);
            match flag {
                Some(flag) => ConfigError::Flag {
                    flag: flag.to_string(),
                    message: problem.message,
                },
                None => ConfigError::Invalid {
                    origin: "configuration".to_string(),
                    line: None,
                    column: None,
                    key: Some(problem.key),
                    message: problem.message,
                },
            }
        })
    }

    /// The Unix socket to listen on: `server.socket`, else [`default_socket_path`].
    pub fn socket_path(&self) -> PathBuf {
        self.server
            .socket
            .clone()
            .unwrap_or_else(default_socket_path)
    }

    /// The socket's permission bits (at most `0o777`).
    pub fn socket_mode(&self) -> u32 {
        self.server.socket_mode.bits()
    }

    /// The group id of `server.socket_group`, or `None` when no group is configured.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        let Some(group) = &self.server.socket_group else {
            return Ok(None);
        };
        let invalid = |message: String| ConfigError::Invalid {
            origin: "configuration".to_string(),
            line: None,
            column: None,
            key: Some("server.socket_group".to_string()),
            message,
        };
        match lookup_group(group) {
            Ok(Some(gid)) => Ok(Some(gid)),
            Ok(None) => Err(invalid(format!("no such group '{group}'"))),
            Err(e) => Err(invalid(format!("cannot look up group '{group}': {e}"))),
        }
    }

    /// `server.shutdown_grace` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::try_from_secs_f64(self.server.shutdown_grace).unwrap_or(Duration::ZERO)
    }

    /// The engine settings of `[model]` (threads default to all cores).
    pub fn engine_config(&self) -> EngineConfig {
        let mut engine = EngineConfig {
            kv_type: self.model.kv_type,
            sliding_window: self.model.sliding_window,
            ctx_size: self.model.ctx_size,
            batch_size: self.model.batch_size,
            attention: self.model.attention,
            ..EngineConfig::default()
        };
        if let Some(threads) = self.model.threads {
            engine.n_threads = threads;
        }
        engine
    }

    /// The model loading options of `[model]`.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            repack: self.model.repack,
            native_matmul: self.model.matmul.native(),
            gpu: GpuRequest {
                layers: self.model.gpu_layers,
                device: self.model.device.clone(),
                kv_bytes_per_layer: 0,
            },
        }
    }
}

/// [`ServeConfig::resolve`] with the system file given.
fn resolve_from(
    explicit: Option<&Path>,
    system: &Path,
) -> Result<(ServeConfig, Option<PathBuf>), ConfigError> {
    if let Some(path) = explicit {
        return Ok((ServeConfig::load(path)?, Some(path.to_path_buf())));
    }
    match std::fs::metadata(system) {
        Ok(_) => Ok((ServeConfig::load(system)?, Some(system.to_path_buf()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((ServeConfig::default(), None)),
        Err(error) => Err(ConfigError::Read {
            path: system.to_path_buf(),
            error,
        }),
    }
}

/// The system configuration file: `$MISTRALD_CONFIG` when set and not empty, else
/// [`SYSTEM_CONFIG_PATH`].
pub fn system_config_path() -> PathBuf {
    std::env::var_os(CONFIG_PATH_ENV)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG_PATH))
}

/// The socket used when none is configured: `$XDG_RUNTIME_DIR/mistrald.sock` when that
/// variable is set (to an absolute path) and the process is not root, else
/// [`SYSTEM_SOCKET_PATH`].
pub fn default_socket_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    socket_path_for(std::env::var_os("XDG_RUNTIME_DIR"), euid)
}

/// [`default_socket_path`] for a given `XDG_RUNTIME_DIR` and effective user id.
pub fn socket_path_for(xdg_runtime_dir: Option<OsString>, euid: u32) -> PathBuf {
    match xdg_runtime_dir.map(PathBuf::from) {
        Some(dir) if euid != 0 && dir.is_absolute() => dir.join(SOCKET_FILE_NAME),
        _ => PathBuf::from(SYSTEM_SOCKET_PATH),
    }
}

/// The group id of a group name (`getgrnam_r`); `Ok(None)` when there is no such group.
fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    let c_name = CString::new(name).map_err(|_| "the name contains a NUL character".to_string())?;
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` (null pointers, zero gid) is a valid value to overwrite.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buffer.len()` is its true length.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buffer.len() < (1 << 22) => {
                let larger = buffer.len() * 4;
                buffer.resize(larger, 0);
            }
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(std::io::Error::from_raw_os_error(errno).to_string()),
        }
    }
}

/// `PluginsConfig::validate`, with the error placed at a key: the section's own keys first,
/// then the first chain entry that makes it fail (`plugins.chain[i]`).
fn check_plugins(plugins: &PluginsConfig) -> Result<(), Invalid> {
    let message = |error: LoadError| match error {
        LoadError::Config(message) => message,
        other => other.to_string(),
    };
    let mut probe = PluginsConfig {
        chain: Vec::new(),
        ..plugins.clone()
    };
    if let Err(error) = probe.validate() {
        let message = message(error);
        // Messages of the section's own keys read "plugins.KEY = VALUE is ...".
        let key = message
            .split([' ', ':'])
            .next()
            .filter(|word| word.starts_with("plugins.") && option_desc(word).is_some())
            .map(str::to_string);
        return Err(match key {
            Some(key) => {
                let rest = message
                    .strip_prefix(&format!("{key} = "))
                    .unwrap_or(&message)
                    .to_string();
                Invalid::new(key, rest)
            }
            None => Invalid::new("plugins", message),
        });
    }
    for (index, entry) in plugins.chain.iter().enumerate() {
        probe.chain.push(entry.clone());
        if let Err(error) = probe.validate() {
            let message = message(error);
            let message = message
                .strip_prefix("plugins.chain: ")
                .unwrap_or(&message)
                .to_string();
            return Err(Invalid::new(format!("plugins.chain[{index}]"), message));
        }
    }
    Ok(())
}

/// Serde's wording, in terms of the configuration file.
fn tidy_serde_message(message: &str) -> String {
    let mut message = message.trim().replace("unknown field", "unknown key");
    for (rust, plain) in [
        ("expected usize", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
    ] {
        if message.ends_with(rust) {
            message.truncate(message.len() - rust.len());
            message.push_str(plain);
        }
    }
    if message == "wanted string or table" {
        message = "invalid type: expected a string".to_string();
    }
    if let Some(start) = message.find("expected struct ") {
        message.truncate(start);
        message.push_str("expected a table");
    }
    message
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Whether `span` covers `pos` (an empty span covers its start).
fn span_covers(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

/// The deepest dotted key whose key or value covers byte `pos`.
fn key_at(table: &DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if span_covers(&key.span(), pos) {
            return Some(path);
        }
        if let Some(found) = key_in_value(value, pos, path) {
            return Some(found);
        }
    }
    None
}

/// [`key_at`] inside one value named `path`.
fn key_in_value(value: &Spanned<DeValue<'_>>, pos: usize, path: String) -> Option<String> {
    match value.get_ref() {
        DeValue::Table(table) => {
            if let Some(found) = key_at(table, pos, &path) {
                return Some(found);
            }
        }
        DeValue::Array(array) => {
            for (index, item) in array.iter().enumerate() {
                if let Some(found) = key_in_value(item, pos, format!("{path}[{index}]")) {
                    return Some(found);
                }
            }
        }
        _ => {}
    }
    span_covers(&value.span(), pos).then_some(path)
}

/// The span of the value at a dotted key (`plugins.chain[1].name`), if the file has it.
fn value_span(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut current: Option<&Spanned<DeValue<'_>>> = None;
    for segment in path.split('.') {
        let (name, indices) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        let table = match current {
            None => table,
            Some(value) => value.get_ref().as_table()?,
        };
        let mut value = table
            .iter()
            .find(|(key, _)| &**key.get_ref() == name)
            .map(|(_, value)| value)?;
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let index: usize = index.parse().ok()?;
            value = value.get_ref().as_array()?.get(index)?;
        }
        current = Some(value);
    }
    current.map(|value| value.span())
}

// ------------------------------------------------------------------------------------------
// Flags
// ------------------------------------------------------------------------------------------

/// The flags of `mistrald serve`; each overrides the configuration file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeFlags {
    /// Configuration file (default: /etc/mistrald/config.toml when it exists, else the
    /// built-in defaults; see `mistrald config --print-default`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GGUF model file (model.path).
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Unix socket of the HTTP API (server.socket).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also serve the HTTP API on this TCP address (server.listen).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Also offer the D-Bus interface on this bus: none, session or system (server.dbus).
    #[arg(long, value_name = "BUS")]
    pub dbus: Option<DbusBus>,
    /// Compute threads (model.threads; default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Most positions one request may use (model.ctx_size).
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Attention window in positions, 0 = full attention (model.sliding_window).
    #[arg(long, value_name = "N")]
    pub sliding_window: Option<usize>,
    /// KV cache element type: f32, f16 or q8_0 (model.kv_type).
    #[arg(long, value_name = "T")]
    pub kv_type: Option<KvType>,
    /// Sequences generating at once (server.parallel).
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Plugin directory (plugins.dir).
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// Prompt chunk size and per-step token budget (model.batch_size).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Log level (server.log_level).
    #[arg(long, value_name = "L")]
    pub log_level: Option<LogLevel>,
    /// Attention implementation: native or ggml (model.attention).
    #[arg(long, value_name = "A")]
    pub attention: Option<AttentionChoice>,
    /// Use every weight in place from the memory-mapped file (model.repack = false).
    #[arg(long)]
    pub no_repack: bool,
    /// Matrix products: native or ggml (model.matmul).
    #[arg(long, value_name = "M")]
    pub matmul: Option<MatmulChoice>,
    /// Transformer blocks to offload to a GPU: N, all or auto (model.gpu_layers).
    #[arg(long, value_name = "N")]
    pub gpu_layers: Option<GpuLayers>,
    /// The GPU to offload to, e.g. Vulkan0 or CUDA0 (model.device).
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
}

// ------------------------------------------------------------------------------------------
// `mistrald config`
// ------------------------------------------------------------------------------------------

/// The arguments of `mistrald config`.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["print_default", "check"])))]
pub struct ConfigArgs {
    /// Print a complete configuration file: every option commented out at its default value,
    /// with a description.
    #[arg(long)]
    pub print_default: bool,
    /// Load and check FILE; print "FILE: OK", or fail with the error.
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,
}

/// Runs `mistrald config`: `--print-default` prints [`print_default`] to stdout; `--check FILE`
/// prints `FILE: OK` or returns the error (which names the file, key and line).
pub fn run_config_command(args: ConfigArgs) -> anyhow::Result<()> {
    if args.print_default {
        print!("{}", print_default());
    }
    if let Some(path) = &args.check {
        ServeConfig::load(path)?;
        println!("{}: OK", path.display());
    }
    Ok(())
}

/// Width the descriptions of [`print_default`] are wrapped to.
const PRINT_WIDTH: usize = 96;

/// A complete configuration file: every option commented out (`#key = value`) with its
/// default value and a description, by section, plus a commented `[[plugins.chain]]` example.
/// Options that are unset by default show an example value; their description says what
/// leaving them unset does. Generated from the option table and [`ServeConfig::default`].
pub fn print_default() -> String {
    let defaults =
        toml::Table::try_from(ServeConfig::default()).expect("the default configuration is TOML");
    let mut out = String::new();
    for line in [
        "mistrald configuration (`mistrald serve`): /etc/mistrald/config.toml, or the file \
         given with --config.",
        "",
        "Every option is shown commented out (\"#key = value\") with its default value; remove \
         the \"#\" to change it. Options that are unset by default show an example value \
         instead, and their description says what leaving them unset does. The flags of \
         `mistrald serve` override this file. Generated by `mistrald config --print-default`; \
         check a file with `mistrald config --check FILE`.",
    ] {
        push_comment(&mut out, line);
    }
    for (section, section_doc) in SECTIONS {
        out.push('\n');
        push_comment(&mut out, section_doc);
        out.push_str(&format!("[{section}]\n"));
        for desc in OPTIONS.iter().filter(|d| d.section == *section) {
            out.push('\n');
            let mut doc = desc.doc.to_string();
            match desc.check {
                Check::Int { min, max, .. } => doc.push_str(&format!(" Range: {min}..={max}.")),
                Check::Float { min, max, .. } => doc.push_str(&format!(" Range: {min}..={max}.")),
                Check::Type => {}
            }
            if let Some(unset) = &desc.unset {
                doc.push_str(&format!(" Unset by default: {}.", unset.meaning));
            }
            if let Some(flag) = desc.flag {
                doc.push_str(&format!(" Flag: {flag}."));
            }
            push_comment(&mut out, &doc);
            let value = match desc.unset {
                Some(unset) => unset.example.to_string(),
                None => defaults
                    .get(*section)
                    .and_then(|table| table.get(desc.key))
                    .map(|value| value.to_string())
                    .expect("every option with a default is in the serialized defaults"),
            };
            out.push_str(&format!("#{} = {value}\n", desc.key));
        }
    }
    out.push('\n');
    push_comment(
        &mut out,
        "The plugin chain, in order: one [[plugins.chain]] table per plugin. An example entry \
         (file <dir>/moderation.wasm; required: refuse to start without it; on_error: \"fail\" \
         or \"skip\"; grants: any of \"clock\", \"env\", \"filesystem\", \"network\"; config: \
         passed to the plugin's init):",
    );
    for line in chain_example().lines() {
        out.push('#');
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The `[[plugins.chain]]` example of [`print_default`], as TOML.
fn chain_example() -> String {
    #[derive(Serialize)]
    struct Root {
        plugins: Chain,
    }
    #[derive(Serialize)]
    struct Chain {
        chain: Vec<PluginConfig>,
    }
    let mut plugin = PluginConfig::new("moderation");
    plugin.required = true;
    plugin
        .config
        .insert("action".to_string(), toml::Value::from("redact"));
    plugin.config.insert(
        "blocklist".to_string(),
        toml::Value::Array(vec!["darn".into(), "/secret\\w*/".into()]),
    );
    let text = toml::to_string(&Root {
        plugins: Chain {
            chain: vec![plugin],
        },
    })
    .expect("the example plugin entry is TOML");
    text.lines()
        .filter(|line| !line.trim().is_empty() && line.trim() != "[plugins]")
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Appends `text` as `# ` comment lines wrapped to [`PRINT_WIDTH`] (an empty text gives `#`).
fn push_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > PRINT_WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::BTreeSet;

    /// Uncomments the option lines (`#key = value`) of `text` that `keep` selects; description
    /// lines (`# ...`) stay comments.
    fn uncomment(text: &str, keep: impl Fn(&str) -> bool) -> String {
        text.lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with(' ') && keep(rest) => {
                    format!("{rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect()
    }

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml_str(text, "test.toml")
    }

    fn parse_err(text: &str) -> ConfigError {
        parse(text).expect_err("the configuration should be rejected")
    }

    /// The `section.key` paths of a serialized configuration's options (not the chain).
    fn option_keys(table: &toml::Table) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for (section, value) in table {
            for key in value.as_table().expect("sections are tables").keys() {
                if !(section == "plugins" && key == "chain") {
                    keys.insert(format!("{section}.{key}"));
                }
            }
        }
        keys
    }

    #[test]
    fn printed_default_uncommented_equals_the_default() {
        let text = print_default();
        let with_defaults = uncomment(&text, |line| {
            let key = line.split(" = ").next().unwrap();
            OPTIONS
                .iter()
                .any(|desc| desc.key == key && desc.unset.is_none())
        });
        assert_ne!(with_defaults, text, "no option line was uncommented");
        let config = parse(&with_defaults).unwrap();
        assert_eq!(config, ServeConfig::default());
        // As printed, too (every option commented out).
        assert_eq!(parse(&text).unwrap(), ServeConfig::default());
        for desc in OPTIONS {
            let option_line = format!("#{} = ", desc.key);
            assert!(
                text.contains(&option_line),
                "{} is not printed",
                desc.path()
            );
        }
        for line in text.lines() {
            assert!(line.len() <= PRINT_WIDTH + 20, "line too long: {line}");
        }
    }

    #[test]
    fn printed_default_with_every_line_uncommented_parses() {
        let text = uncomment(&print_default(), |_| true);
        // The example socket group need not exist on this machine: check the parse only.
        let config: ServeConfig = toml::from_str(&text).unwrap();
        assert_eq!(config.model.threads, Some(4));
        assert!(config.model.path.is_some());
        assert_eq!(
            config.server.listen,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(config.plugins.chain.len(), 1);
        let plugin = &config.plugins.chain[0];
        assert_eq!(plugin.name, "moderation");
        assert!(plugin.required);
        assert_eq!(plugin.config["action"].as_str(), Some("redact"));
        config.plugins.validate().unwrap();
        // Every option unset by default takes its example value.
        let table = toml::Table::try_from(&config).unwrap();
        let unset: BTreeSet<String> = OPTIONS
            .iter()
            .filter(|d| d.unset.is_some())
            .map(OptionDesc::path)
            .collect();
        assert!(unset.is_subset(&option_keys(&table)));
    }

    #[test]
    fn descriptor_table_matches_the_serde_structs() {
        let described: BTreeSet<String> = OPTIONS.iter().map(OptionDesc::path).collect();
        assert_eq!(
            described.len(),
            OPTIONS.len(),
            "an option is described twice"
        );
        // Every option set: the uncommented printed file.
        let full: ServeConfig = toml::from_str(&uncomment(&print_default(), |_| true)).unwrap();
        let full_keys = option_keys(&toml::Table::try_from(&full).unwrap());
        assert_eq!(described, full_keys);
        // The defaults hold exactly the options that have a default.
        let default_keys = option_keys(&toml::Table::try_from(ServeConfig::default()).unwrap());
        let with_default: BTreeSet<String> = OPTIONS
            .iter()
            .filter(|d| d.unset.is_none())
            .map(OptionDesc::path)
            .collect();
        assert_eq!(default_keys, with_default);
        // Sections: all described, in the order of the struct.
        let sections: Vec<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
        let serialized = toml::Table::try_from(ServeConfig::default()).unwrap();
        let mut struct_sections: Vec<&str> = serialized.keys().map(String::as_str).collect();
        struct_sections.sort();
        let mut sorted = sections.clone();
        sorted.sort();
        assert_eq!(sorted, struct_sections);
        for desc in OPTIONS {
            assert!(sections.contains(&desc.section), "{}", desc.path());
        }
    }

    #[test]
    fn default_is_valid_and_has_the_documented_values() {
        let config = ServeConfig::default();
        config.validate().unwrap();
        assert_eq!(config.model.kv_type, KvType::F16);
        assert_eq!(config.model.batch_size, 512);
        assert_eq!(config.model.attention, AttentionChoice::Native);
        assert!(config.model.repack);
        assert_eq!(config.socket_mode(), 0o660);
        assert_eq!(config.server.parallel, 4);
        assert_eq!(config.server.queue_size, 64);
        assert_eq!(config.server.max_body_bytes, 4194304);
        assert_eq!(config.shutdown_grace(), Duration::from_secs(30));
        assert_eq!(config.server.log_level, LogLevel::Info);
        assert_eq!(config.limits.default_max_tokens, 512);
        assert_eq!(config.limits.max_tokens, 32768);
        assert_eq!(config.limits.max_stop_strings, 16);
        assert_eq!(config.prompt_cache.entries, 8);
        assert_eq!(config.prompt_cache.max_mib, 1024);
        assert_eq!(config.plugins, PluginsConfig::default());
        assert!(config.plugins.chain.is_empty());
        assert!(config.load_options().repack);
        assert_eq!(config.engine_config().batch_size, 512);
    }

    #[test]
    fn parses_a_file_and_fills_defaults() {
        let config = parse(
            r#"
            [model]
            path = "/models/m.gguf"
            threads = 3
            ctx_size = 2048
            sliding_window = 0
            kv_type = "q8_0"
            attention = "ggml"
            repack = false

            [server]
            socket = "/tmp/m.sock"
            socket_mode = "0600"
            listen = "[::1]:8080"
            shutdown_grace = 2
            log_level = "debug"

            [limits]
            max_tokens = 1024
            "#,
        )
        .unwrap();
        assert_eq!(config.model.path, Some(PathBuf::from("/models/m.gguf")));
        assert_eq!(config.model.sliding_window, Some(0));
        assert_eq!(config.model.kv_type, KvType::Q8_0);
        assert_eq!(config.model.batch_size, 512);
        assert_eq!(config.socket_path(), PathBuf::from("/tmp/m.sock"));
        assert_eq!(config.socket_mode(), 0o600);
        assert_eq!(config.server.listen, Some("[::1]:8080".parse().unwrap()));
        assert_eq!(config.shutdown_grace(), Duration::from_secs(2));
        assert_eq!(config.server.log_level.filter(), log::LevelFilter::Debug);
        assert_eq!(config.limits.max_tokens, 1024);
        assert_eq!(config.limits.default_max_tokens, 512);
        let engine = config.engine_config();
        assert_eq!(engine.n_threads, 3);
        assert_eq!(engine.ctx_size, Some(2048));
        assert_eq!(engine.attention, AttentionChoice::Ggml);
        assert!(!config.load_options().repack);
        // Serialized and parsed again: the same.
        let text = toml::to_string(&config).unwrap();
        assert_eq!(parse(&text).unwrap(), config);
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = parse_err("[server]\nparallel = 2\n\nparralel = 3\n");
        assert_eq!(err.key(), Some("server.parralel"), "{err}");
        assert_eq!(err.line(), Some(4), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("test.toml: line 4, key server.parralel: unknown key `parralel`"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");

        let err = parse_err("# comment\n[modle]\npath = \"x\"\n");
        assert_eq!(err.key(), Some("modle"), "{err}");
        assert_eq!(err.line(), Some(2), "{err}");

        let err = parse_err("server.parallel = 2\nserver.colour = \"red\"\n");
        assert_eq!(err.key(), Some("server.colour"), "{err}");
        assert_eq!(err.line(), Some(2), "{err}");

        let err = parse_err("[[plugins.chain]]\nname = \"a\"\nnmae = \"b\"\n");
        assert_eq!(err.key(), Some("plugins.chain[0].nmae"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key_and_line() {
        let err = parse_err("[model]\n\nthreads = \"four\"\n");
        assert_eq!(err.key(), Some("model.threads"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(
            err.to_string().contains("expected a non-negative integer"),
            "{err}"
        );

        let err = parse_err("[model]\nrepack = 1\n");
        assert_eq!(err.key(), Some("model.repack"), "{err}");
        assert_eq!(err.line(), Some(2), "{err}");

        let err = parse_err("[model]\nkv_type = \"f8\"\n");
        assert_eq!(err.key(), Some("model.kv_type"), "{err}");
        assert!(err.to_string().contains("f8"), "{err}");

        let err = parse_err("[server]\nlog_level = \"verbose\"\n");
        assert_eq!(err.key(), Some("server.log_level"), "{err}");
        assert!(
            err.to_string().contains("unknown log level 'verbose'"),
            "{err}"
        );
        let err = parse_err("[server]\nlog_level = 3\n");
        assert_eq!(err.key(), Some("server.log_level"), "{err}");
        assert!(err.to_string().contains("expected a string"), "{err}");
        let err = parse_err("[[plugins.chain]]\nname = \"a\"\non_error = 1\n");
        assert_eq!(err.key(), Some("plugins.chain[0].on_error"), "{err}");
        assert!(err.to_string().contains("expected a string"), "{err}");

        let err = parse_err("[limits]\nmax_tokens = -5\n");
        assert_eq!(err.key(), Some("limits.max_tokens"), "{err}");
        assert_eq!(err.line(), Some(2), "{err}");

        let err = parse_err("server = 5\n");
        assert_eq!(err.key(), Some("server"), "{err}");
        assert!(err.to_string().contains("expected a table"), "{err}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = parse_err("[model]\nthreads = \n");
        assert_eq!(err.line(), Some(2), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("test.toml: line 2, column "), "{text}");
        assert!(!text.contains('\n'), "{text}");

        let err = parse_err("[server]\nparallel = 1\nparallel = 2\n");
        assert_eq!(err.line(), Some(3), "{err}");
    }

    /// Every ranged option of the table, just outside each end of its range, at a known line.
    #[test]
    fn every_range_error_names_the_key_and_line() {
        let mut tried = 0;
        for desc in OPTIONS {
            let values: Vec<String> = match desc.check {
                Check::Type => continue,
                Check::Int { min, max, .. } => {
                    let mut values = vec![(max + 1).to_string()];
                    if min > 0 {
                        values.push((min - 1).to_string());
                    }
                    values
                }
                Check::Float { min, max, .. } => {
                    vec![
                        format!("{}", min - 1.0),
                        format!("{}", max + 1.0),
                        "nan".into(),
                    ]
                }
            };
            for value in values {
                let text = format!(
                    "# a comment\n\n[{}]\n# another\n{} = {value}\n",
                    desc.section, desc.key
                );
                let err = parse_err(&text);
                assert_eq!(err.key(), Some(desc.path().as_str()), "{err}");
                assert_eq!(err.line(), Some(5), "{err}");
                let message = err.to_string();
                assert!(message.contains("out of range"), "{message}");
                assert!(
                    message.starts_with(&format!("test.toml: line 5, key {}: ", desc.path())),
                    "{message}"
                );
                tried += 1;
            }
        }
        assert!(tried >= 20, "{tried}");

        // In-range edges are accepted.
        parse("[server]\nparallel = 64\nqueue_size = 1\nshutdown_grace = 0\n").unwrap();
        parse("[model]\nctx_size = 16\nsliding_window = 0\nbatch_size = 8192\n").unwrap();
        parse("[prompt_cache]\nentries = 0\n").unwrap();

        let err = parse_err("[server]\nparallel = 0\n");
        assert_eq!(
            err.to_string(),
            "test.toml: line 2, key server.parallel: 0 is out of range (1..=64)"
        );
    }

    #[test]
    fn max_tokens_below_default_max_tokens_is_rejected() {
        let err = parse_err("[limits]\ndefault_max_tokens = 100\nmax_tokens = 50\n");
        assert_eq!(err.key(), Some("limits.max_tokens"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(
            err.to_string().contains("less than default_max_tokens"),
            "{err}"
        );
        // Only default_max_tokens in the file: the error points at it.
        let err = parse_err("[limits]\n\ndefault_max_tokens = 40000\n");
        assert_eq!(err.key(), Some("limits.default_max_tokens"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        parse("[limits]\ndefault_max_tokens = 100\nmax_tokens = 100\n").unwrap();
    }

    #[test]
    fn bad_socket_modes_are_rejected() {
        for (mode, bits) in [("0660", 0o660), ("600", 0o600), ("0o640", 0o640), ("0", 0)] {
            let config = parse(&format!("[server]\nsocket_mode = \"{mode}\"\n")).unwrap();
            assert_eq!(config.socket_mode(), bits, "{mode}");
        }
        for mode in ["\"0999\"", "\"rw-rw----\"", "\"\"", "\"01777\"", "660"] {
            let err = parse_err(&format!("\n[server]\nsocket_mode = {mode}\n"));
            assert_eq!(err.key(), Some("server.socket_mode"), "{mode}: {err}");
            assert_eq!(err.line(), Some(3), "{mode}: {err}");
        }
        let err = parse_err("[server]\nsocket_mode = \"01777\"\n");
        assert!(err.to_string().contains("out of range"), "{err}");
        assert_eq!(SocketMode::default().to_string(), "0660");
    }

    #[test]
    fn bad_listen_addresses_are_rejected() {
        for addr in ["localhost", "127.0.0.1", "127.0.0.1:99999", "::1:80"] {
            let err = parse_err(&format!("[server]\nlisten = \"{addr}\"\n"));
            assert_eq!(err.key(), Some("server.listen"), "{addr}: {err}");
            assert_eq!(err.line(), Some(2), "{addr}: {err}");
            assert!(err.to_string().contains("ADDR:PORT"), "{err}");
        }
    }

    #[test]
    fn socket_group_must_exist() {
        let err = parse_err(
            "[server]\nsocket = \"/tmp/s\"\nsocket_group = \"mistrald-no-such-group-x\"\n",
        );
        assert_eq!(err.key(), Some("server.socket_group"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(err.to_string().contains("no such group"), "{err}");
        // A group that exists here: the process's own.
        // SAFETY: getegid cannot fail; getgrgid's result is read before any other call.
        let own = unsafe {
            let group = libc::getgrgid(libc::getegid());
            (!group.is_null()).then(|| {
                std::ffi::CStr::from_ptr((*group).gr_name)
                    .to_string_lossy()
                    .into_owned()
            })
        };
        if let Some(name) = own {
            let config = parse(&format!("[server]\nsocket_group = \"{name}\"\n")).unwrap();
            // SAFETY: getegid cannot fail.
            assert_eq!(
                config.socket_gid().unwrap(),
                Some(unsafe { libc::getegid() })
            );
        }
        assert_eq!(ServeConfig::default().socket_gid().unwrap(), None);
    }

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        flags: ServeFlags,
    }

    fn flags(args: &[&str]) -> ServeFlags {
        TestCli::try_parse_from(std::iter::once("mistrald").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    #[test]
    fn flags_override_file_values() {
        let mut config = parse(
            "[model]\nthreads = 2\nkv_type = \"f32\"\n[server]\nparallel = 2\nqueue_size = 9\n",
        )
        .unwrap();
        config
            .apply(&flags(&[
                "--threads",
                "6",
                "--parallel",
                "8",
                "--kv-type",
                "q8_0",
                "--model",
                "/m.gguf",
                "--socket",
                "/tmp/x.sock",
                "--listen",
                "127.0.0.1:9000",
                "--ctx-size",
                "1024",
                "--sliding-window",
                "0",
                "--plugins",
                "/opt/plugins",
                "--batch-size",
                "256",
                "--log-level",
                "trace",
                "--attention",
                "ggml",
                "--no-repack",
            ]))
            .unwrap();
        assert_eq!(config.model.threads, Some(6));
        assert_eq!(config.server.parallel, 8);
        assert_eq!(config.server.queue_size, 9, "not given: the file's value");
        assert_eq!(config.model.kv_type, KvType::Q8_0);
        assert_eq!(config.model.path, Some(PathBuf::from("/m.gguf")));
        assert_eq!(config.socket_path(), PathBuf::from("/tmp/x.sock"));
        assert_eq!(
            config.server.listen,
            Some("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(config.model.ctx_size, Some(1024));
        assert_eq!(config.model.sliding_window, Some(0));
        assert_eq!(config.plugins.dir, PathBuf::from("/opt/plugins"));
        assert_eq!(config.model.batch_size, 256);
        assert_eq!(config.server.log_level, LogLevel::Trace);
        assert_eq!(config.model.attention, AttentionChoice::Ggml);
        assert!(!config.model.repack);

        // No flags: nothing changes.
        let before = config.clone();
        config.apply(&ServeFlags::default()).unwrap();
        assert_eq!(config, before);
    }

    #[test]
    fn server_dbus_is_none_by_default_and_set_by_the_file_or_the_flag() {
        assert_eq!(ServeConfig::default().server.dbus, DbusBus::None);
        let mut config = parse("[server]\ndbus = \"session\"\n").unwrap();
        assert_eq!(config.server.dbus, DbusBus::Session);
        config.apply(&flags(&["--dbus", "system"])).unwrap();
        assert_eq!(config.server.dbus, DbusBus::System);
        config.apply(&flags(&["--dbus", "none"])).unwrap();
        assert_eq!(config.server.dbus, DbusBus::None);
        let err = parse_err("[server]\nparallel = 2\ndbus = \"user\"\n");
        assert_eq!(err.key(), Some("server.dbus"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(
            err.to_string()
                .contains("unknown D-Bus bus 'user' (expected none, session or system)"),
            "{err}"
        );
        assert!(TestCli::try_parse_from(["mistrald", "--dbus", "user"]).is_err());
        assert!(print_default().contains("#dbus = \"none\"\n"));
    }

    /// Every ranged option that has a flag: an out-of-range flag value names the flag.
    #[test]
    fn out_of_range_flags_name_the_flag() {
        let mut tried = 0;
        for desc in OPTIONS {
            let (Some(flag), Check::Int { min, max, .. }) = (desc.flag, desc.check) else {
                continue;
            };
            let mut values = vec![max + 1];
            if min > 0 {
                values.push(min - 1);
            }
            for value in values {
                let value = value.to_string();
                let mut config = ServeConfig::default();
                let err = config.apply(&flags(&[flag, &value])).unwrap_err();
                assert_eq!(err.flag(), Some(flag), "{err}");
                assert_eq!(
                    err.to_string(),
                    format!("{flag}: {value} is out of range ({min}..={max})")
                );
                tried += 1;
            }
        }
        assert!(tried >= 6, "{tried}");
        // Values clap rejects by type never reach apply.
        assert!(TestCli::try_parse_from(["mistrald", "--kv-type", "f8"]).is_err());
        assert!(TestCli::try_parse_from(["mistrald", "--listen", "nowhere"]).is_err());
        assert!(TestCli::try_parse_from(["mistrald", "--log-level", "loud"]).is_err());
    }

    #[test]
    fn missing_config_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = ServeConfig::resolve(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("nope.toml"), "{err}");

        // --config beats the system file; the error of a file names it.
        let system = dir.path().join("system.toml");
        std::fs::write(&system, "[server]\nparallel = 3\n").unwrap();
        let explicit = dir.path().join("explicit.toml");
        std::fs::write(&explicit, "[server]\nparallel = 5\n").unwrap();
        let (config, file) = resolve_from(Some(&explicit), &system).unwrap();
        assert_eq!(config.server.parallel, 5);
        assert_eq!(file.as_deref(), Some(explicit.as_path()));
        // No --config: the system file when it exists, else the defaults.
        let (config, file) = resolve_from(None, &system).unwrap();
        assert_eq!(config.server.parallel, 3);
        assert_eq!(file.as_deref(), Some(system.as_path()));
        let (config, file) = resolve_from(None, &missing).unwrap();
        assert_eq!(config, ServeConfig::default());
        assert_eq!(file, None);

        std::fs::write(&explicit, "[server]\n\nparallel = 100\n").unwrap();
        let err = resolve_from(Some(&explicit), &system).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 3, key server.parallel: 100 is out of range (1..=64)",
                explicit.display()
            )
        );
    }

    #[test]
    fn plugin_section_round_trips_with_a_chain_entry() {
        let text = r#"
            [plugins]
            dir = "/opt/plugins"
            time_limit_ms = 20

            [[plugins.chain]]
            name = "moderation"
            required = true
            on_error = "skip"
            grants = ["clock"]
            [plugins.chain.config]
            action = "reject"
            blocklist = ["a", "b"]
        "#;
        let config = parse(text).unwrap();
        assert_eq!(config.plugins.dir, PathBuf::from("/opt/plugins"));
        assert_eq!(config.plugins.time_limit_ms, 20);
        assert_eq!(config.plugins.chain.len(), 1);
        let plugin = &config.plugins.chain[0];
        assert!(plugin.required);
        assert_eq!(plugin.config["blocklist"].as_array().unwrap().len(), 2);
        let again = parse(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);

        // Errors of the plugin section name their key and line.
        let err = parse_err("[plugins]\n\ntime_limit_ms = 0\n");
        assert_eq!(err.key(), Some("plugins.time_limit_ms"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(err.to_string().contains("out of range"), "{err}");
        let err = parse_err(
            "[[plugins.chain]]\nname = \"a\"\n[[plugins.chain]]\nname = \"b\"\n\
             [[plugins.chain]]\nname = \"a\"\n",
        );
        assert_eq!(err.key(), Some("plugins.chain[2]"), "{err}");
        assert_eq!(err.line(), Some(5), "{err}");
        assert!(err.to_string().contains("listed twice"), "{err}");
        let err = parse_err("[[plugins.chain]]\nname = \"x\"\ngrants = [\"root\"]\n");
        assert_eq!(err.key(), Some("plugins.chain[0].grants[0]"), "{err}");
        assert_eq!(err.line(), Some(3), "{err}");
    }

    #[test]
    fn default_socket_path_follows_xdg_runtime_dir_and_root() {
        let xdg = Some(OsString::from("/run/user/1000"));
        assert_eq!(
            socket_path_for(xdg.clone(), 1000),
            PathBuf::from("/run/user/1000/mistrald.sock")
        );
        assert_eq!(socket_path_for(xdg, 0), PathBuf::from(SYSTEM_SOCKET_PATH));
        assert_eq!(
            socket_path_for(None, 1000),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
        assert_eq!(
            socket_path_for(Some(OsString::new()), 1000),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
        assert_eq!(ServeConfig::default().socket_path(), default_socket_path());
    }

    #[test]
    fn config_command_checks_files() {
        #[derive(Parser)]
        struct ConfigCli {
            #[command(flatten)]
            args: ConfigArgs,
        }
        assert!(
            ConfigCli::try_parse_from(["config"]).is_err(),
            "an action is required"
        );
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            uncomment(&print_default(), |line| !line.starts_with("socket_group")),
        )
        .unwrap();
        let args = ConfigCli::try_parse_from(["config", "--check", good.to_str().unwrap()])
            .unwrap()
            .args;
        run_config_command(args).unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[limits]\nmax_stop_strings = \"x\"\n").unwrap();
        let err = run_config_command(ConfigArgs {
            print_default: false,
            check: Some(bad.clone()),
        })
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("bad.toml: line 2, key limits.max_stop_strings"),
            "{text}"
        );
    }
}
