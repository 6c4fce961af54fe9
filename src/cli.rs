//! The `mistrald` command line: offline tools over a GGUF model (generate, tokenize, eval,
//! bench, info) and the synthetic model writer.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{AttentionChoice, Engine, EngineConfig, Logits, MatmulChoice};
use crate::generation::{generate, GenerationParams};
use crate::ggml::GgmlType;
use crate::kv_cache::KvType;
use crate::model::bundled::resolve_model;
use crate::model::offload::{GpuLayers, GpuRequest};
use crate::model::synthetic::{write_synthetic_model, SyntheticSpec};
use crate::model::{LoadOptions, MappedGguf};
use crate::sampler::SamplerConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// mistrald: Mistral-architecture language models on Linux edge boards.
#[derive(Parser, Debug)]
#[command(name = "mistrald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text for a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Run a text through the model; print perplexity, optionally dump every position's logits.
    Eval(EvalArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(BenchArgs),
    /// Describe a model: architecture, shapes, quantization, window, memory.
    Info(InfoArgs),
    /// Write a random-weight Mistral-shaped GGUF model (for tests and benchmarks).
    MakeModel(MakeModelArgs),
    /// Microbenchmark of decode attention (Mistral 7B shapes): every native kernel path
    /// against scalar and against ggml's flash_attn_ext.
    BenchAttention(BenchAttentionArgs),
    /// Microbenchmark of the quantized matrix-vector kernels (Mistral 7B layer shapes): every
    /// native path against ggml's mul_mat (in place and repacked), from memory and cache-warm.
    BenchMatmul(BenchMatmulArgs),
    /// Run the daemon: the HTTP API on a Unix socket (and optionally TCP), continuous
    /// batching, prompt cache, plugins (see README, "The daemon").
    #[cfg(feature = "daemon")]
    Serve(crate::config::ServeFlags),
    /// Print the default configuration file, or check one.
    #[cfg(feature = "daemon")]
    Config(crate::config::ConfigArgs),
    /// Check, try or benchmark a WASM plugin.
    #[cfg(feature = "plugins")]
    Plugin {
        #[command(subcommand)]
        cmd: crate::plugins::command::PluginCommand,
    },
    /// Write the man pages of mistrald and mistralctl, one per command and subcommand, into a
    /// directory (for packaging: scripts/build-deb).
    #[command(hide = true)]
    Man {
        /// Directory to write the pages (mistrald.1, mistrald-serve.1, …, mistralctl.1, …) to.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct BenchAttentionArgs {
    /// History lengths (cached positions).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,4096")]
    history: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Cache types (f16, q8_0).
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0")]
    kv_type: Vec<String>,
    /// Minimum measuring time per configuration, in milliseconds.
    #[arg(long, default_value_t = 300)]
    min_ms: u64,
    /// Separate caches that successive calls cycle through, one per model layer as in a decode
    /// step (32 = Mistral 7B: the data comes from main memory); 1 = the same cache every call
    /// (warm in the CPU's caches when it fits).
    #[arg(long, default_value_t = 32)]
    layers: usize,
}

#[derive(Args, Debug)]
struct BenchMatmulArgs {
    /// Matrix shapes, output rows x columns (Mistral 7B: Wq/Wo, Wk/Wv, gate/up, down).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,1024x4096,14336x4096,4096x14336"
    )]
    shapes: Vec<String>,
    /// Weight types (q4_0, q8_0, q4_k, q6_k).
    #[arg(long, value_delimiter = ',', default_value = "q4_0,q8_0,q4_k,q6_k")]
    types: Vec<String>,
    /// Activation rows per product (1: decode; 2-8: the small batches of continuous batching;
    /// more: prefill chunks).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    rows: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Copies of each matrix that successive products cycle through, as decoding cycles
    /// through layers: 32 = from main memory; 1 = cache-warm when it fits.
    #[arg(long, value_delimiter = ',', default_value = "32,1")]
    copies: Vec<usize>,
    /// Native paths to time (default: every available one but scalar); see
    /// MISTRALD_MATMUL_KERNEL in the README for the names.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Do not time ggml's mul_mat.
    #[arg(long)]
    no_ggml: bool,
    /// Software prefetch distance of the native kernels in bytes (0 = none; default: the
    /// kernels' own).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Minimum measuring time per configuration and implementation, in milliseconds.
    #[arg(long, default_value_t = 300)]
    min_ms: u64,
    /// Slices each implementation's measuring time is split into, in turns with the other
    /// implementations of the configuration (the order rotating), so that their ratio compares
    /// the same stretch of time on a machine whose memory bandwidth moves.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: u64,
}

