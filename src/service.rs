//! `mistrald serve`: the daemon's wiring.
//!
//! 1. Configuration: the TOML file and the flags, checked completely before anything is bound.
//! 2. Logging (plain lines; syslog priority prefixes when stderr goes to the journal).
//! 3. The plugin host (a `required` plugin that cannot load stops the start).
//! 4. The Unix socket (and the optional TCP listener) start serving at once: `/health` says
//!    503 while the model loads on the engine thread, 200 once the scheduler runs. Sockets
//!    passed by the service manager (socket activation, [`crate::systemd`]) are used instead
//!    of binding our own. With `server.dbus`, the D-Bus interface connects to its bus at once
//!    too (calls get `NotReady` while loading) and requests its well-known name once the model
//!    is loaded.
//! 5. The service manager hears `STATUS=` lines while the model loads (with the repack's
//!    progress, and `EXTEND_TIMEOUT_USEC` while it advances), `READY=1` once the model is
//!    loaded and every interface listens, a serving status every few seconds when it changed,
//!    and `WATCHDOG=1` from the engine loop itself when `WATCHDOG_USEC` is set.
//! 6. Signals: SIGHUP reloads limits and plugins from the configuration file
//!    (`RELOADING=1` … `READY=1`; an invalid file is logged and the old settings stay);
//!    SIGTERM/SIGINT (`STOPPING=1`) stop accepting, let requests in flight finish for
//!    `shutdown_grace` seconds, end the rest (streams get a final error event, D-Bus requests
//!    a last `Done` signal), release the D-Bus name, remove the socket (unless it was
//!    inherited) and exit 0.

use crate::api::dbus::DbusServer;
use crate::api::{http, socket, ReadyParts, Service, ServiceLimits};
use crate::chat::ChatTemplate;
use crate::config::{DbusBus, ServeConfig, ServeFlags};
use crate::engine::prompt_cache::PromptCacheConfig;
use crate::engine::scheduler::{self, SchedulerConfig, SchedulerHandle};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::bundled::resolve_model;
use crate::model::{MappedGguf, Model};
use crate::plugins::PluginHost;
use crate::systemd::{take_inherited_sockets, InheritedSockets, ServiceManager};
use crate::tokenizer::Tokenizer;
use anyhow::Context as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Runs the daemon until SIGTERM or SIGINT; `Ok` after a clean shutdown.
pub fn run(flags: ServeFlags) -> anyhow::Result<()> {
    // SAFETY: nothing has started a thread yet (this edits the environment).
    let inherited = unsafe { take_inherited_sockets() }?;
    let manager = Arc::new(ServiceManager::from_env());
    let (config, file) = ServeConfig::from_flags(&flags)?;
    let gid = config.socket_gid()?;
    init_logging(config.server.log_level.filter());
    match &file {
        Some(f) => log::info!("configuration: {}", f.display()),
        None => log::info!("configuration: defaults (no configuration file)"),
    }
    let model_path = resolve_model(config.model.path.as_deref(), |p| {
        log::info!(
            "no model configured; using the bundled model {}",
            p.display()
        )
    })?;
    std::fs::metadata(&model_path)
        .with_context(|| format!("cannot read the model file {}", model_path.display()))?;
    let (host, report) =
        PluginHost::new(config.plugins.clone()).map_err(|e| anyhow::anyhow!("plugins: {e}"))?;
    log_plugins(&host, &report);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mistrald-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(Startup {
        config,
        flags,
        model_path,
        plugins: Arc::new(host),
        gid,
        inherited,
        manager,
    }))
}

/// What `serve` starts from.
struct Startup {
    config: ServeConfig,
    flags: ServeFlags,
    model_path: PathBuf,
    plugins: Arc<PluginHost>,
    gid: Option<u32>,
    /// Sockets passed by the service manager (socket activation).
    inherited: InheritedSockets,
    manager: Arc<ServiceManager>,
}

/// The limits of the configuration.
pub fn limits_of(config: &ServeConfig) -> ServiceLimits {
    ServiceLimits {
        max_body_bytes: usize::try_from(config.server.max_body_bytes).unwrap_or(usize::MAX),
        default_max_tokens: config.limits.default_max_tokens,
        max_tokens_limit: config.limits.max_tokens,
        max_stop_strings: config.limits.max_stop_strings,
    }
}

