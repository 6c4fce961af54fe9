//! WebAssembly post-processing plugins.
//!
//! Plugins are WebAssembly components implementing the `mistrald:plugin`
//! world (`plugins/wit/plugin.wit`). They run in wasmtime, sandboxed: each
//! hook call has a wall-clock limit and each instance a memory limit, a
//! plugin only gets a rate-limited log import and the WASI plumbing the Rust
//! standard library needs (with an empty environment, captured stdio, no
//! preopened directory), and clocks, filesystem, network or environment only
//! when its configuration grants them. A fault in a plugin fails (or, per
//! configuration, skips the plugin for) only the request it happened in.
//!
//! The daemon creates one [`PluginHost`] from its [`PluginsConfig`], takes
//! the current [`PluginChain`] for each request and calls
//! [`PluginChain::on_prompt`] before generation, a per-request
//! [`ChunkFilter`] on each streamed piece and [`PluginChain::on_complete`] on
//! the final text; SIGHUP calls [`PluginHost::reload`].
//!
//! Modules: `config` (serde types of `[plugins]`), `host` (start, reload),
//! `chain` (hook order, streaming state), `loader` (compile, validate,
//! instantiate, classify faults), `limits` (deadlines, memory), `sandbox`
//! (import policy, WASI context), `cache` (compiled code on disk), `bindings`
//! (WIT bindings, store data), `guest_log` (the log import), `command`
//! (`mistrald plugin …`).

mod bindings;
mod cache;
mod chain;
pub mod command;
mod config;
mod error;
mod guest_log;
mod host;
mod limits;
mod loader;
mod sandbox;

pub use chain::{ChunkFilter, ChunkOutput, PluginChain};
pub use config::{Grant, OnError, PluginConfig, PluginsConfig, DEFAULT_PLUGIN_DIR};
pub use error::{Fault, LoadError, LoadProblem, PluginError};
pub use host::{LoadReport, LoadedSummary, PluginHost};
pub use limits::Limits;

/// A hook of the plugin interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `on-prompt`: before generation.
    OnPrompt,
    /// `on-chunk`: on each streamed piece.
    OnChunk,
    /// `on-complete`: on the final output.
    OnComplete,
}

impl Hook {
    /// The WIT name (`on-prompt`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::OnPrompt => "on-prompt",
            Hook::OnChunk => "on-chunk",
            Hook::OnComplete => "on-complete",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a plugin's `describe` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The plugin's own name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// One line on what it does.
    pub description: String,
    /// Hooks it implements (the host calls only these).
    pub hooks: Vec<Hook>,
}

/// Facts about a request, passed to `on-prompt` and `on-complete`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// Daemon-unique request id.
    pub id: u64,
    /// Name of the model serving the request.
    pub model: String,
    /// Who sent it (`uid:1000`, a D-Bus unique name…), or empty.
    pub client: String,
    /// Whether the output is streamed to the client.
    pub streaming: bool,
}