/// Options shared by every command that runs the model.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// GGUF model file (default: the bundled model, see README).
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long, short)]
    threads: Option<usize>,
    /// Attention window in positions; 0 = full attention (default: the file's value, else full).
    #[arg(long)]
    sliding_window: Option<usize>,
    /// KV cache element type.
    #[arg(long, default_value = "f16")]
    kv_type: KvType,
    /// Context length per sequence (default: the model's, at most 8192).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Most tokens per step (prefill chunk size).
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
    /// Use every weight in place from the memory-mapped file instead of converting the
    /// matrices ggml can repack into its faster interleaved layout at load time.
    #[arg(long)]
    no_repack: bool,
    /// Attention implementation: native (mistrald's kernels) or ggml (flash_attn_ext).
    #[arg(long, default_value = "native")]
    attention: AttentionChoice,
    /// Matrix products: native (mistrald's kernels for Q4_0, Q8_0, Q4_K and Q6_K matrices,
    /// converted into their layout at load time) or ggml (mul_mat for every matrix).
    #[arg(long, default_value = "native")]
    matmul: MatmulChoice,
    /// Transformer blocks to offload to a GPU (vulkan or cuda builds): N (the last N; 0 = CPU
    /// only), all, or auto = as many as fit (default: MISTRALD_GPU_LAYERS, else auto).
    #[arg(long, value_name = "N")]
    gpu_layers: Option<GpuLayers>,
    /// The GPU to offload to, by name (Vulkan0, CUDA0) or description (default:
    /// MISTRALD_DEVICE, else the first GPU).
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
}

impl ModelArgs {
    fn config(&self) -> EngineConfig {
        let mut cfg = EngineConfig {
            kv_type: self.kv_type,
            sliding_window: self.sliding_window,
            ctx_size: self.ctx_size,
            batch_size: self.batch_size,
            attention: self.attention,
            ..EngineConfig::default()
        };
        if let Some(t) = self.threads {
            cfg.n_threads = t;
        }
        cfg
    }

    /// The model file: `--model`, else the bundled model (saying which file on stderr).
    fn path(&self) -> anyhow::Result<PathBuf> {
        resolve_model(self.model.as_deref(), |p| {
            eprintln!(
                "mistrald: no --model given; using the bundled model {}",
                p.display()
            )
        })
    }

