//! The engine: runs the model over batches of tokens drawn from several sequences.
//!
//! [`Engine::step`] takes, for each sequence in the batch, the next tokens to process (one for
//! decoding, a chunk of a prompt for prefill) and computes them in one graph, so all sequences
//! share one read of the weights. [`Engine::feed`] splits a long input of one sequence into
//! chunks no larger than the batch size or the cache ring.

pub mod prompt_cache;
#[cfg(feature = "daemon")]
pub mod scheduler;

use crate::ggml::{Context, CpuBackend, Device, GpuBackend, Graph, GraphAllocator, Scheduler};
use crate::kernels::matmul::Matmul;
use crate::kernels::Kernel;
use crate::kv_cache::{AttnPlan, KvCache, KvPlacement, KvShape, KvType};
use crate::model::mistral::{
    self, build_step, fill_attention_inputs, AttentionImpl, SeqInput, StepCompute,
};
use crate::model::{HParams, LoadOptions, MappedGguf, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context as _};
use std::path::Path;

/// Runtime settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Compute threads.
    pub n_threads: usize,
    /// KV cache element type.
    pub kv_type: KvType,
    /// Sliding window override: `None` uses the file's value (full attention if absent),
    /// `Some(0)` forces full attention, `Some(w)` a window of `w` positions.
    pub sliding_window: Option<usize>,
    /// Context length per sequence (`None`: the model's, capped at [`DEFAULT_MAX_CTX`]).
    pub ctx_size: Option<usize>,
    /// Most tokens one step processes (prefill chunk size).
    pub batch_size: usize,
    /// Which attention implementation to use.
    pub attention: AttentionChoice,
}

/// The attention implementation asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionChoice {
    /// The native kernel (path chosen from the CPU, or `MISTRALD_KERNEL`); falls back to ggml
    /// for head sizes the kernel does not support.
    Native,
    /// ggml's flash attention over the ring with a mask.
    Ggml,
}

impl std::str::FromStr for AttentionChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(AttentionChoice::Native),
            "ggml" => Ok(AttentionChoice::Ggml),
            _ => Err(format!(
                "unknown attention implementation '{s}' (expected native or ggml)"
            )),
        }
    }
}

/// How the weight matrices are multiplied (chosen at load time: it decides their layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulChoice {
    /// mistrald's matrix kernels for Q4_0, Q8_0, Q4_K and Q6_K matrices (packed at load; path
    /// from the CPU, `MISTRALD_KERNEL` or `MISTRALD_MATMUL_KERNEL`); ggml's for other types.
    Native,
    /// ggml's `mul_mat` for every matrix (repacked or in place, as `repack` says).
    Ggml,
}

impl MatmulChoice {
    /// The load options' `native_matmul` for this choice.
    pub fn native(self) -> bool {
        self == MatmulChoice::Native
    }

    /// The name (`native`, `ggml`).
    pub fn name(self) -> &'static str {
        match self {
            MatmulChoice::Native => "native",
            MatmulChoice::Ggml => "ggml",
        }
    }
}

impl std::str::FromStr for MatmulChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(MatmulChoice::Native),
            "ggml" => Ok(MatmulChoice::Ggml),
            _ => Err(format!(
                "unknown matrix-product implementation '{s}' (expected native or ggml)"
            )),
        }
    }
}

/// Default cap on the context length when none is configured.
pub const DEFAULT_MAX_CTX: usize = 8192;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            n_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kv_type: KvType::F16,
            sliding_window: None,
            ctx_size: None,
            batch_size: 512,
            attention: AttentionChoice::Native,
        }
    }
}

/// Which logits a batch item wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (e.g. prefill chunks before the last).
    None,
    /// Only the last token's.
    Last,
    /// Every token's.
    All,
}

/// One sequence's part of a step.
pub struct BatchItem<'a> {
    /// The sequence.
    pub seq: &'a mut Sequence,
    /// Its next tokens (at most [`Engine::max_step`]).
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: Logits,
}

/// A sequence being processed: its KV cache.
pub struct Sequence {
    cache: KvCache,
}

