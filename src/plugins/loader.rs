//! Loading a plugin: read and compile the file once (through the on-disk
//! cache when configured), check its imports against the sandbox policy, link
//! it against the `mistrald:plugin` world, call `describe` and `init` once to
//! validate it. Also the per-instance wrapper that runs hook calls under the
//! limits and turns wasmtime errors into [`Fault`]s.

use std::path::Path;
use std::sync::Arc;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::bindings::{
    self, ChunkAction, ConfigValue, HostState, Plugin, PluginPre, WitHook, WitRequestInfo,
    CAPTURED_OUTPUT_BYTES,
};
use super::cache::CompileCache;
use super::config::PluginConfig;
use super::error::{Fault, LoadError, LoadProblem};
use super::guest_log::GuestLog;
use super::limits::{EpochTicker, Limits, MemoryLimiter};
use super::sandbox;
use super::{Hook, PluginInfo, RequestInfo};

/// Largest plugin file accepted.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Size of the WebAssembly stack (deeper recursion traps).
const MAX_WASM_STACK: usize = 512 << 10;

/// The wasmtime engine, the linker with the host's imports, and the epoch
/// ticker; shared by every plugin and every chain built from it.
pub(crate) struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    _ticker: EpochTicker,
}

impl Runtime {
    /// Sets up the engine (epoch interruption, stack limit), the linker (WASI
    /// and the `mistrald:plugin/host` import) and the ticker thread.
    pub(crate) fn new() -> Result<Arc<Self>, LoadError> {
        let runtime_err = |e: wasmtime::Error| LoadError::Runtime(format!("{e:#}"));
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK);
        let engine = Engine::new(&config).map_err(runtime_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(runtime_err)?;
        bindings::add_host_to_linker(&mut linker).map_err(runtime_err)?;
        let ticker = EpochTicker::start(engine.clone())
            .map_err(|e| LoadError::Runtime(format!("cannot start the epoch thread: {e}")))?;
        Ok(Arc::new(Runtime {
            engine,
            linker,
            _ticker: ticker,
        }))
    }
}

/// A compiled component and the names of its imports.
pub(crate) struct Compiled {
    component: Component,
    /// Import names (`package/interface@version`), in the component's order.
    pub(crate) imports: Vec<String>,
}

/// Reads and compiles a plugin file.
pub(crate) fn compile(
    runtime: &Runtime,
    path: &Path,
    cache: Option<&CompileCache>,
) -> Result<Compiled, LoadProblem> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_FILE_BYTES {
        return Err(LoadProblem::TooLarge(len));
    }
    let bytes = std::fs::read(path)?;
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadProblem::NotWasm);
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadProblem::CoreModule);
    }
    let component = match cache {
        Some(cache) => cache.load_or_compile(&runtime.engine, &bytes),
        None => Component::new(&runtime.engine, &bytes),
    }
    .map_err(|e| LoadProblem::Compile(format!("{e:#}")))?;
    let imports = component
        .component_type()
        .imports(&runtime.engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    Ok(Compiled { component, imports })
}

/// A validated plugin, ready to be instantiated for requests.
pub(crate) struct LoadedPlugin {
    pub(crate) settings: PluginConfig,
    pub(crate) info: PluginInfo,
    config_values: Vec<(String, ConfigValue)>,
    pre: PluginPre<HostState>,
    limits: Limits,
    log: Arc<GuestLog>,
}

impl LoadedPlugin {
    /// Loads and validates the plugin `settings` describes, from `path`.
    pub(crate) fn load(
        runtime: &Runtime,
        settings: &PluginConfig,
        path: &Path,
        limits: Limits,
        cache: Option<&CompileCache>,
    ) -> Result<Self, LoadError> {
        let error = |problem| LoadError::Plugin {
            plugin: settings.name.clone(),
            path: path.to_owned(),
            problem,
        };
        let compiled = compile(runtime, path, cache).map_err(error)?;
        Self::link(runtime, settings, path, compiled, limits)
    }