    fn load(&self) -> anyhow::Result<(Engine, Tokenizer)> {
        let mut gpu = GpuRequest::from_env()?;
        if let Some(layers) = self.gpu_layers {
            gpu.layers = layers;
        }
        if let Some(device) = &self.device {
            gpu.device = Some(device.clone());
        }
        crate::engine::open(
            &self.path()?,
            LoadOptions {
                repack: !self.no_repack,
                native_matmul: self.matmul.native(),
                gpu,
            },
            self.config(),
        )
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long, short)]
    prompt: String,
    /// Treat the prompt as a user chat message (rendered with the model's chat template).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repetition penalty (1 = off, the default: see README).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop generating at this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    /// GGUF model or vocabulary file (default: the bundled model).
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// Print `{"tokens":[...]}`.
    #[arg(long)]
    json: bool,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    /// Accepted like every other command's; tokenizing does not use it.
    #[arg(long, hide_short_help = true)]
    threads: Option<usize>,
    /// Accepted like every other command's; tokenizing does not use it.
    #[arg(long, hide_short_help = true)]
    sliding_window: Option<usize>,
    /// Accepted like every other command's; tokenizing does not use it.
    #[arg(long, hide_short_help = true)]
    kv_type: Option<KvType>,
    /// The text.
    text: String,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to evaluate.
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, group = "input", value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// File with the text.
    #[arg(long, group = "input")]
    file: Option<PathBuf>,
    /// Write every position's logits (little-endian f32, [n_tokens][n_vocab]) here.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode one at a time after the prompt.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Also sample the memory read bandwidth with the same threads while decoding (before the
    /// first token, then every `--bandwidth-every` tokens and at the end; each sample about half
    /// a second, untimed), and state decode's reads of weights as a fraction of it: decode's
    /// bound, measured at the time of the run. The peak RSS reported is then read before the
    /// buffer is allocated.
    #[arg(long)]
    bandwidth: bool,
    /// MiB that `--bandwidth` reads per pass (at most half the memory available). Default:
    /// 1024, or a quarter of the memory available where that is less. A buffer only a few
    /// times the last-level cache overstates the bandwidth: part of it stays cached between
    /// passes (128 MiB on a 32 MiB L3: 11-16 % faster than fresh memory).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=65536))]
    bandwidth_mib: Option<u64>,
    /// Decoded tokens between two samples of `--bandwidth` (1: a sample around every token, to
    /// pair decode with the memory's speed more closely where it changes within seconds).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    bandwidth_every: u64,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args, Debug)]
struct MakeModelArgs {
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
    /// Shape: tiny (tests), small (~60M parameters, demos), 7b (Mistral 7B's shape).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Weight type: f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or the mixes
    /// q4_k_m and q5_k_m (Q6_K for the output matrix and, in the first and last eighth of the
    /// blocks and every third between, attn_v and ffn_down; as llama.cpp's files).
    #[arg(long = "type", default_value = "q8_0")]
    weight_type: String,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Record this sliding window in the file.
    #[arg(long)]
    sliding_window: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    #[cfg(feature = "daemon")]
    let serving = matches!(cli.command, Command::Serve(_));
    #[cfg(not(feature = "daemon"))]
    let serving = false;
    if !serving {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mistrald: error: {e:#}");
            1
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Info(a) => cmd_info(a),
        Command::MakeModel(a) => cmd_make_model(a),
        Command::BenchAttention(a) => cmd_bench_attention(a),
        Command::BenchMatmul(a) => cmd_bench_matmul(a),
        #[cfg(feature = "daemon")]
        Command::Serve(flags) => crate::service::run(flags),
        #[cfg(feature = "daemon")]
        Command::Config(args) => crate::config::run_config_command(args),
        #[cfg(feature = "plugins")]
        Command::Plugin { cmd } => crate::plugins::command::run_command(cmd),
        Command::Man { out } => {
            for page in write_man_pages(&out)? {
                println!("{}", page.display());
            }
            Ok(())
        }
    }
}

/// Renders the man pages of `mistrald` (and of `mistralctl` when it is built: feature `daemon`)
/// from their clap definitions into `dir`: one page per command and per visible subcommand,
/// named after it (`mistrald.1`, `mistrald-serve.1`, `mistrald-plugin-check.1`,
/// `mistralctl-generate.1`, …). Returns the files written.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let roots = std::iter::once(<Cli as clap::CommandFactory>::command());
    #[cfg(feature = "daemon")]
    let roots = roots.chain(std::iter::once(
        <crate::ctl::Cli as clap::CommandFactory>::command(),
    ));
    let mut written = Vec::new();
    for root in roots {
        // Building sets each subcommand's display name ("mistrald-serve"), which names its page.
        let mut root = root.disable_help_subcommand(true);
        root.build();
        write_man_page_tree(root, dir, &mut written)?;
    }
    Ok(written)
}