impl Sequence {
    /// The sequence's cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Positions processed so far.
    pub fn n_past(&self) -> u64 {
        self.cache.n_past()
    }

    /// Forgets the sequence so the cache can be reused for another.
    pub fn reset(&mut self) {
        self.cache.reset();
    }

    /// Whether the sequence can be cut back to its first `n` positions (see
    /// [`KvCache::can_truncate`]).
    pub fn can_truncate(&self, n: u64) -> bool {
        self.cache.can_truncate(n)
    }

    /// Cuts the sequence back to its first `n` positions, to continue differently from there.
    pub fn truncate(&mut self, n: u64) -> anyhow::Result<()> {
        Ok(self.cache.truncate(n)?)
    }
}

/// Opens the GGUF model at `path`: maps it, builds its tokenizer, loads the weights with
/// `load` (keeping GPU memory for at least one sequence's KV cache when offloading) and
/// prepares an engine with `cfg`.
pub fn open(
    path: &Path,
    mut load: LoadOptions,
    cfg: EngineConfig,
) -> anyhow::Result<(Engine, Tokenizer)> {
    let file = MappedGguf::open(path)?;
    let tok = Tokenizer::for_model(&file.info, path)?;
    reserve_kv_memory(&mut load, &file, &cfg, 1)?;
    let model = Model::load_with(file, load)?;
    if tok.vocab_size() != model.hparams.n_vocab {
        bail!(
            "{}: the tokenizer has {} tokens but the embedding matrix has {} rows",
            path.display(),
            tok.vocab_size(),
            model.hparams.n_vocab
        );
    }
    Ok((Engine::new(model, cfg)?, tok))
}

/// Makes `load`'s GPU request keep room for the KV caches of `n_seqs` sequences of `cfg`'s
/// shape in each offloaded block (so `auto` offloads only what fits with them).
pub fn reserve_kv_memory(
    load: &mut LoadOptions,
    file: &MappedGguf,
    cfg: &EngineConfig,
    n_seqs: usize,
) -> anyhow::Result<()> {
    let hp = HParams::from_gguf(&file.info)?;
    if hp.n_layer == 0 {
        return Ok(());
    }
    let shape = kv_shape(&hp, cfg, true)?;
    let per_layer = (shape.total_bytes() / hp.n_layer) as u64 * n_seqs.max(1) as u64;
    load.gpu.kv_bytes_per_layer = load.gpu.kv_bytes_per_layer.max(per_layer);
    Ok(())
}

/// The shape of every sequence's KV cache for a model `hp` run with `cfg`: the context length,
/// the window (the file's unless overridden) and the ring of `min(window, n_ctx)` slots — or,
/// when blocks are `offloaded` to a GPU, `min(window + batch_size - 1, n_ctx)` slots, so that
/// a prefill chunk can store its rows before attending without overwriting history its first
/// queries still see: ggml's GPU backends then run every step in the ring (the CPU path reads
/// such history in place, or gathers it first).
pub fn kv_shape(hp: &HParams, cfg: &EngineConfig, offloaded: bool) -> anyhow::Result<KvShape> {
    let n_ctx = context_length(hp, cfg);
    if n_ctx == 0 {
        bail!("context size must be at least 1");
    }
    let window = match cfg.sliding_window {
        Some(0) => None,
        Some(w) => Some(w),
        None => hp.sliding_window,
    };
    let n_slots = match window {
        Some(w) if offloaded => (w + cfg.batch_size.max(1) - 1).min(n_ctx),
        Some(w) => w.min(n_ctx),
        None => n_ctx,
    };
    if cfg.kv_type.ggml().row_bytes(hp.head_dim as u64).is_none() {
        bail!(
            "KV cache type {:?} needs a head dimension that is a multiple of 32 (model has {})",
            cfg.kv_type,
            hp.head_dim
        );
    }
    Ok(KvShape {
        n_layer: hp.n_layer,
        head_dim: hp.head_dim,
        n_head_kv: hp.n_head_kv,
        n_slots,
        window,
        kv_type: cfg.kv_type,
    })
}