    /// Validates an already compiled plugin (see [`LoadedPlugin::load`]).
    pub(crate) fn link(
        runtime: &Runtime,
        settings: &PluginConfig,
        path: &Path,
        compiled: Compiled,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let error = |problem| LoadError::Plugin {
            plugin: settings.name.clone(),
            path: path.to_owned(),
            problem,
        };
        sandbox::check_imports(compiled.imports.iter().map(String::as_str), settings)
            .map_err(error)?;
        // Fails early (at load, not per request) if a granted directory is missing.
        sandbox::wasi_ctx(settings, &MemoryOutputPipe::new(0)).map_err(error)?;
        let config_values = config_values(&settings.config).map_err(error)?;
        let pre = runtime
            .linker
            .instantiate_pre(&compiled.component)
            .and_then(PluginPre::new)
            .map_err(|e| error(LoadProblem::Interface(format!("{e:#}"))))?;
        let mut plugin = LoadedPlugin {
            settings: settings.clone(),
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                hooks: Vec::new(),
            },
            config_values,
            pre,
            limits,
            log: Arc::new(GuestLog::new(&settings.name)),
        };
        let mut instance = plugin.instance_without_init().map_err(|fault| {
            error(LoadProblem::Call {
                hook: "instantiation",
                fault,
            })
        })?;
        let info = instance
            .call(|plugin, store| plugin.call_describe(store))
            .map_err(|fault| {
                error(LoadProblem::Call {
                    hook: "describe()",
                    fault,
                })
            })?;
        plugin.info = validate_info(info).map_err(|e| error(LoadProblem::Describe(e)))?;
        let config = plugin.config_values.clone();
        instance
            .call(|plugin, store| plugin.call_init(store, &config))
            .map_err(|fault| {
                error(LoadProblem::Call {
                    hook: "init()",
                    fault,
                })
            })?
            .map_err(|message| error(LoadProblem::Init(message)))?;
        Ok(plugin)
    }

    /// The configured name.
    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    /// Whether `describe` listed `hook`.
    pub(crate) fn implements(&self, hook: Hook) -> bool {
        self.info.hooks.contains(&hook)
    }

    /// A fresh instance with the plugin's configuration applied (`init`).
    pub(crate) fn instance(&self) -> Result<PluginInstance, Fault> {
        let mut instance = self.instance_without_init()?;
        let config = &self.config_values;
        instance
            .call(|plugin, store| plugin.call_init(store, config))?
            .map_err(|message| {
                Fault::Instantiation(format!("init() refused its configuration: {message}"))
            })?;
        Ok(instance)
    }

    fn instance_without_init(&self) -> Result<PluginInstance, Fault> {
        let output = MemoryOutputPipe::new(CAPTURED_OUTPUT_BYTES);
        let wasi = sandbox::wasi_ctx(&self.settings, &output)
            .map_err(|e| Fault::Instantiation(e.to_string()))?;
        let state = HostState::new(
            wasi,
            output,
            MemoryLimiter::new(self.limits.memory_bytes),
            Arc::clone(&self.log),
        );
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(self.limits.deadline_ticks());
        let bindings = match self.pre.instantiate(&mut store) {
            Ok(bindings) => bindings,
            Err(e) => {
                return Err(match classify(e, store.data(), &self.limits) {
                    fault @ (Fault::MemoryLimit(_) | Fault::Timeout(_) | Fault::StackOverflow) => {
                        fault
                    }
                    other => Fault::Instantiation(other.to_string()),
                })
            }
        };
        Ok(PluginInstance {
            store,
            bindings,
            limits: self.limits,
            poisoned: false,
        })
    }
}

/// One live instance of a plugin (one store). Not reused after a fault.
pub(crate) struct PluginInstance {
    store: Store<HostState>,
    bindings: Plugin,
    limits: Limits,
    poisoned: bool,
}

impl PluginInstance {
    /// Runs one call under the time limit; any error poisons the instance.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        if self.poisoned {
            return Err(Fault::Poisoned);
        }
        self.store.set_epoch_deadline(self.limits.deadline_ticks());
        f(&self.bindings, &mut self.store).map_err(|e| {
            self.poisoned = true;
            classify(e, self.store.data(), &self.limits)
        })
    }

    fn check_len(&self, len: usize) -> Result<(), Fault> {
        if len > self.limits.max_output_bytes {
            Err(Fault::OutputTooLarge {
                len,
                limit: self.limits.max_output_bytes,
            })
        } else {
            Ok(())
        }
    }

    /// Calls `on-prompt` or `on-complete`: `Ok(Ok(text))` to go on,
    /// `Ok(Err(reason))` for a rejection.
    pub(crate) fn text_hook(
        &mut self,
        hook: Hook,
        text: &str,
        info: &RequestInfo,
    ) -> Result<Result<String, String>, Fault> {
        let info = WitRequestInfo {
            id: info.id,
            model: info.model.clone(),
            client: info.client.clone(),
            streaming: info.streaming,
        };
        let result = match hook {
            Hook::OnPrompt => self.call(|p, s| p.call_on_prompt(s, text, &info))?,
            Hook::OnComplete => self.call(|p, s| p.call_on_complete(s, text, &info))?,
            Hook::OnChunk => unreachable!("on-chunk is not a text hook"),
        };
        match result {
            Ok(text) => {
                self.check_len(text.len())?;
                Ok(Ok(text))
            }
            Err(rejection) => {
                self.check_len(rejection.reason.len())?;
                Ok(Err(rejection.reason))
            }
        }
    }

    /// Calls `on-chunk`.
    pub(crate) fn on_chunk(&mut self, text: &str, last: bool) -> Result<ChunkAction, Fault> {
        let action = self.call(|p, s| p.call_on_chunk(s, text, last))?;
        match &action {
            ChunkAction::Pass => {}
            ChunkAction::Replace(text) | ChunkAction::Stop(text) => self.check_len(text.len())?,
            ChunkAction::Hold(held) => {
                self.check_len(held.release.len())?;
                self.check_len(held.keep.len())?;
            }
        }
        Ok(action)
    }
}

