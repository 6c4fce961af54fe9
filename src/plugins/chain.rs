//! The plugin chain: hooks run through the plugins in configuration order,
//! each plugin's output being the next one's input. Every hook group (a
//! prompt, a stream of chunks, a final text) runs in fresh instances, so no
//! state leaks between requests and a fault only affects its own request.

use std::sync::Arc;

use super::bindings::ChunkAction;
use super::config::OnError;
use super::error::{Fault, PluginError};
use super::loader::{LoadedPlugin, PluginInstance};
use super::{Hook, PluginInfo, RequestInfo};

/// An immutable, loaded chain of plugins. Cheap to share (`Arc`); a reload
/// builds a new chain while requests in flight finish on the old one.
///
/// All methods block the calling thread while plugins run (each call is
/// bounded by the time limit). From async code, call them through
/// `tokio::task::spawn_blocking` or from a dedicated thread (the engine
/// thread), not directly on a runtime worker.
pub struct PluginChain {
    plugins: Vec<Arc<LoadedPlugin>>,
}

/// What [`ChunkFilter::push`] gives back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkOutput {
    /// Text to send to the client now (may be empty while plugins hold text).
    pub text: String,
    /// A plugin asked to end the generation: send `text`, then stop.
    pub stop: bool,
}

impl PluginChain {
    pub(crate) fn new(plugins: Vec<Arc<LoadedPlugin>>) -> Self {
        PluginChain { plugins }
    }

    /// A chain without plugins (every hook passes its text through).
    pub fn empty() -> Self {
        PluginChain {
            plugins: Vec::new(),
        }
    }

    /// Whether the chain has no plugin.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Configured names and `describe` information, in chain order.
    pub fn plugins(&self) -> Vec<(String, PluginInfo)> {
        self.plugins
            .iter()
            .map(|p| (p.name().to_owned(), p.info.clone()))
            .collect()
    }

    /// Runs `on-prompt` through the chain: the (possibly rewritten) prompt,
    /// or the rejection or fault that stops the request.
    pub fn on_prompt(&self, prompt: &str, info: &RequestInfo) -> Result<String, PluginError> {
        self.text_hook(Hook::OnPrompt, prompt, info)
    }

    /// Runs `on-complete` through the chain on the whole output.
    pub fn on_complete(&self, text: &str, info: &RequestInfo) -> Result<String, PluginError> {
        self.text_hook(Hook::OnComplete, text, info)
    }

    /// A filter for one streamed output (the request `info` describes).
    pub fn chunk_filter(&self, info: &RequestInfo) -> ChunkFilter {
        ChunkFilter {
            request: info.id,
            stages: self
                .plugins
                .iter()
                .filter(|p| p.implements(Hook::OnChunk))
                .map(|plugin| Stage {
                    plugin: Arc::clone(plugin),
                    instance: None,
                    held: String::new(),
                    skipped: false,
                })
                .collect(),
            ended: false,
        }
    }

    fn text_hook(&self, hook: Hook, text: &str, info: &RequestInfo) -> Result<String, PluginError> {
        let mut text = text.to_owned();
        for plugin in self.plugins.iter().filter(|p| p.implements(hook)) {
            let result = plugin
                .instance()
                .and_then(|mut instance| instance.text_hook(hook, &text, info));
            match result {
                Ok(Ok(output)) => text = output,
                Ok(Err(reason)) => {
                    return Err(PluginError::Rejected {
                        plugin: plugin.name().to_owned(),
                        hook,
                        reason,
                    })
                }
                Err(fault) => fault_policy(plugin, hook, fault, info.id)?,
            }
        }
        Ok(text)
    }
}

/// Applies a plugin's `on_error`: `Err` to fail the request, `Ok` to go on
/// without the plugin (the fault is logged).
fn fault_policy(
    plugin: &LoadedPlugin,
    hook: Hook,
    fault: Fault,
    request: u64,
) -> Result<(), PluginError> {
    match plugin.settings.on_error {
        OnError::Fail => Err(PluginError::Failed {
            plugin: plugin.name().to_owned(),
            hook,
            fault,
        }),
        OnError::Skip => {
            log::warn!(
                "plugin '{}' failed in {hook} (request {request}), skipped: {fault}",
                plugin.name()
            );
            Ok(())
        }
    }
}