/// The context length per sequence: the configured one, else the model's capped at
/// [`DEFAULT_MAX_CTX`].
fn context_length(hp: &HParams, cfg: &EngineConfig) -> usize {
    cfg.ctx_size.unwrap_or(hp.n_ctx_train.min(DEFAULT_MAX_CTX))
}

/// Where step graphs run.
enum Executor {
    /// On the CPU backend, intermediate tensors placed by the graph allocator.
    Cpu {
        backend: CpuBackend,
        allocator: GraphAllocator,
    },
    /// Across a GPU and the CPU through ggml's backend scheduler (some blocks offloaded).
    /// Fields drop in order: the scheduler (and its compute buffers) before its backends.
    Offload {
        sched: Scheduler,
        gpu: GpuBackend,
        cpu: CpuBackend,
    },
}

impl Executor {
    fn n_threads(&self) -> usize {
        match self {
            Executor::Cpu { backend, .. } => backend.n_threads(),
            Executor::Offload { cpu, .. } => cpu.n_threads(),
        }
    }

    /// Allocates `graph` (of at most `capacity` tensors) for computing.
    fn alloc(&mut self, graph: &Graph<'_>, capacity: usize) -> anyhow::Result<()> {
        match self {
            Executor::Cpu { allocator, .. } => allocator.alloc(graph),
            Executor::Offload { gpu, cpu, sched } => {
                if sched.capacity() < capacity {
                    *sched = Scheduler::new(gpu, cpu, capacity)?;
                }
                sched.alloc(graph)
            }
        }
    }

    fn compute(&mut self, graph: &Graph<'_>) -> anyhow::Result<()> {
        match self {
            Executor::Cpu { backend, .. } => backend.compute(graph),
            Executor::Offload { sched, .. } => sched.compute(graph),
        }
    }
}

/// What an engine keeps on its GPU.
#[derive(Clone, Debug)]
pub struct GpuUsage {
    /// The device.
    pub device: Device,
    /// Blocks it computes (the last ones), of the model's total.
    pub layers: usize,
    /// Whether it computes the output head too.
    pub output: bool,
    /// Bytes of weights in its memory.
    pub weight_bytes: u64,
    /// Bytes of one sequence's KV cache in its memory.
    pub kv_bytes_per_sequence: u64,
    /// Bytes of compute buffer on the device so far (grows to the largest step seen).
    pub compute_bytes: u64,
}

impl GpuUsage {
    /// In words: `32 of 32 blocks and the output head on Vulkan0 (llvmpipe …): 3.2 MiB of
    /// weights, 2.0 MiB of KV cache per sequence, 1.5 MiB of compute buffer`.
    pub fn describe(&self, n_layer: usize) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        format!(
            "{} of {n_layer} blocks{} on {} ({}): {:.1} MiB of weights, {:.1} MiB of KV cache per sequence, {:.1} MiB of compute buffer",
            self.layers,
            if self.output { " and the output head" } else { "" },
            self.device.name(),
            self.device.description(),
            mib(self.weight_bytes),
            mib(self.kv_bytes_per_sequence),
            mib(self.compute_bytes)
        )
    }
}

/// The model, the backend(s) its graphs run on, and the graph allocation.
pub struct Engine {
    // Dropped before the model, whose weights its last graph read.
    exec: Executor,
    model: Model,
    kv_placement: KvPlacement,
    cfg: EngineConfig,
    n_ctx: usize,
    kv_shape: KvShape,
    attention: AttentionImpl,
    matmul: Option<Matmul>,
}