/// Turns a wasmtime error from a call into the fault it stands for.
fn classify(error: wasmtime::Error, state: &HostState, limits: &Limits) -> Fault {
    if state.limiter.hit() {
        return Fault::MemoryLimit(state.limiter.limit());
    }
    if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Fault::Exited(exit.0);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Fault::Timeout(limits.time_limit),
        Some(Trap::StackOverflow) => Fault::StackOverflow,
        Some(trap) => Fault::Trap {
            message: trap.to_string(),
            stderr: state.captured_output(),
        },
        None => Fault::InvalidOutput(format!("{error:#}")),
    }
}

/// Checks and converts what `describe` returned.
fn validate_info(info: bindings::WitPluginInfo) -> Result<PluginInfo, String> {
    let check = |field: &str, value: &str, max: usize| {
        if value.len() > max {
            Err(format!("{field} is longer than {max} bytes"))
        } else if value.chars().any(char::is_control) {
            Err(format!("{field} contains control characters"))
        } else {
            Ok(())
        }
    };
    if info.name.is_empty() {
        return Err("name is empty".into());
    }
    check("name", &info.name, 64)?;
    check("version", &info.version, 64)?;
    check("description", &info.description, 1024)?;
    let mut hooks = Vec::new();
    for hook in info.hooks {
        let hook = match hook {
            WitHook::OnPrompt => Hook::OnPrompt,
            WitHook::OnChunk => Hook::OnChunk,
            WitHook::OnComplete => Hook::OnComplete,
        };
        if !hooks.contains(&hook) {
            hooks.push(hook);
        }
    }
    Ok(PluginInfo {
        name: info.name,
        version: info.version,
        description: info.description,
        hooks,
    })
}

/// Converts the plugin's `config` table into the values `init` receives.
fn config_values(table: &toml::Table) -> Result<Vec<(String, ConfigValue)>, LoadProblem> {
    let problem = |key: &str, problem: &str| LoadProblem::ConfigValue {
        key: key.to_owned(),
        problem: problem.to_owned(),
    };
    table
        .iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => ConfigValue::Text(s.clone()),
                toml::Value::Integer(i) => ConfigValue::Integer(*i),
                toml::Value::Float(f) => ConfigValue::Float(*f),
                toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
                toml::Value::Datetime(d) => ConfigValue::Text(d.to_string()),
                toml::Value::Array(items) => ConfigValue::TextList(
                    items
                        .iter()
                        .map(|item| item.as_str().map(str::to_owned))
                        .collect::<Option<_>>()
                        .ok_or_else(|| problem(key, "arrays passed to plugins may only hold strings"))?,
                ),
                toml::Value::Table(_) => {
                    return Err(problem(
                        key,
                        "tables cannot be passed to plugins (use strings, numbers, booleans or arrays of strings)",
                    ))
                }
            };
            Ok((key.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_convert_or_name_the_key() {
        let table: toml::Table =
            toml::from_str("a = \"x\"\nb = 3\nc = true\nd = [\"p\", \"q\"]\ne = 1.5").unwrap();
        let values = config_values(&table).unwrap();
        assert_eq!(values.len(), 5);
        assert!(matches!(&values[0], (k, ConfigValue::Text(v)) if k == "a" && v == "x"));
        assert!(matches!(&values[1], (_, ConfigValue::Integer(3))));
        assert!(matches!(&values[3], (_, ConfigValue::TextList(v)) if v.len() == 2));

        let table: toml::Table = toml::from_str("bad = [1, 2]").unwrap();
        let err = config_values(&table).unwrap_err().to_string();
        assert!(
            err.contains("`bad`") && err.contains("only hold strings"),
            "{err}"
        );
        let table: toml::Table = toml::from_str("[nested]\nx = 1").unwrap();
        let err = config_values(&table).unwrap_err().to_string();
        assert!(err.contains("`nested`"), "{err}");
    }

    #[test]
    fn describe_output_is_checked() {
        let info = |name: &str| bindings::WitPluginInfo {
            name: name.into(),
            version: "1".into(),
            description: String::new(),
            hooks: vec![WitHook::OnChunk, WitHook::OnChunk],
        };
        assert_eq!(
            validate_info(info("ok")).unwrap().hooks,
            vec![Hook::OnChunk]
        );
        assert!(validate_info(info("")).unwrap_err().contains("empty"));
        assert!(validate_info(info("a\nb")).unwrap_err().contains("control"));
    }
}
