//! `mistrald plugin …`: check a plugin file against the interface, run one
//! hook of it on a text, or measure its per-call overhead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::config::{Grant, PluginConfig, PluginsConfig};
use super::error::LoadError;
use super::host::PluginHost;
use super::loader::{compile, LoadedPlugin, Runtime};
use super::sandbox::needed_grants;
use super::{Hook, RequestInfo};

/// The `plugin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Validate a plugin file against the mistrald plugin interface and print
    /// what it describes (exit status 1 if it is not a valid plugin).
    Check {
        /// The plugin (a WebAssembly component).
        file: PathBuf,
        /// TOML file with the plugin's configuration table, passed to `init`.
        #[arg(long)]
        config_file: Option<PathBuf>,
    },
    /// Run one hook of a plugin on a text and print the result.
    Run {
        /// The plugin (a WebAssembly component).
        file: PathBuf,
        /// The hook to call.
        #[arg(long, value_enum)]
        hook: TextHook,
        /// The prompt or output text.
        #[arg(long)]
        text: String,
        /// TOML file with the plugin's configuration table, passed to `init`.
        #[arg(long)]
        config_file: Option<PathBuf>,
        /// WASI capability to grant (repeatable).
        #[arg(long = "grant", value_enum)]
        grants: Vec<Grant>,
        /// Time limit per call, in milliseconds.
        #[arg(long, default_value_t = 50)]
        time_limit_ms: u64,
    },
    /// Measure the per-call overhead of a plugin: on-prompt and on-complete
    /// per request, and on-chunk per streamed token.
    Bench {
        /// The plugin (a WebAssembly component); use a pass-through plugin
        /// such as plugins/dist/template.wasm to measure the host overhead.
        file: PathBuf,
        /// Tokens (chunks) per simulated output.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Simulated requests.
        #[arg(long, default_value_t = 50)]
        requests: usize,
        /// TOML file with the plugin's configuration table.
        #[arg(long)]
        config_file: Option<PathBuf>,
    },
}

/// A hook that takes a whole text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextHook {
    /// `on-prompt`.
    OnPrompt,
    /// `on-complete`.
    OnComplete,
}

/// Runs a `plugin` subcommand, printing to stdout.
pub fn run_command(cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Check { file, config_file } => check(&file, config_file.as_deref()),
        PluginCommand::Run {
            file,
            hook,
            text,
            config_file,
            grants,
            time_limit_ms,
        } => {
            let mut settings = plugin_settings(&file, config_file.as_deref())?;
            settings.grants = grants;
            let host = single_plugin_host(settings, time_limit_ms)?;
            let chain = host.chain();
            let info = RequestInfo {
                id: 0,
                model: "cli".into(),
                client: "cli".into(),
                streaming: false,
            };
            let output = match hook {
                TextHook::OnPrompt => chain.on_prompt(&text, &info),
                TextHook::OnComplete => chain.on_complete(&text, &info),
            }?;
            println!("{output}");
            Ok(())
        }
        PluginCommand::Bench {
            file,
            tokens,
            requests,
            config_file,
        } => bench(&file, tokens, requests.max(1), config_file.as_deref()),
    }
}

/// Settings for a plugin given on the command line: named after the file,
/// required, with the configuration table read from `config_file`.
fn plugin_settings(file: &Path, config_file: Option<&Path>) -> anyhow::Result<PluginConfig> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let mut settings = PluginConfig::new(if name.is_empty() {
        "plugin".into()
    } else {
        name
    });
    settings.path = Some(file.to_owned());
    settings.required = true;
    if let Some(config_file) = config_file {
        let text = std::fs::read_to_string(config_file)
            .with_context(|| format!("cannot read config file {}", config_file.display()))?;
        settings.config = toml::from_str(&text).with_context(|| {
            format!("config file {} is not a TOML table", config_file.display())
        })?;
    }
    Ok(settings)
}

fn single_plugin_host(settings: PluginConfig, time_limit_ms: u64) -> Result<PluginHost, LoadError> {
    let config = PluginsConfig {
        dir: PathBuf::from("."),
        autoload: false,
        time_limit_ms,
        chain: vec![settings],
        ..PluginsConfig::default()
    };
    PluginHost::new(config).map(|(host, _)| host)
}