impl Engine {
    /// Prepares `model` for inference with `cfg`.
    pub fn new(model: Model, cfg: EngineConfig) -> anyhow::Result<Engine> {
        let hp = &model.hparams;
        if cfg.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let kv_shape = kv_shape(hp, &cfg, model.gpu().is_some())?;
        let n_ctx = context_length(hp, &cfg);
        let attention = match cfg.attention {
            AttentionChoice::Native if AttentionImpl::native_supports(hp, &kv_shape) => {
                AttentionImpl::Native(Kernel::selected()?)
            }
            AttentionChoice::Native => {
                log::warn!(
                    "the native attention kernel does not support this model's heads (dimension {}); using ggml's",
                    hp.head_dim
                );
                AttentionImpl::Ggml
            }
            AttentionChoice::Ggml => AttentionImpl::Ggml,
        };
        // Matrices loaded for the native matrix kernels are multiplied by them.
        let matmul = if model.weights().packed.is_empty() {
            None
        } else {
            let m = Matmul::selected()?;
            // One-row tile width for where these matrices are read from (memory or cache).
            crate::kernels::matmul::choose_one_row_width(Some(model.weights().packed.bytes()))?;
            Some(m)
        };
        let backend = CpuBackend::new(cfg.n_threads)?;
        let (exec, kv_placement) = match model.gpu() {
            None => (
                Executor::Cpu {
                    backend,
                    allocator: GraphAllocator::new()?,
                },
                KvPlacement::cpu(),
            ),
            Some(g) => {
                let device = g.placement.device;
                let gpu = device.start()?;
                let sched = Scheduler::new(&gpu, &backend, 4 * mistral::graph_size(hp, 1))?;
                (
                    Executor::Offload {
                        gpu,
                        cpu: backend,
                        sched,
                    },
                    KvPlacement {
                        gpu: Some(device.buffer_type()),
                        first_gpu_layer: g.placement.first_layer,
                    },
                )
            }
        };
        Ok(Engine {
            model,
            exec,
            kv_placement,
            cfg,
            n_ctx,
            kv_shape,
            attention,
            matmul,
        })
    }