/// Per-request streaming state: turns the pieces the model produces into the
/// pieces the client gets, running `on-chunk` of each plugin in chain order
/// and keeping the text each plugin holds back.
pub struct ChunkFilter {
    request: u64,
    stages: Vec<Stage>,
    ended: bool,
}

struct Stage {
    plugin: Arc<LoadedPlugin>,
    instance: Option<PluginInstance>,
    /// Text the plugin held back; prepended to its next input.
    held: String,
    /// The plugin failed with `on_error = "skip"`: it is passed over.
    skipped: bool,
}

impl ChunkFilter {
    /// Feeds one generated piece of text; returns what to send now.
    /// After a plugin stopped the stream (or after [`ChunkFilter::finish`]),
    /// returns empty text with `stop` set.
    pub fn push(&mut self, piece: &str) -> Result<ChunkOutput, PluginError> {
        if self.ended {
            return Ok(ChunkOutput {
                text: String::new(),
                stop: true,
            });
        }
        self.run(piece.to_owned(), false)
    }

    /// Ends the stream: every plugin gets a last call (`last = true`) and
    /// releases what it held. Returns the text to send before `done`.
    pub fn finish(&mut self) -> Result<String, PluginError> {
        if self.ended {
            return Ok(String::new());
        }
        self.run(String::new(), true).map(|output| output.text)
    }

    fn run(&mut self, mut text: String, mut last: bool) -> Result<ChunkOutput, PluginError> {
        let mut stop = false;
        for stage in &mut self.stages {
            if stage.skipped {
                continue;
            }
            let mut input = std::mem::take(&mut stage.held);
            input.push_str(&text);
            if input.is_empty() && !last {
                text = input;
                continue;
            }
            match stage.call(&input, last) {
                Ok(ChunkAction::Pass) => text = input,
                Ok(ChunkAction::Replace(output)) => text = output,
                Ok(ChunkAction::Hold(held)) => {
                    text = held.release;
                    if !last {
                        stage.held = held.keep;
                    }
                }
                Ok(ChunkAction::Stop(output)) => {
                    text = output;
                    stop = true;
                    // The stream ends here: later plugins get their last call.
                    last = true;
                }
                Err(fault) => {
                    if let Err(error) =
                        fault_policy(&stage.plugin, Hook::OnChunk, fault, self.request)
                    {
                        self.ended = true;
                        return Err(error);
                    }
                    stage.skipped = true;
                    stage.instance = None;
                    text = input;
                }
            }
        }
        if last {
            self.ended = true;
            self.stages.clear();
        }
        Ok(ChunkOutput { text, stop })
    }
}

impl Stage {
    fn call(&mut self, input: &str, last: bool) -> Result<ChunkAction, Fault> {
        let instance = match &mut self.instance {
            Some(instance) => instance,
            slot => slot.insert(self.plugin.instance()?),
        };
        instance.on_chunk(input, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn usable_across_threads() {
        send_sync::<super::super::PluginHost>();
        send_sync::<PluginChain>();
        send::<ChunkFilter>();
    }

    #[test]
    fn empty_chain_passes_everything() {
        let chain = PluginChain::empty();
        let info = RequestInfo::default();
        assert!(chain.is_empty());
        assert_eq!(chain.on_prompt("hi", &info).unwrap(), "hi");
        assert_eq!(chain.on_complete("out", &info).unwrap(), "out");
        let mut filter = chain.chunk_filter(&info);
        assert_eq!(
            filter.push("a").unwrap(),
            ChunkOutput {
                text: "a".into(),
                stop: false
            }
        );
        assert_eq!(filter.finish().unwrap(), "");
        assert!(filter.push("b").unwrap().stop);
    }
}