fn write_man_page_tree(
    cmd: clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_page_tree(sub.clone(), dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd)
        .manual("mistrald")
        .generate_to(dir)
        .with_context(|| format!("cannot write a man page into {}", dir.display()))?;
    written.push(page);
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let (mut engine, tok) = a.model.load()?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &a.prompt));
        ChatTemplate::for_model(engine.model().gguf(), &tok).encode(&tok, &msgs)?
    } else {
        tok.encode_prompt(&a.prompt)?
    };
    let params = GenerationParams {
        max_tokens: a.max_tokens,
        stop: a.stop,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplerConfig::default()
        },
        logprobs: None,
        ignore_eos: false,
    };
    let mut seq = engine.new_sequence()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stats = generate(&mut engine, &tok, &mut seq, &prompt, &params, |piece| {
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .is_ok()
    })?;
    writeln!(out)?;
    eprintln!(
        "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s; finished: {}]",
        stats.prompt_tokens,
        stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
        stats.generated_tokens,
        stats.generated_tokens as f64 / stats.decode_seconds.max(1e-9),
        stats.finish.as_str()
    );
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> anyhow::Result<()> {
    let path = resolve_model(a.model.as_deref(), |p| {
        eprintln!(
            "mistrald: no --model given; using the bundled model {}",
            p.display()
        )
    })?;
    let file = MappedGguf::open(&path)?;
    let tok = Tokenizer::for_model(&file.info, &path)?;
    let mut ids: Vec<u32> = if a.bos {
        tok.bos().into_iter().collect()
    } else {
        Vec::new()
    };
    ids.extend(tok.encode(&a.text)?);
    if a.json {
        println!("{}", serde_json::json!({ "tokens": ids }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> anyhow::Result<()> {
    let (mut engine, tok) = a.model.load()?;
    let text = match (&a.prompt, &a.file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        _ => None,
    };
    let ids: Vec<u32> = match (text, a.tokens) {
        (Some(t), _) => tok.encode_prompt(&t)?,
        (None, Some(ids)) => ids,
        (None, None) => bail!("give the input with --prompt, --tokens or --file"),
    };
    if ids.is_empty() {
        bail!("the input has no tokens");
    }
    let n_vocab = engine.hparams().n_vocab;
    let mut seq = engine.new_sequence()?;
    let t0 = Instant::now();
    let logits = engine.feed(&mut seq, &ids, Logits::All)?;
    let seconds = t0.elapsed().as_secs_f64();
    let ppl = crate::sampler::perplexity(&logits, &ids, n_vocab);
    if let Some(path) = &a.dump_logits {
        let mut bytes = Vec::with_capacity(logits.len() * 4);
        logits.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "n_tokens": ids.len(), "n_vocab": n_vocab, "perplexity": if ppl.is_finite() { Some(ppl) } else { None }, "seconds": seconds })
        );
    } else {
        println!(
            "tokens: {}\nperplexity: {ppl:.4}\ntime: {seconds:.3} s",
            ids.len()
        );
    }
    Ok(())
}

/// Peak resident memory of this process in bytes.
pub fn peak_rss_bytes() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

fn bench_tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37) % 31000 + 3) as u32).collect()
}

/// One read-bandwidth sample for `mistrald bench --bandwidth`, in GB/s. The engine's ggml
/// workers busy-poll for work for a while after each step; the pause lets them go to sleep
/// first, so that they do not compete with the probe's threads for the cores.
fn bandwidth_sample(probe: &crate::kernels::bandwidth::ReadProbe) -> f64 {
    std::thread::sleep(Duration::from_millis(250));
    probe.measure(Duration::from_millis(200)).median_gbs
}

