//! Errors of the plugin host. Every message names the plugin and the problem.

use std::path::PathBuf;
use std::time::Duration;

use super::config::Grant;
use super::Hook;

/// Why a request did not get through the plugin chain.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A plugin refused the prompt or the output; `reason` comes from the
    /// plugin and is meant for the client.
    #[error("rejected by plugin '{plugin}' ({hook}): {reason}")]
    Rejected {
        /// Configured name of the plugin.
        plugin: String,
        /// The hook that rejected.
        hook: Hook,
        /// The plugin's reason.
        reason: String,
    },
    /// A plugin failed (trap, timeout, memory limit, invalid output) and its
    /// configuration says `on_error = "fail"`.
    #[error("plugin '{plugin}' failed in {hook}: {fault}")]
    Failed {
        /// Configured name of the plugin.
        plugin: String,
        /// The hook that was running.
        hook: Hook,
        /// What went wrong.
        fault: Fault,
    },
}

impl PluginError {
    /// The configured name of the plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            PluginError::Rejected { plugin, .. } | PluginError::Failed { plugin, .. } => plugin,
        }
    }
}

/// What went wrong inside one call of a plugin.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fault {
    /// The call ran past the time limit and was interrupted.
    #[error("timed out (time limit {0:?} per call)")]
    Timeout(Duration),
    /// The instance asked for more memory than allowed.
    #[error("exceeded the memory limit of {} MiB", .0 >> 20)]
    MemoryLimit(usize),
    /// The call recursed past the WebAssembly stack limit.
    #[error("stack overflow (recursion too deep)")]
    StackOverflow,
    /// The plugin trapped (a panic, `unreachable`, an out-of-bounds access…).
    #[error("trapped: {message}{}", stderr_suffix(.stderr))]
    Trap {
        /// wasmtime's description of the trap.
        message: String,
        /// What the plugin wrote to stderr/stdout before, if anything (a Rust
        /// panic message, for example).
        stderr: String,
    },
    /// The plugin returned data the host could not accept (invalid UTF-8,
    /// out-of-bounds pointers, an invalid variant).
    #[error("returned invalid output: {0}")]
    InvalidOutput(String),
    /// The plugin returned a text longer than the configured cap.
    #[error("returned {len} bytes, more than the limit of {limit} bytes")]
    OutputTooLarge {
        /// Length of the returned text.
        len: usize,
        /// The cap (`max_output_kib`).
        limit: usize,
    },
    /// The plugin called `exit`.
    #[error("exited with status {0}")]
    Exited(i32),
    /// A new instance could not be created.
    #[error("could not be instantiated: {0}")]
    Instantiation(String),
    /// The instance already failed earlier in this request.
    #[error("is unusable after an earlier fault in this request")]
    Poisoned,
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(" (plugin output: {stderr})")
    }
}

/// Why a plugin (or the plugin configuration) could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// One plugin could not be loaded.
    #[error("plugin '{plugin}' ({}): {problem}", .path.display())]
    Plugin {
        /// Configured (or file) name of the plugin.
        plugin: String,
        /// The plugin file.
        path: PathBuf,
        /// What is wrong with it.
        problem: LoadProblem,
    },
    /// The `[plugins]` configuration is invalid.
    #[error("plugin configuration: {0}")]
    Config(String),
    /// The WebAssembly runtime could not be set up.
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

/// What is wrong with a plugin file.
#[derive(Debug, thiserror::Error)]
pub enum LoadProblem {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    /// The file is larger than any plugin may be.
    #[error("file is {0} bytes, larger than the 64 MiB a plugin may be")]
    TooLarge(u64),
    /// The file is not WebAssembly.
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    /// The file is a core module, not a component.
    #[error(
        "is a core WebAssembly module, not a component: build it for wasm32-wasip2 \
         (see plugins/template/README.md)"
    )]
    CoreModule,
    /// wasmtime rejected the component.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The component imports a capability the configuration does not grant.
    #[error(
        "imports `{import}`, which needs the \"{grant}\" grant (not granted in its configuration)"
    )]
    NotGranted {
        /// The import name.
        import: String,
        /// The grant it needs.
        grant: Grant,
    },
    /// The component imports something mistrald never provides.
    #[error("imports `{0}`, which mistrald does not provide to plugins")]
    UnknownImport(String),
    /// The component does not match the `mistrald:plugin` world.
    #[error("does not implement the mistrald:plugin interface: {0}")]
    Interface(String),
    /// `describe` returned something unusable.
    #[error("describe() returned an invalid plugin-info: {0}")]
    Describe(String),
    /// Calling the plugin at load failed.
    #[error("{hook} failed at load: {fault}")]
    Call {
        /// `describe` or `init`.
        hook: &'static str,
        /// What went wrong.
        fault: Fault,
    },
    /// The plugin's `config` table has a value that cannot be passed to it.
    #[error("config key `{key}`: {problem}")]
    ConfigValue {
        /// The key.
        key: String,
        /// Why it cannot be passed.
        problem: String,
    },
    /// The plugin's `init` refused its configuration.
    #[error("refused its configuration: {0}")]
    Init(String),
    /// A directory to grant could not be opened.
    #[error("cannot open granted directory {}: {error}", .dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The error.
        error: String,
    },
}
