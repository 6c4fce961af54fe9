//! [`PluginHost`]: loads the configured chain at start and on reload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use super::cache::CompileCache;
use super::chain::PluginChain;
use super::config::{PluginConfig, PluginsConfig};
use super::error::LoadError;
use super::loader::{LoadedPlugin, Runtime};
use super::PluginInfo;

/// Owns the WebAssembly runtime and the current [`PluginChain`].
///
/// `Send + Sync`: share it in an `Arc`; [`PluginHost::chain`] hands out the
/// current chain, [`PluginHost::reload`] (the daemon's SIGHUP) swaps in a new
/// one without disturbing requests in flight.
pub struct PluginHost {
    runtime: Arc<Runtime>,
    config: Mutex<PluginsConfig>,
    chain: RwLock<Arc<PluginChain>>,
}

/// A plugin that was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSummary {
    /// Configured (or file) name.
    pub name: String,
    /// The plugin file.
    pub path: PathBuf,
    /// What its `describe` returned.
    pub info: PluginInfo,
}

/// The outcome of loading the chain.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Plugins in the new chain, in order.
    pub loaded: Vec<LoadedSummary>,
    /// Plugins that could not be loaded and were left out (not `required`).
    /// Each is also logged as a warning.
    pub skipped: Vec<LoadError>,
}

impl PluginHost {
    /// Starts the runtime and loads the chain `config` describes. Fails if the
    /// configuration is invalid or a `required` plugin cannot be loaded;
    /// other broken plugins are left out and listed in the report.
    pub fn new(config: PluginsConfig) -> Result<(Self, LoadReport), LoadError> {
        config.validate()?;
        let runtime = Runtime::new()?;
        let (chain, report) = load_chain(&runtime, &config)?;
        let host = PluginHost {
            runtime,
            config: Mutex::new(config),
            chain: RwLock::new(Arc::new(chain)),
        };
        Ok((host, report))
    }

    /// The current chain. Keep the `Arc` for the whole request so a reload in
    /// the middle of it does not change its plugins.
    pub fn chain(&self) -> Arc<PluginChain> {
        Arc::clone(&self.chain.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The configuration in force.
    pub fn config(&self) -> PluginsConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the chain again from the plugin directory with the current
    /// configuration (picks up changed, added and removed files). On error
    /// the old chain stays in force.
    pub fn reload(&self) -> Result<LoadReport, LoadError> {
        self.reload_with(self.config())
    }

    /// Like [`PluginHost::reload`] with a new configuration (the daemon's
    /// config file was read again). On error the old chain and configuration
    /// stay in force.
    pub fn reload_with(&self, config: PluginsConfig) -> Result<LoadReport, LoadError> {
        config.validate()?;
        let (chain, report) = load_chain(&self.runtime, &config)?;
        *self.chain.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(chain);
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(report)
    }
}

/// The chain entries: the configured ones in order, then (with `autoload`)
/// the other `*.wasm` files of the directory in file name order.
fn chain_entries(config: &PluginsConfig) -> Vec<(PluginConfig, PathBuf)> {
    let mut entries: Vec<(PluginConfig, PathBuf)> = config
        .chain
        .iter()
        .map(|plugin| (plugin.clone(), plugin.resolved_path(&config.dir)))
        .collect();
    if !config.autoload {
        return entries;
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&config.dir) {
        Ok(dir) => dir
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound || !config.chain.is_empty() {
                log::warn!("plugins: cannot list {}: {e}", config.dir.display());
            }
            Vec::new()
        }
    };
    files.sort();
    for path in files {
        let listed = entries.iter().any(|(_, p)| same_file(p, &path));
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if listed || entries.iter().any(|(p, _)| p.name == name) {
            continue;
        }
        entries.push((PluginConfig::new(name), path));
    }
    entries
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn load_chain(
    runtime: &Runtime,
    config: &PluginsConfig,
) -> Result<(PluginChain, LoadReport), LoadError> {
    let cache = match &config.cache_dir {
        Some(dir) => match CompileCache::open(dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                log::warn!("plugins: compiled-code cache disabled: {e}");
                None
            }
        },
        None => None,
    };
    let limits = config.limits();
    let mut plugins = Vec::new();
    let mut report = LoadReport::default();
    for (settings, path) in chain_entries(config) {
        match LoadedPlugin::load(runtime, &settings, &path, limits, cache.as_ref()) {
            Ok(plugin) => {
                log::info!(
                    "plugin '{}' loaded from {}: {} {} ({})",
                    settings.name,
                    path.display(),
                    plugin.info.name,
                    plugin.info.version,
                    plugin
                        .info
                        .hooks
                        .iter()
                        .map(|h| h.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                report.loaded.push(LoadedSummary {
                    name: settings.name.clone(),
                    path,
                    info: plugin.info.clone(),
                });
                plugins.push(Arc::new(plugin));
            }
            Err(error) if settings.required => return Err(error),
            Err(error) => {
                log::warn!("{error}; the plugin is left out");
                report.skipped.push(error);
            }
        }
    }
    Ok((PluginChain::new(plugins), report))
}
