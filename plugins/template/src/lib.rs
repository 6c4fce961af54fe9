//! A mistrald plugin to start from: every hook passes its text through
//! unchanged. Copy this crate, rename it, and change the hooks you need.
//!
//! Build: `cargo build --release --target wasm32-wasip2` (or `plugins/build.sh`),
//! check: `mistrald plugin check target/wasm32-wasip2/release/<name>.wasm`.

// Generates the Rust types and the `Guest` trait from the WIT world.
// The export glue wit-bindgen generates takes the flattened arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../wit",
    world: "plugin",
});

use mistrald::plugin::host::{log, Level};

struct Template;

impl Guest for Template {
    /// Tells the host who we are and which hooks to call; hooks not listed
    /// here are never called (list only what you implement: it saves time).
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "template".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Passes prompts and outputs through unchanged".into(),
            hooks: vec![Hook::OnPrompt, Hook::OnChunk, Hook::OnComplete],
        }
    }

    /// Receives the `config` table of the plugin's `[[plugins.chain]]` entry
    /// on every new instance (once per hook group of a request). Return
    /// `Err` to refuse a bad configuration: the host reports it at load.
    fn init(config: Vec<(String, ConfigValue)>) -> Result<(), String> {
        for (key, value) in config {
            match (key.as_str(), value) {
                ("verbose", ConfigValue::Boolean(_)) => {}
                (key, _) => return Err(format!("unknown config key `{key}`")),
            }
        }
        Ok(())
    }

    /// Before generation: return the prompt (rewritten if you like), or
    /// `Err(Rejection { .. })` to refuse the request.
    fn on_prompt(prompt: String, info: RequestInfo) -> Result<String, Rejection> {
        log(
            Level::Debug,
            &format!("request {} prompt: {} bytes", info.id, prompt.len()),
        );
        Ok(prompt)
    }

    /// Each streamed piece: `text` is what you held back before plus the new
    /// piece. Pass it, replace it, hold part of it for the next call, or stop.
    fn on_chunk(_text: String, _last: bool) -> ChunkAction {
        ChunkAction::Pass
    }

    /// The whole output at the end: return it (rewritten if you like), or
    /// refuse it.
    fn on_complete(text: String, _info: RequestInfo) -> Result<String, Rejection> {
        Ok(text)
    }
}

export!(Template);