async fn serve(startup: Startup) -> anyhow::Result<()> {
    let Startup {
        config,
        flags,
        model_path,
        plugins,
        gid,
        inherited,
        manager,
    } = startup;
    let metrics = Arc::new(Metrics::new());
    let service = Service::new(
        &model_path,
        Some(plugins.clone()),
        limits_of(&config),
        metrics.clone(),
    );
    // Signals first, so a SIGTERM while loading is handled too.
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    // The HTTP API's sockets: those the service manager passed (socket activation), else our
    // own. An inherited socket belongs to the service manager: it is not removed at exit.
    let mut unix_listeners = Vec::new();
    let mut guard = None;
    if inherited.unix.is_empty() {
        let socket_path = config.socket_path();
        let (listener, g) = socket::bind_unix_socket(&socket_path, config.socket_mode(), gid)?;
        log::info!(
            "listening on {} (mode {:o})",
            socket_path.display(),
            config.socket_mode()
        );
        unix_listeners.push(listener);
        guard = Some(g);
    } else {
        if let Some(own) = &config.server.socket {
            log::warn!(
                "server.socket ({}) is not used: the service manager passed the socket",
                own.display()
            );
        }
        for (listener, path) in inherited.unix {
            listener
                .set_nonblocking(true)
                .context("cannot use the inherited socket")?;
            unix_listeners.push(tokio::net::UnixListener::from_std(listener)?);
            log::info!(
                "listening on {} (passed by the service manager)",
                path.display()
            );
        }
    }
    let mut tcp_listeners = Vec::new();
    if inherited.tcp.is_empty() {
        if let Some(addr) = config.server.listen {
            tcp_listeners.push(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?,
            );
        }
    } else {
        if let Some(addr) = config.server.listen {
            log::warn!(
                "server.listen ({addr}) is not used: the service manager passed TCP sockets"
            );
        }
        for listener in inherited.tcp {
            listener
                .set_nonblocking(true)
                .context("cannot use the inherited TCP socket")?;
            tcp_listeners.push(tokio::net::TcpListener::from_std(listener)?);
        }
    }
    // The D-Bus front end connects now (a bus it cannot reach stops the start); it requests its
    // name once the model is loaded.
    let dbus = match config.server.dbus {
        DbusBus::None => None,
        bus => Some(DbusServer::start(bus, service.clone()).await?),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = Vec::new();
    for listener in unix_listeners {
        servers.push(tokio::spawn(http::serve_unix(
            listener,
            service.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    for tcp in tcp_listeners {
        log::info!("listening on http://{}", tcp.local_addr()?);
        servers.push(tokio::spawn(http::serve_tcp(
            tcp,
            service.clone(),
            stopped(stop_rx.clone()),
        )));
    }

    let progress = Arc::new(LoadProgress::default());
    let loading = tokio::task::spawn_blocking({
        let config = config.clone();
        let metrics = metrics.clone();
        let model_path = model_path.clone();
        let progress = progress.clone();
        move || load(&config, &model_path, metrics, &progress)
    });
    tokio::pin!(loading);
    let model_name = model_path.file_name().map_or_else(
        || model_path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    manager.status(&format!("Loading model {model_name}"));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_done = 0;
    let mut last_status = String::new();
    let mut loaded = false;
    let mut file_config = config;
    let exit: anyhow::Result<()> = loop {
        tokio::select! {
            result = &mut loading, if !loaded => {
                loaded = true;
                match result {
                    Ok(Ok(parts)) => {
                        service.set_ready(parts);
                        if let Some(dbus) = &dbus {
                            if let Err(e) = dbus.claim_name().await {
                                break Err(e);
                            }
                        }
                        if let (Some(scheduler), Some(pinger)) =
                            (service.scheduler(), manager.watchdog_pinger())
                        {
                            scheduler.on_heartbeat(move || pinger.beat());
                            log::info!(
                                "watchdog: {:.0} s, fed by the engine loop",
                                manager.watchdog_interval().unwrap_or_default().as_secs_f64()
                            );
                        }
                        last_status = serving_status(&service);
                        manager.ready(&last_status);
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(anyhow::anyhow!("model loading panicked: {e}")),
                }
            }
            // Only a service manager reads the status line.
            _ = status_tick.tick(), if manager.enabled() => {
                if !loaded {
                    // While weights are converted, ask for more start time as long as it
                    // advances (a 7B model read from an SD card takes minutes).
                    let (done, total) = progress.get();
                    let line = match total {
                        0 => format!("Loading model {model_name}"),
                        _ => format!(
                            "Loading model {model_name}: {}% of {:.0} MiB",
                            done * 100 / total,
                            total as f64 / 1048576.0
                        ),
                    };
                    if done > last_done {
                        manager.extend_start_timeout(Duration::from_secs(30), &line);
                        last_done = done;
                    } else {
                        manager.status(&line);
                    }
                } else {
                    let line = serving_status(&service);
                    if line != last_status {
                        manager.status(&line);
                        last_status = line;
                    }
                }
            }
            _ = hup.recv() => {
                manager.reloading();
                if let Some(new) = reload(&service, &plugins, &flags) {
                    file_config = new;
                }
                last_status = if loaded {
                    serving_status(&service)
                } else {
                    format!("Loading model {model_name}")
                };
                manager.ready(&last_status);
            }
            _ = term.recv() => { log::info!("SIGTERM: shutting down"); break Ok(()); }
            _ = int.recv() => { log::info!("SIGINT: shutting down"); break Ok(()); }
        }
    };
    match &exit {
        Ok(()) => manager.stopping("Stopping: finishing the requests in flight"),
        Err(e) => manager.stopping(&format!("Failed: {e:#}")),
    }

    // Stop accepting; let requests in flight finish within the grace period.
    service.begin_shutdown();
    let _ = stop_tx.send(true);
    if let Some(dbus) = &dbus {
        dbus.begin_shutdown().await;
    }
    if let Some(scheduler) = service.scheduler() {
        let grace = file_config.shutdown_grace();
        let deadline = Instant::now() + grace;
        let idle = |s: &SchedulerHandle| {
            let st = s.stats();
            st.active == 0 && st.queued == 0
        };
        while !idle(&scheduler) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !idle(&scheduler) {
            log::warn!(
                "ending the requests still running after the {} s grace period",
                grace.as_secs_f64()
            );
        }
        scheduler.abort_all("the server is shutting down");
        let join = scheduler.clone();
        let _ = tokio::task::spawn_blocking(move || join.join()).await;
    }
    for s in servers {
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log::warn!("a listener ended with an error: {e}"),
            Ok(Err(e)) => log::warn!("a listener task failed: {e}"),
            Err(_) => log::warn!("connections still open after shutdown; closing them"),
        }
    }
    if let Some(dbus) = dbus {
        dbus.finish(Duration::from_secs(5)).await;
    }
    drop(guard);
    match &exit {
        Ok(()) => log::info!("stopped"),
        Err(e) => log::error!("{e:#}"),
    }
    exit
}

/// Bytes of weights placed so far and in all, while the model loads.
#[derive(Default)]
struct LoadProgress {
    done: AtomicU64,
    total: AtomicU64,
}

impl LoadProgress {
    fn set(&self, done: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// The status line while serving: what `systemctl status mistrald` shows.
fn serving_status(service: &Service) -> String {
    match service.scheduler() {
        Some(s) => {
            let st = s.stats();
            format!(
                "Serving: {} active, {} queued, {:.1} tokens/s, {} requests done",
                st.active, st.queued, st.tokens_per_second, st.finished
            )
        }
        None => "Serving".to_string(),
    }
}

/// Loads the model on the engine thread and starts the scheduler.
fn load(
    config: &ServeConfig,
    model_path: &Path,
    metrics: Arc<Metrics>,
    progress: &Arc<LoadProgress>,
) -> anyhow::Result<ReadyParts> {
    let t0 = Instant::now();
    let file = MappedGguf::open(model_path)?;
    let tokenizer = Arc::new(Tokenizer::for_model(&file.info, model_path)?);
    let template = ChatTemplate::for_model(&file.info, &tokenizer);
    let engine_cfg = config.engine_config();
    let mut load_options = config.load_options();
    // GPU memory for the KV caches of the sequences that run at once.
    crate::engine::reserve_kv_memory(
        &mut load_options,
        &file,
        &engine_cfg,
        config.server.parallel,
    )?;
    let n_vocab = tokenizer.vocab_size();
    drop(file);
    let path = model_path.to_path_buf();
    let progress = progress.clone();
    let sched_cfg = SchedulerConfig {
        parallel: config.server.parallel,
        queue_capacity: config.server.queue_size,
        step_tokens: config.model.batch_size,
        max_context: usize::MAX,
        prompt_cache: PromptCacheConfig {
            max_entries: config.prompt_cache.entries,
            max_bytes: usize::try_from(config.prompt_cache.max_mib << 20).unwrap_or(usize::MAX),
        },
    };
    let (scheduler, info) = scheduler::start(
        move || {
            let model =
                Model::load_reporting(MappedGguf::open(&path)?, load_options, &mut |d, t| {
                    progress.set(d, t)
                })?;
            anyhow::ensure!(
                model.hparams.n_vocab == n_vocab,
                "{}: the tokenizer has {n_vocab} tokens but the embedding matrix has {} rows",
                path.display(),
                model.hparams.n_vocab
            );
            Engine::new(model, engine_cfg)
        },
        tokenizer.clone(),
        sched_cfg.clone(),
        metrics,
    )?;
    let mib = |b: usize| b as f64 / 1048576.0;
    let per_seq = info.kv_bytes_per_sequence;
    let cache_bytes =
        (sched_cfg.prompt_cache.max_entries * per_seq).min(sched_cfg.prompt_cache.max_bytes);
    log::info!(
        "model {} loaded in {:.2} s: window {}, context {} per request, {} threads, attention {}, matrix products {}",
        model_path.display(),
        t0.elapsed().as_secs_f64(),
        info.window
            .map_or("none (full attention)".to_string(), |w| w.to_string()),
        info.max_context,
        info.n_threads,
        info.attention,
        info.matmul
    );
    let gpus = crate::ggml::Device::gpus();
    if !gpus.is_empty() {
        let list: Vec<String> = gpus.iter().map(|d| d.summary()).collect();
        log::info!("GPUs: {}", list.join("; "));
    }
    log::info!(
        "offload: {}",
        info.offload
            .as_deref()
            .unwrap_or("none, the CPU runs every block")
    );
    log::info!(
        "KV cache: {:.1} MiB per sequence ({}), {} sequences at once + prompt cache of {} entries: at most {:.1} MiB in all",
        mib(per_seq),
        config.model.kv_type.name(),
        sched_cfg.parallel,
        sched_cfg.prompt_cache.max_entries,
        mib(sched_cfg.parallel * per_seq + cache_bytes)
    );
    log::info!(
        "ready: {} parallel, queue of {}, step budget {} tokens",
        sched_cfg.parallel,
        sched_cfg.queue_capacity,
        sched_cfg.step_tokens
    );
    Ok(ReadyParts {
        scheduler,
        tokenizer,
        template,
        window: info.window,
        context: info.max_context,
        kv_type: config.model.kv_type.name().to_string(),
    })
}

/// SIGHUP: reads the configuration again and applies its limits and plugins. Settings that
/// need a restart (model, sockets, threads, parallel…) are reported when they changed.
fn reload(service: &Service, plugins: &PluginHost, flags: &ServeFlags) -> Option<ServeConfig> {
    log::info!("SIGHUP: reloading the configuration");
    let config = match ServeConfig::from_flags(flags) {
        Ok((c, _)) => c,
        Err(e) => {
            log::error!("reload refused, keeping the running configuration: {e}");
            return None;
        }
    };
    match plugins.reload_with(config.plugins.clone()) {
        Ok(report) => log_plugins(plugins, &report),
        Err(e) => {
            log::error!("plugin reload failed, keeping the running plugins: {e}");
            return None;
        }
    }
    service.set_limits(limits_of(&config));
    log::info!("reloaded: limits and plugins");
    Some(config)
}

fn log_plugins(host: &PluginHost, report: &crate::plugins::LoadReport) {
    let chain = host.chain();
    let names: Vec<String> = chain
        .plugins()
        .into_iter()
        .map(|(name, info)| format!("{name} {}", info.version))
        .collect();
    if names.is_empty() {
        log::info!("plugins: none");
    } else {
        log::info!("plugins: {}", names.join(", "));
    }
    for skipped in &report.skipped {
        log::warn!("plugin left out: {skipped}");
    }
}

/// Logging for a service: `RUST_LOG` when set, else `level`. Plain lines; under systemd
/// (`JOURNAL_STREAM` set) each line starts with its syslog priority (`<3>` … `<7>`) so the
/// journal records levels, and without timestamps (the journal adds its own).
pub fn init_logging(level: log::LevelFilter) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.format(move |buf, record| {
        if journal {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}", record.args())
        } else {
            writeln!(
                buf,
                "{} {:5} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        }
    });
    let _ = builder.try_init();
}