fn check(file: &Path, config_file: Option<&Path>) -> anyhow::Result<()> {
    let mut settings = plugin_settings(file, config_file)?;
    let runtime = Runtime::new()?;
    let compiled = compile(&runtime, file, None).map_err(|problem| LoadError::Plugin {
        plugin: settings.name.clone(),
        path: file.to_owned(),
        problem,
    })?;
    // Check the plugin as it would run with the grants it asks for.
    let grants = needed_grants(compiled.imports.iter().map(String::as_str));
    settings.grants = grants.clone();
    let imports = compiled.imports.clone();
    let plugin = LoadedPlugin::link(
        &runtime,
        &settings,
        file,
        compiled,
        PluginsConfig::default().limits(),
    )?;
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    println!("{}: valid mistrald plugin", file.display());
    println!("name: {}", plugin.info.name);
    println!("version: {}", plugin.info.version);
    println!("description: {}", plugin.info.description);
    println!(
        "hooks: {}",
        join(plugin.info.hooks.iter().map(Hook::to_string).collect())
    );
    println!("imports: {}", join(imports));
    println!(
        "grants needed: {}",
        join(grants.iter().map(Grant::to_string).collect())
    );
    Ok(())
}

/// Words the simulated output is made of (one token each).
const WORDS: [&str; 16] = [
    "the",
    "model",
    "answers",
    "with",
    "a",
    "short",
    "and",
    "friendly",
    "sentence",
    "about",
    "edge",
    "boards",
    "running",
    "local",
    "inference",
    "today.",
];

fn bench(
    file: &Path,
    tokens: usize,
    requests: usize,
    config_file: Option<&Path>,
) -> anyhow::Result<()> {
    let settings = plugin_settings(file, config_file)?;
    let started = Instant::now();
    let host = single_plugin_host(settings, 1000)?;
    let load = started.elapsed();
    let chain = host.chain();
    let pieces: Vec<String> = (0..tokens)
        .map(|i| format!(" {}", WORDS[i % WORDS.len()]))
        .collect();
    let output: String = pieces.concat();
    let info = RequestInfo {
        id: 1,
        model: "bench".into(),
        client: "bench".into(),
        streaming: true,
    };

    let mut prompt = Duration::ZERO;
    let mut complete = Duration::ZERO;
    let mut first_chunk = Duration::ZERO;
    let mut chunks = Vec::with_capacity(requests * tokens);
    let mut streamed = 0usize;
    for _ in 0..requests {
        let t = Instant::now();
        chain.on_prompt("Tell me about edge inference.", &info)?;
        prompt += t.elapsed();

        let mut filter = chain.chunk_filter(&info);
        for (i, piece) in pieces.iter().enumerate() {
            let t = Instant::now();
            let out = filter.push(piece)?;
            let elapsed = t.elapsed();
            if i == 0 {
                first_chunk += elapsed;
            } else {
                chunks.push(elapsed);
            }
            streamed += out.text.len();
        }
        streamed += filter.finish()?.len();

        let t = Instant::now();
        chain.on_complete(&output, &info)?;
        complete += t.elapsed();
    }
    chunks.sort();
    let per = |d: Duration| d / requests as u32;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let mean_chunk = chunks.iter().sum::<Duration>() / chunks.len().max(1) as u32;
    let pct = |p: f64| {
        chunks
            .get(((chunks.len() as f64 - 1.0) * p) as usize)
            .copied()
    };
    println!(
        "plugin: {} ({requests} requests of {tokens} tokens, {} output bytes each)",
        file.display(),
        output.len()
    );
    println!(
        "load (compile + validate): {:.1} ms",
        load.as_secs_f64() * 1e3
    );
    println!(
        "on-prompt per request (instantiate + init + call): {:.1} us",
        micros(per(prompt))
    );
    println!(
        "on-complete per request on the {tokens}-token output: {:.1} us",
        micros(per(complete))
    );
    println!(
        "on-chunk first call per request (instantiate + init + call): {:.1} us",
        micros(per(first_chunk))
    );
    println!(
        "on-chunk per later call: mean {:.2} us, median {:.2} us, p99 {:.2} us",
        micros(mean_chunk),
        pct(0.5).map_or(0.0, micros),
        pct(0.99).map_or(0.0, micros)
    );
    let total = per(prompt + complete + first_chunk) + mean_chunk * tokens.saturating_sub(1) as u32;
    println!(
        "total plugin time per {tokens}-token request: {:.2} ms",
        total.as_secs_f64() * 1e3
    );
    anyhow::ensure!(
        streamed == output.len() * requests,
        "plugin {} changed the streamed text; bench needs a pass-through plugin",
        file.display()
    );
    Ok(())
}