fn cmd_bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let (mut engine, _tok) = a.model.load()?;
    let n_threads = engine.config().n_threads;
    let mut seq = engine.new_sequence()?;
    let prompt = bench_tokens(a.prompt_tokens);
    let t0 = Instant::now();
    engine.feed(&mut seq, &prompt, Logits::Last)?;
    let prefill = t0.elapsed().as_secs_f64();
    // With --bandwidth, the peak RSS is read before the probe's buffer exists.
    let rss_before_probe = peak_rss_bytes();
    let probe = a
        .bandwidth
        .then(|| {
            let bytes = a
                .bandwidth_mib
                .map_or_else(crate::kernels::bandwidth::default_probe_bytes_here, |mib| {
                    (mib << 20) as usize
                });
            crate::kernels::bandwidth::ReadProbe::new(n_threads, bytes)
        })
        .transpose()?;
    // Bandwidth samples, and the decode time and tokens of each interval between two.
    let mut read_gbs = Vec::new();
    let mut intervals: Vec<(Duration, usize)> = Vec::new();
    let mut cur = 100u32;
    let mut decode = Duration::ZERO;
    for i in 0..a.gen_tokens {
        if let Some(p) = probe
            .as_ref()
            .filter(|_| i % a.bandwidth_every as usize == 0)
        {
            read_gbs.push(bandwidth_sample(p));
            intervals.push((Duration::ZERO, 0));
        }
        let t = Instant::now();
        engine.feed(&mut seq, &[cur], Logits::Last)?;
        let took = t.elapsed();
        decode += took;
        if let Some(last) = intervals.last_mut() {
            last.0 += took;
            last.1 += 1;
        }
        cur = (cur * 7 + 11) % 31000 + 3;
    }
    let rss = match &probe {
        Some(p) => {
            read_gbs.push(bandwidth_sample(p));
            rss_before_probe
        }
        None => peak_rss_bytes(),
    };
    let prefill_tok_s = a.prompt_tokens as f64 / prefill;
    let decode_tok_s = if a.gen_tokens > 0 {
        a.gen_tokens as f64 / decode.as_secs_f64()
    } else {
        0.0
    };
    // Every weight matrix is read once per decoded token; of the token embeddings one row.
    let decode_read_bytes: u64 = engine
        .model()
        .gguf()
        .tensors
        .iter()
        .filter(|t| t.name != "token_embd.weight")
        .map(|t| t.size)
        .sum();
    let decode_read_gbs = decode_tok_s * decode_read_bytes as f64 / 1e9;
    let kv_bytes = seq.cache().bytes();
    // Each interval: (tokens, decode's reads in GB/s, the samples before and after it).
    let interval_rates: Vec<(usize, f64, f64, f64)> = intervals
        .iter()
        .zip(read_gbs.windows(2))
        .filter(|((t, n), _)| *n > 0 && !t.is_zero())
        .map(|((t, n), ends)| {
            let gbs = *n as f64 * decode_read_bytes as f64 / t.as_secs_f64() / 1e9;
            (*n, gbs, ends[0], ends[1])
        })
        .collect();
    let probe_bytes = probe.as_ref().map_or(0, |p| p.bytes());
    // (mean, lowest, highest) of the samples, and the median over the intervals of decode's
    // reads in the interval against the mean of the samples at its ends: the bandwidth moves
    // within seconds on shared machines, so each stretch of decoding is set against what the
    // memory delivered just before and after it.
    let bound = (!read_gbs.is_empty()).then(|| {
        let mean = read_gbs.iter().sum::<f64>() / read_gbs.len() as f64;
        let lo = read_gbs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = read_gbs.iter().copied().fold(0.0, f64::max);
        let mut fractions: Vec<f64> = interval_rates
            .iter()
            .map(|&(_, gbs, before, after)| gbs / ((before + after) / 2.0))
            .collect();
        fractions.sort_by(f64::total_cmp);
        let median = fractions.get(fractions.len() / 2).copied().unwrap_or(0.0);
        (mean, lo, hi, median)
    });
    if a.json {
        let mut out = serde_json::json!({ "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s, "peak_rss_bytes": rss, "kv_cache_bytes": kv_bytes, "threads": n_threads, "decode_read_bytes": decode_read_bytes, "decode_read_gbs": decode_read_gbs });
        if let Some((mean, lo, hi, median)) = bound {
            out["read_gbs"] = mean.into();
            out["read_gbs_min"] = lo.into();
            out["read_gbs_max"] = hi.into();
            out["read_samples"] = read_gbs.len().into();
            out["read_probe_bytes"] = probe_bytes.into();
            out["intervals"] = interval_rates
                .iter()
                .map(|&(tokens, gbs, before, after)| {
                    serde_json::json!({ "tokens": tokens, "decode_read_gbs": gbs, "read_gbs_before": before, "read_gbs_after": after })
                })
                .collect::<Vec<_>>()
                .into();
            out["decode_bound_fraction"] = (decode_read_gbs / mean).into();
            out["decode_bound_fraction_median"] = median.into();
        }
        println!("{out}");
    } else {
        println!(
            "prefill: {} tokens, {prefill_tok_s:.2} tok/s",
            a.prompt_tokens
        );
        println!(
            "decode:  {} tokens, {decode_tok_s:.2} tok/s ({decode_read_gbs:.1} GB/s of weights)",
            a.gen_tokens
        );
        if let Some((mean, lo, hi, median)) = bound {
            println!(
                "memory:  read bandwidth {mean:.1} GB/s ({lo:.1} to {hi:.1} in {} samples of {} MiB, {n_threads} threads); decode at {:.0}% of it (median of the intervals between samples: {:.0}%)",
                read_gbs.len(),
                probe_bytes >> 20,
                100.0 * decode_read_gbs / mean,
                100.0 * median
            );
        }
        println!(
            "peak RSS: {:.1} MiB, KV cache: {:.1} MiB",
            rss as f64 / 1048576.0,
            kv_bytes as f64 / 1048576.0
        );
    }
    Ok(())
}

fn cmd_info(a: InfoArgs) -> anyhow::Result<()> {
    let (engine, tok) = a.model.load()?;
    let hp = engine.hparams();
    let m = engine.model();
    let kv = engine.kv_shape();
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("file:            {}", m.gguf().path.display());
    println!(
        "architecture:    {} ({})",
        hp.arch,
        m.gguf()
            .get("general.name")
            .and_then(|v| v.as_str())
            .unwrap_or("unnamed")
    );
    println!("layers:          {}", hp.n_layer);
    println!("width:           {} (FFN {})", hp.n_embd, hp.n_ff);
    println!(
        "heads:           {} query, {} key/value (head dim {}, group {})",
        hp.n_head,
        hp.n_head_kv,
        hp.head_dim,
        hp.gqa_group()
    );
    println!("vocabulary:      {} tokens", tok.vocab_size());
    println!("rope base:       {}", hp.rope_freq_base);
    println!("trained context: {}", hp.n_ctx_train);
    println!("quantization:    {}", m.main_weight_type());
    println!(
        "window:          {} (file: {})",
        kv.window
            .map_or("full attention".to_string(), |w| w.to_string()),
        hp.sliding_window
            .map_or("none".to_string(), |w| w.to_string())
    );
    println!(
        "KV cache:        {} slots x {} layers, {:?}: {:.1} MiB per sequence",
        kv.n_slots,
        kv.n_layer,
        kv.kv_type,
        mib(kv.total_bytes() as u64)
    );
    println!(
        "weights:         {:.1} MiB memory-mapped, {:.1} MiB of them repacked, {:.1} MiB packed for the native matrix kernels",
        mib(m.weight_bytes()),
        mib(m.repacked_bytes()),
        mib(m.weights().packed.bytes())
    );
    println!(
        "chat template:   {}",
        if ChatTemplate::for_model(engine.model().gguf(), &tok).is_model_template() {
            "from the model"
        } else {
            "Mistral Instruct (built in)"
        }
    );
    println!("attention:       {}", engine.attention().describe());
    println!(
        "matrix products: {}",
        match engine.matmul() {
            Some(m) => format!(
                "native ({}) for the packed matrices, ggml for the rest",
                m.describe()
            ),
            None => "ggml mul_mat".to_string(),
        }
    );
    println!("threads:         {}", engine.config().n_threads);
    let gpus = crate::ggml::Device::gpus();
    if gpus.is_empty() {
        println!(
            "GPUs:            none ({})",
            crate::ggml::device::no_gpu_reason()
        );
    }
    for d in gpus {
        println!("GPU:             {}", d.summary());
    }
    println!(
        "offload:         {}",
        engine
            .gpu_usage()
            .map_or("none, the CPU runs every block".to_string(), |g| g
                .describe(engine.hparams().n_layer))
    );
    Ok(())
}

fn cmd_make_model(a: MakeModelArgs) -> anyhow::Result<()> {
    let name = a.weight_type.to_ascii_lowercase();
    let (base, more_bits_type) = match name.as_str() {
        "q4_k_m" => ("q4_k", Some(GgmlType::Q6K)),
        "q5_k_m" => ("q5_k", Some(GgmlType::Q6K)),
        t => (t, None),
    };
    let ty = GgmlType::parse(base)
        .with_context(|| format!("unknown weight type '{}'", a.weight_type))?;
    let mut spec = match a.preset.as_str() {
        "tiny" => SyntheticSpec::tiny(ty),
        "small" => SyntheticSpec::small(ty),
        "7b" => SyntheticSpec::mistral_7b(ty),
        other => bail!("unknown preset '{other}' (tiny, small, 7b)"),
    };
    if let Some(l) = a.layers {
        spec.n_layer = l;
    }
    if a.sliding_window.is_some() {
        spec.sliding_window = a.sliding_window;
    }
    spec.seed = a.seed;
    spec.more_bits_type = more_bits_type;
    if ty.block_size() > 1
        && (spec.n_embd % ty.block_size() != 0 || spec.n_ff % ty.block_size() != 0)
    {
        bail!(
            "preset '{}' has rows of {} values, not a multiple of the {ty} block size {}",
            a.preset,
            spec.n_embd,
            ty.block_size()
        );
    }
    let t0 = Instant::now();
    write_synthetic_model(Path::new(&a.out), &spec)?;
    eprintln!(
        "wrote {} ({} layers, width {}, {}) in {:.1} s",
        a.out.display(),
        spec.n_layer,
        spec.n_embd,
        a.weight_type,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_bench_attention(a: BenchAttentionArgs) -> anyhow::Result<()> {
    use crate::kernels::bench::{bench_attention, format_table, BenchOptions, CacheLayout};
    use crate::kernels::ggml_bench::ggml_flash_attn_micros;
    use crate::kernels::KvType as KernelKv;
    let kv_types = a
        .kv_type
        .iter()
        .map(|t| match t.as_str() {
            "f16" => Ok(KernelKv::F16),
            "q8_0" => Ok(KernelKv::Q8_0),
            "f32" => Ok(KernelKv::F32),
            other => bail!("unknown cache type '{other}'"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let min_time = std::time::Duration::from_millis(a.min_ms);
    let opts = BenchOptions {
        n_hist: a.history.clone(),
        kv_types: kv_types.clone(),
        threads: a.threads.clone(),
        // The engine's cache is slot-major.
        layouts: vec![CacheLayout::SlotMajor],
        paths: Vec::new(),
        min_time,
        layers: a.layers,
    };
    let rows = bench_attention(&opts)?;
    println!("{}", format_table(&rows));
    println!("| kv type | history | threads | ggml flash_attn_ext µs | best native path | native µs | native vs ggml |");
    println!("|---|---:|---:|---:|---|---:|---:|");
    for &kv in &kv_types {
        for &h in &a.history {
            for &t in &a.threads {
                let ggml = ggml_flash_attn_micros(h, kv, t, min_time, a.layers)?;
                let best = rows
                    .iter()
                    .filter(|r| r.kv_type == kv && r.n_hist == h && r.threads == t)
                    .min_by(|x, y| x.micros.total_cmp(&y.micros));
                if let Some(b) = best {
                    println!(
                        "| {} | {h} | {t} | {ggml:.1} | {} | {:.1} | {:.2}× |",
                        kv.name(),
                        b.path.name(),
                        b.micros,
                        ggml / b.micros
                    );
                }
            }
        }
    }
    println!(
        "\nkernel path selected for inference: {}",
        crate::kernels::selected_path()?.description()
    );
    Ok(())
}

fn cmd_bench_matmul(a: BenchMatmulArgs) -> anyhow::Result<()> {
    use crate::kernels::matmul::{self, MatmulPath, WeightType};
    use crate::kernels::matmul_bench::{bench_matmul, format_table, MatmulBenchOptions};
    let shapes = a
        .shapes
        .iter()
        .map(|s| {
            let (n, k) = s
                .split_once(['x', 'X', '×'])
                .ok_or_else(|| anyhow::anyhow!("shape '{s}' is not ROWSxCOLUMNS"))?;
            Ok((n.trim().parse()?, k.trim().parse()?))
        })
        .collect::<anyhow::Result<Vec<(usize, usize)>>>()?;
    let types = a
        .types
        .iter()
        .map(|t| {
            GgmlType::parse(t)
                .and_then(WeightType::from_ggml)
                .ok_or_else(|| {
                    anyhow::anyhow!("unknown weight type '{t}' (q4_0, q8_0, q4_k, q6_k)")
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let paths = a
        .paths
        .iter()
        .map(|p| MatmulPath::from_name(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bytes) = a.prefetch {
        matmul::set_prefetch_distance(bytes);
    }
    let opts = MatmulBenchOptions {
        shapes,
        types,
        rows: a.rows,
        threads: a.threads,
        copies: a.copies,
        paths,
        ggml: !a.no_ggml,
        min_time: std::time::Duration::from_millis(a.min_ms),
        rounds: a.rounds as usize,
    };
    let selected = crate::kernels::matmul::Matmul::selected()?;
    // The CPU's one-row tile width (MISTRALD_MATMUL_ONE_ROW where set) for every path measured.
    matmul::choose_one_row_width(None)?;
    let rows = bench_matmul(&opts)?;
    println!("{}", format_table(&rows));
    println!(
        "native prefetch distance {} bytes; matrix path selected for inference: {}",
        matmul::prefetch_distance(),
        selected.describe()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every visible command and subcommand of `cmd`, as page names ("mistrald-plugin-check").
    fn page_names(cmd: &clap::Command, prefix: &str, out: &mut Vec<(String, Vec<String>)>) {
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .collect();
        out.push((
            prefix.to_string(),
            subs.iter().map(|s| s.get_name().to_string()).collect(),
        ));
        for sub in subs {
            page_names(sub, &format!("{prefix}-{}", sub.get_name()), out);
        }
    }

    #[test]
    fn man_pages_render_for_every_command_and_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(dir.path()).unwrap();
        let mut expected = Vec::new();
        page_names(&Cli::command(), "mistrald", &mut expected);
        #[cfg(feature = "daemon")]
        page_names(&crate::ctl::Cli::command(), "mistralctl", &mut expected);
        let names: Vec<String> = expected.iter().map(|(n, _)| format!("{n}.1")).collect();
        assert!(
            names.contains(&"mistrald-generate.1".to_string()),
            "{names:?}"
        );
        #[cfg(feature = "daemon")]
        for must in [
            "mistrald-serve.1",
            "mistrald-config.1",
            "mistralctl.1",
            "mistralctl-status.1",
        ] {
            assert!(
                names.contains(&must.to_string()),
                "{must} missing from {names:?}"
            );
        }
        assert!(!names
            .iter()
            .any(|n| n == "mistrald-man.1" || n.ends_with("-help.1")));
        let mut got: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let mut want = names.clone();
        want.sort();
        assert_eq!(got, want);
        for (name, subs) in &expected {
            let page = std::fs::read_to_string(dir.path().join(format!("{name}.1"))).unwrap();
            assert!(
                page.lines().any(|l| l.starts_with(".TH ")),
                "{name}.1 has no title line"
            );
            assert!(
                page.contains(".SH NAME") && page.contains(".SH SYNOPSIS"),
                "{name}.1"
            );
            // A command's page names each of its subcommands (as `mistrald-serve(1)`-style
            // entries in SUBCOMMANDS); the hidden `man` command is not among them.
            for sub in subs {
                let entry = format!("{name}-{sub}(1)").replace('-', "\\-");
                assert!(
                    page.contains(&entry),
                    "{name}.1 does not name its subcommand {sub}"
                );
            }
            assert!(
                !page.contains("\\-man("),
                "{name}.1 names the hidden man command"
            );
        }
    }
}