    /// The model's hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.model.hparams
    }

    /// The loaded model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The engine settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Shape of every sequence's KV cache.
    pub fn kv_shape(&self) -> &KvShape {
        &self.kv_shape
    }

    /// The attention implementation in use.
    pub fn attention(&self) -> AttentionImpl {
        self.attention
    }

    /// The native matrix kernel multiplying the packed weight matrices (`None`: every product
    /// through ggml, as when loaded without `native_matmul` or no matrix has a supported type).
    pub fn matmul(&self) -> Option<Matmul> {
        self.matmul
    }

    /// The context length: the most positions one sequence is meant to use (with a window the
    /// ring rolls past it; the daemon still limits each request to it).
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The attention window in effect (`None`: full attention).
    pub fn window(&self) -> Option<usize> {
        self.kv_shape.window
    }

    /// Bytes of the CPU's compute buffer (grows to the largest step seen, then stays).
    pub fn compute_buffer_bytes(&self) -> usize {
        match &self.exec {
            Executor::Cpu { allocator, .. } => allocator.buffer_size(),
            Executor::Offload { gpu, cpu, sched } => sched.buffer_sizes(gpu, cpu).1,
        }
    }

    /// What the engine keeps on a GPU (`None`: it runs on the CPU only).
    pub fn gpu_usage(&self) -> Option<GpuUsage> {
        let Executor::Offload { gpu, cpu, sched } = &self.exec else {
            return None;
        };
        let g = self.model.gpu()?;
        let n_layer = self.model.hparams.n_layer;
        let per_layer = (self.kv_shape.total_bytes() / n_layer.max(1)) as u64;
        let layers = g.placement.n_layers(n_layer);
        Some(GpuUsage {
            device: gpu.device(),
            layers,
            output: g.placement.output,
            weight_bytes: g.bytes,
            kv_bytes_per_sequence: per_layer * layers as u64,
            compute_bytes: sched.buffer_sizes(gpu, cpu).0 as u64,
        })
    }

    /// Most tokens one sequence may contribute to one step.
    pub fn max_step(&self) -> usize {
        self.cfg.batch_size.min(self.kv_shape.n_slots)
    }

    /// A new, empty sequence with its own cache.
    pub fn new_sequence(&self) -> anyhow::Result<Sequence> {
        Ok(Sequence {
            cache: KvCache::new(self.kv_shape, &self.kv_placement)?,
        })
    }

    /// Runs one step over `items`; returns, per item, its logits rows (row-major
    /// `[n_rows][n_vocab]`, `n_rows` per its [`Logits`] request). On error no sequence changes.
    pub fn step(&mut self, items: &mut [BatchItem<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let hp = &self.model.hparams;
        let n_vocab = hp.n_vocab;
        let mut plans: Vec<AttnPlan> = Vec::with_capacity(items.len());
        let mut tokens: Vec<i32> = Vec::new();
        let mut positions: Vec<i32> = Vec::new();
        let mut out_rows: Vec<i32> = Vec::new();
        for item in items.iter() {
            if item.tokens.is_empty() {
                bail!("a batch item has no tokens");
            }
            if item.tokens.len() > self.max_step() {
                bail!(
                    "{} tokens in one step exceed the step limit of {}",
                    item.tokens.len(),
                    self.max_step()
                );
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= n_vocab) {
                bail!("token id {bad} is outside the vocabulary (size {n_vocab})");
            }
            let plan = item.seq.cache.plan(item.tokens.len())?;
            let first = tokens.len() as i32;
            let n = item.tokens.len() as i32;
            match item.logits {
                Logits::None => {}
                Logits::Last => out_rows.push(first + n - 1),
                Logits::All => out_rows.extend(first..first + n),
            }
            for (i, &t) in item.tokens.iter().enumerate() {
                tokens.push(t as i32);
                let pos = plan.pos0 + i as u64;
                positions
                    .push(i32::try_from(pos).context("position exceeds the i32 range of RoPE")?);
            }
            plans.push(plan);
        }
        // The graph needs at least one output row; compute the last token's and discard it.
        let discard = out_rows.is_empty();
        if discard {
            out_rows.push(tokens.len() as i32 - 1);
        }

        let n_seqs = items.len();
        let graph_size = crate::model::mistral::graph_size(hp, n_seqs);
        let ctx = Context::for_graph(graph_size * 2, graph_size)?;
        // Every tensor the scheduler may see: the graph's, the weights and the caches.
        let sched_capacity = 4 * graph_size;
        let seq_inputs: Vec<SeqInput<'_>> = {
            let mut first = 0;
            items
                .iter()
                .zip(&plans)
                .map(|(item, plan)| {
                    let s = SeqInput {
                        cache: &item.seq.cache,
                        plan,
                        first_token: first,
                    };
                    first += item.tokens.len();
                    s
                })
                .collect()
        };
        let step = build_step(
            &ctx,
            hp,
            self.model.weights(),
            tokens.len(),
            &seq_inputs,
            out_rows.len(),
            StepCompute {
                attention: self.attention,
                matmul: self.matmul,
                n_threads: self.exec.n_threads(),
                first_gpu_layer: self.kv_placement.first_gpu_layer.min(hp.n_layer),
            },
        );
        self.exec.alloc(&step.graph, sched_capacity)?;
        step.tokens.write(&tokens);
        step.positions.write(&positions);
        if step.out_rows.is_allocated() {
            step.out_rows.write(&out_rows);
        }
        let plan_refs: Vec<&AttnPlan> = plans.iter().collect();
        fill_attention_inputs(&step, &plan_refs);
        self.exec.compute(&step.graph)?;
        let logits = step.logits.read_f32();
        drop(seq_inputs);

        let mut result = Vec::with_capacity(n_seqs);
        let mut row = 0;
        for item in items.iter_mut() {
            item.seq.cache.commit(item.tokens.len());
            let n_rows = match item.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => item.tokens.len(),
            };
            result.push(logits[row * n_vocab..(row + n_rows) * n_vocab].to_vec());
            row += n_rows;
        }
        Ok(result)
    }

    /// Feeds `tokens` to one sequence in chunks of at most [`Engine::max_step`] and returns the
    /// logits asked for (`Last`: of the final token; `All`: of every token).
    pub fn feed(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        logits: Logits,
    ) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::new();
        let chunk = self.max_step();
        let n_chunks = tokens.len().div_ceil(chunk);
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let want = match logits {
                Logits::All => Logits::All,
                Logits::Last if i + 1 == n_chunks => Logits::Last,
                _ => Logits::None,
            };
            let mut items = [BatchItem {
                seq: &mut *seq,
                tokens: part,
                logits: want,
            }];
            out.extend(self.step(&mut items)?.pop().unwrap_or_default());
        }
        Ok(out)
    }
}
