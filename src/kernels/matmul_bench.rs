//! `mistrald bench-matmul`: the matrix-vector kernels on Mistral 7B's layer shapes (4096×4096
//! Wq/Wo, 1024×4096 Wk/Wv, 14336×4096 gate/up, 4096×14336 down) for any number of activation
//! rows (default 1, 2, 4, 8: decode and the small batches of continuous batching),
//! every available path against ggml's `mul_mat` on the same weights, both with the weight in
//! place (ggml's own block layout, `--no-repack`) and converted into ggml's interleaved
//! repack layout (what the engine uses by default), 1 and 2 threads.
//!
//! A plain read of the same packed copies by the same threads (`read`) is timed with them: the
//! rate a product that reads each byte once cannot beat, measured at the same moments.
//!
//! The implementations of one configuration are timed in turns (`rounds` slices each, the order
//! rotating every round) and each reports the median over all its slices, so their ratio
//! compares the same stretch of time on a machine whose memory bandwidth moves within seconds.
//!
//! Calls cycle through `copies` separate copies of the matrix, as decoding cycles through the
//! layers: with 32 copies (about 1 GB for the largest Q4_0 shape) the weights come from main
//! memory; with 1 they stay in the CPU's caches when they fit. Speed is reported as GB/s of
//! the matrix's GGUF bytes per call, so every implementation is measured against the same
//! amount of data (the packed layout is as large as GGUF's for Q4_0/Q8_0, 3% and 1% larger for
//! Q4_K/Q6_K).

use super::bandwidth::read_share;
use super::bench::time_parallel_samples;
use super::ggml_bench::compute_samples;
use super::matmul::{Matmul, MatmulPath, PackedMatrix, RawMatmulParams, WeightType, MAX_BATCH};
use crate::ggml::{
    BackendBuffer, Context, CpuBackend, GgmlType, Graph, GraphAllocator, RepackBufferType, Tensor,
};
use std::time::Duration;

/// What to measure.
#[derive(Debug, Clone)]
pub struct MatmulBenchOptions {
    /// Matrix shapes as (output rows, columns).
    pub shapes: Vec<(usize, usize)>,
    /// Weight types.
    pub types: Vec<WeightType>,
    /// Activation rows per call (1..=[`MAX_BATCH`]).
    pub rows: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Copies of the matrix that successive calls cycle through (32: from memory; 1: warm).
    pub copies: Vec<usize>,
    /// Native paths; empty = every available path but scalar.
    pub paths: Vec<MatmulPath>,
    /// Also time ggml's `mul_mat` (in place and repacked).
    pub ggml: bool,
    /// Minimum time measured per configuration and implementation.
    pub min_time: Duration,
    /// Slices each implementation's time is split into, alternating with the others'.
    pub rounds: usize,
}

impl Default for MatmulBenchOptions {
    fn default() -> Self {
        MatmulBenchOptions {
            shapes: vec![(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
            types: WeightType::ALL.to_vec(),
            rows: vec![1, 2, 4, 8],
            threads: vec![1, 2],
            copies: vec![32, 1],
            paths: Vec::new(),
            ggml: true,
            min_time: Duration::from_millis(300),
            rounds: 5,
        }
    }
}

/// Who computed a row of the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// One of the native paths.
    Native(MatmulPath),
    /// ggml's `mul_mat` with the weight in its GGUF layout.
    Ggml,
    /// ggml's `mul_mat` with the weight in ggml's repacked (interleaved) layout.
    GgmlRepack,
    /// No product: every thread reads its share of the packed copies with plain vector loads,
    /// as the bandwidth probe does (the bound of a product that reads each byte once).
    Read,
}

impl Implementation {
    /// Name for tables.
    pub fn name(self) -> String {
        match self {
            Implementation::Native(p) => p.name().to_string(),
            Implementation::Ggml => "ggml".to_string(),
            Implementation::GgmlRepack => "ggml repack".to_string(),
            Implementation::Read => "read".to_string(),
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct MatmulBenchRow {
    /// Implementation.
    pub implementation: Implementation,
    /// Weight type.
    pub ty: WeightType,
    /// Output rows of the matrix.
    pub n_rows: usize,
    /// Columns of the matrix.
    pub n_cols: usize,
    /// Activation rows.
    pub rows: usize,
    /// Threads.
    pub threads: usize,
    /// Copies cycled through.
    pub copies: usize,
    /// Median microseconds per call.
    pub micros: f64,
    /// Fastest call, microseconds.
    pub best_micros: f64,
    /// GGUF bytes of the matrix per median call, GB/s.
    pub gbytes_per_s: f64,
}

/// Random GGUF blocks with sane scales (values do not matter for speed; the scales keep the
/// arithmetic finite).
fn gguf_bytes(ty: WeightType, n_rows: usize, n_cols: usize) -> anyhow::Result<Vec<u8>> {
    let len = ty.gguf_bytes(n_rows, n_cols)?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let scale = 0x2c00u16.to_le_bytes(); // 2^-4
    for blk in out.chunks_mut(ty.block_bytes()) {
        match ty {
            WeightType::Q4_0 | WeightType::Q8_0 => blk[0..2].copy_from_slice(&scale),
            WeightType::Q4K => {
                blk[0..2].copy_from_slice(&scale);
                blk[2..4].copy_from_slice(&scale);
            }
            WeightType::Q6K => blk[208..210].copy_from_slice(&scale),
        }
    }
    Ok(out)
}

fn activations(rows: usize, n_cols: usize) -> Vec<f32> {
    (0..rows * n_cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.3)
        .collect()
}

struct SharedParams(Vec<RawMatmulParams>);
// SAFETY: the kernel is called with the same parameters from several threads (disjoint rows of
// y, per-thread scratch).
unsafe impl Sync for SharedParams {}

impl SharedParams {
    fn get(&self, g: u64) -> *const RawMatmulParams {
        &self.0[g as usize % self.0.len()]
    }
}

/// Runs the benchmark and returns one row per configuration.
pub fn bench_matmul(opts: &MatmulBenchOptions) -> anyhow::Result<Vec<MatmulBenchRow>> {
    let paths: Vec<MatmulPath> = if opts.paths.is_empty() {
        super::matmul::available_matmul_paths()
            .into_iter()
            .filter(|&p| p != MatmulPath::Scalar)
            .collect()
    } else {
        opts.paths.clone()
    };
    let kernels = paths
        .iter()
        .map(|&p| Matmul::for_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    for &r in &opts.rows {
        anyhow::ensure!(
            (1..=MAX_BATCH).contains(&r),
            "activation rows must be 1..={MAX_BATCH}, got {r}"
        );
    }
    let rounds = opts.rounds.max(1);
    let slice = opts.min_time / rounds as u32;
    let mut out = Vec::new();
    for &ty in &opts.types {
        for &(n_rows, n_cols) in &opts.shapes {
            let src = gguf_bytes(ty, n_rows, n_cols)?;
            let bytes = src.len() as f64;
            for &copies in &opts.copies {
                let copies = copies.max(1);
                let packed = (0..copies)
                    .map(|_| PackedMatrix::pack(ty, n_rows, n_cols, &src))
                    .collect::<Result<Vec<_>, _>>()?;
                // ggml's weights, in place and repacked (when ggml repacks this type here).
                let w_ctxs = [
                    Context::new((copies + 4) * crate::ggml::tensor_overhead(), true)?,
                    Context::new((copies + 4) * crate::ggml::tensor_overhead(), true)?,
                ];
                let mut ggml_weights = Vec::new();
                if opts.ggml {
                    for (w_ctx, repack) in w_ctxs.iter().zip([false, true]) {
                        if let Some(w) =
                            GgmlWeights::new(w_ctx, ty, n_rows, n_cols, &src, copies, repack)?
                        {
                            ggml_weights.push(w);
                        }
                    }
                }
                for &rows in &opts.rows {
                    let x_ctx = Context::new(8 * crate::ggml::tensor_overhead(), true)?;
                    let x = x_ctx.new_tensor(GgmlType::F32, &[n_cols as i64, rows as i64]);
                    let _x_buf = crate::ggml::BufferType::cpu().alloc_context_tensors(&x_ctx)?;
                    x.write(&activations(rows, n_cols));
                    for &threads in &opts.threads {
                        let nth = threads.max(1);
                        let backend = CpuBackend::new(nth)?;
                        let nodes = graph_nodes(copies) + 8;
                        let g_ctxs = ggml_weights
                            .iter()
                            .map(|_| Context::for_graph(nodes, nodes))
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let graphs = ggml_weights
                            .iter()
                            .zip(&g_ctxs)
                            .map(|(w, ctx)| w.timer(ctx, x))
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let turns = Turns {
                            kernels: &kernels,
                            packed: &packed,
                            graphs: &graphs,
                            backend: &backend,
                            rows,
                            nth,
                        };
                        let samples = turns.time(rounds, slice)?;
                        let imps = kernels
                            .iter()
                            .map(|k| Implementation::Native(k.path()))
                            .chain(ggml_weights.iter().map(|w| w.implementation))
                            .chain([Implementation::Read]);
                        for (implementation, mut s) in imps.zip(samples) {
                            s.sort_by(f64::total_cmp);
                            let micros = s[s.len() / 2];
                            out.push(MatmulBenchRow {
                                implementation,
                                ty,
                                n_rows,
                                n_cols,
                                rows,
                                threads,
                                copies,
                                micros,
                                best_micros: s[0],
                                gbytes_per_s: bytes / (micros * 1e3),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The implementations of one configuration, timed in turns.
struct Turns<'a, 'g> {
    kernels: &'a [Matmul],
    packed: &'a [PackedMatrix],
    graphs: &'a [GgmlTimer<'g>],
    backend: &'a CpuBackend,
    rows: usize,
    nth: usize,
}

impl Turns<'_, '_> {
    /// Microseconds per call of each implementation — the native paths, ggml's graphs, then
    /// the plain read of the packed copies — over `rounds` rounds of one `slice` each, the
    /// order rotating every round.
    fn time(&self, rounds: usize, slice: Duration) -> anyhow::Result<Vec<Vec<f64>>> {
        let (n_native, nth) = (self.kernels.len(), self.nth);
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); n_native + self.graphs.len() + 1];
        for round in 0..rounds {
            for i in 0..samples.len() {
                let j = (i + round) % samples.len();
                let more = if j < n_native {
                    time_native(&self.kernels[j], self.packed, self.rows, nth, slice)
                } else if j == samples.len() - 1 {
                    time_parallel_samples(nth, slice, |g, ith| {
                        let copy = &self.packed[g as usize % self.packed.len()];
                        read_share(copy.bytes(), ith, nth);
                    })
                } else {
                    let t = self.graphs[j - n_native].time(self.backend, slice)?;
                    // ggml's workers would poll on through the next slice.
                    self.backend.pause();
                    t
                };
                samples[j].extend(more);
            }
        }
        Ok(samples)
    }
}

/// The microseconds of calls of `k` on `rows` activation rows for `min_time`, cycling through
/// the packed copies.
fn time_native(
    k: &Matmul,
    packed: &[PackedMatrix],
    rows: usize,
    nth: usize,
    min_time: Duration,
) -> Vec<f64> {
    let (n, kc) = (packed[0].n_rows(), packed[0].n_cols());
    let x = activations(rows, kc);
    let mut y = vec![0f32; rows * n];
    let probe = RawMatmulParams {
        wtype: 0,
        nr: rows as i32,
        n_rows: n as i64,
        n_cols: kc as i64,
        w: std::ptr::null(),
        x: x.as_ptr(),
        x_stride: kc as i64,
        xq: std::ptr::null(),
        y: y.as_mut_ptr(),
        y_stride: n as i64,
        scratch: std::ptr::null_mut(),
        scratch_bytes: 0,
    };
    // SAFETY: reads the counts.
    let scratch_bytes = unsafe { super::ffi::mk_mm_scratch_size(&probe, nth as i32) };
    let mut scratch = vec![super::CacheLine([0; 64]); scratch_bytes.div_ceil(64)];
    let params = SharedParams(
        packed
            .iter()
            .map(|w| RawMatmulParams {
                wtype: w.ty().ggml().id() as i32,
                w: w.as_ptr().cast(),
                scratch: scratch.as_mut_ptr().cast(),
                scratch_bytes,
                ..probe
            })
            .collect(),
    );
    let t = time_parallel_samples(nth, min_time, |g, ith| {
        // SAFETY: x, y and the scratch are sized for these parameters (rows <= 8, the matrix's
        // shape), the packed matrices are valid; threads write disjoint rows of y.
        let rc = unsafe { k.run_raw(params.get(g), ith as i32, nth as i32) };
        debug_assert_eq!(rc, 0);
    });
    drop(params);
    drop(scratch);
    t
}

/// `copies` copies of a matrix as ggml's tensors: in place (GGUF blocks) or in ggml's repacked
/// layout.
struct GgmlWeights<'c> {
    implementation: Implementation,
    ws: Vec<Tensor<'c>>,
    _buf: BackendBuffer,
}

impl<'c> GgmlWeights<'c> {
    /// `None` when ggml cannot repack this type on this CPU (`repack`).
    fn new(
        w_ctx: &'c Context,
        ty: WeightType,
        n_rows: usize,
        n_cols: usize,
        src: &[u8],
        copies: usize,
        repack: bool,
    ) -> anyhow::Result<Option<GgmlWeights<'c>>> {
        let (n, k) = (n_rows as i64, n_cols as i64);
        let ws: Vec<Tensor<'c>> = (0..copies)
            .map(|_| w_ctx.new_tensor(ty.ggml(), &[k, n]))
            .collect();
        let buf = if repack {
            let Some(r) = RepackBufferType::find() else {
                return Ok(None);
            };
            if !r.supports(ws[0]) {
                return Ok(None);
            }
            let r = r.buffer_type();
            let align = r.alignment();
            let sizes: Vec<usize> = ws
                .iter()
                .map(|&t| r.alloc_size(t).next_multiple_of(align))
                .collect();
            let buf = r.alloc(sizes.iter().sum())?;
            let mut at = 0;
            for (&t, size) in ws.iter().zip(&sizes) {
                buf.place(t, at)?;
                t.write::<u8>(src);
                at += size;
            }
            buf
        } else {
            let buf = crate::ggml::BufferType::cpu().alloc_context_tensors(w_ctx)?;
            for &t in &ws {
                t.write::<u8>(src);
            }
            buf
        };
        Ok(Some(GgmlWeights {
            implementation: if repack {
                Implementation::GgmlRepack
            } else {
                Implementation::Ggml
            },
            ws,
            _buf: buf,
        }))
    }

    /// A graph (in `ctx`, see [`graph_nodes`]) of products `w_i · x`, product i with copy
    /// i % copies (amortising the graph launch as a decode step's graph does), allocated.
    fn timer<'g>(&self, ctx: &'g Context, x: Tensor<'_>) -> anyhow::Result<GgmlTimer<'g>> {
        let nodes = graph_nodes(self.ws.len());
        let mut graph = ctx.new_graph(nodes + 8);
        for i in 0..nodes {
            graph.expand(ctx.mul_mat(self.ws[i % self.ws.len()], x));
        }
        let mut alloc = GraphAllocator::new()?;
        alloc.alloc(&graph)?;
        Ok(GgmlTimer {
            graph,
            nodes,
            warm: std::cell::Cell::new(false),
            _alloc: alloc,
        })
    }
}

/// Products per ggml graph for `copies` copies of a matrix.
fn graph_nodes(copies: usize) -> usize {
    copies.max(16)
}

/// An allocated graph of ggml products, timed per product.
struct GgmlTimer<'g> {
    graph: Graph<'g>,
    nodes: usize,
    warm: std::cell::Cell<bool>,
    _alloc: GraphAllocator,
}

impl GgmlTimer<'_> {
    /// Microseconds per product of computations of the whole graph for `min_time` (at least
    /// one; the first call also computes it once untimed, to warm up).
    fn time(&self, backend: &CpuBackend, min_time: Duration) -> anyhow::Result<Vec<f64>> {
        if !self.warm.replace(true) {
            backend.compute(&self.graph)?;
        }
        let samples = compute_samples(backend, &self.graph, min_time, 1)?;
        Ok(samples.iter().map(|us| us / self.nodes as f64).collect())
    }
}

/// Formats the rows as Markdown: per weight type and shape, one line per (copies, rows,
/// threads) with each implementation's GB/s, the best native path against the faster of
/// ggml's two layouts, and against the plain read of the same copies (the bound, measured in
/// turns with the products).
pub fn format_table(rows: &[MatmulBenchRow]) -> String {
    let mut imps: Vec<Implementation> = Vec::new();
    for r in rows {
        if !imps.contains(&r.implementation) {
            imps.push(r.implementation);
        }
    }
    let mut s = String::new();
    let mut groups: Vec<(WeightType, usize, usize)> = Vec::new();
    for r in rows {
        if !groups.contains(&(r.ty, r.n_rows, r.n_cols)) {
            groups.push((r.ty, r.n_rows, r.n_cols));
        }
    }
    for (ty, n, k) in groups {
        s += &format!(
            "\n{ty} {n}×{k} ({:.1} MB): GB/s of weights per call (median)\n\n| weights | rows | threads |",
            ty.gguf_bytes(n, k).unwrap_or(0) as f64 / 1e6
        );
        for i in &imps {
            s += &format!(" {} |", i.name());
        }
        s += " best native vs ggml | best native of read |\n|---|---:|---:|";
        s += &"---:|".repeat(imps.len() + 2);
        s += "\n";
        let mut keys: Vec<(usize, usize, usize)> = Vec::new();
        for r in rows
            .iter()
            .filter(|r| (r.ty, r.n_rows, r.n_cols) == (ty, n, k))
        {
            if !keys.contains(&(r.copies, r.rows, r.threads)) {
                keys.push((r.copies, r.rows, r.threads));
            }
        }
        for (copies, nr, threads) in keys {
            let here: Vec<&MatmulBenchRow> = rows
                .iter()
                .filter(|r| {
                    (r.ty, r.n_rows, r.n_cols, r.copies, r.rows, r.threads)
                        == (ty, n, k, copies, nr, threads)
                })
                .collect();
            let place = if copies > 1 {
                format!("memory ({copies} copies)")
            } else {
                "cache-warm".to_string()
            };
            s += &format!("| {place} | {nr} | {threads} |");
            for i in &imps {
                match here.iter().find(|r| r.implementation == *i) {
                    Some(r) => s += &format!(" {:.2} |", r.gbytes_per_s),
                    None => s += " - |",
                }
            }
            let best = |of: fn(Implementation) -> bool| {
                here.iter()
                    .filter(|r| of(r.implementation))
                    .map(|r| r.gbytes_per_s)
                    .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
            };
            let native = best(|i| matches!(i, Implementation::Native(_)));
            let ggml = best(|i| matches!(i, Implementation::Ggml | Implementation::GgmlRepack));
            let read = best(|i| i == Implementation::Read);
            match (native, ggml) {
                (Some(a), Some(b)) => s += &format!(" {:.2}× |", a / b),
                _ => s += " - |",
            }
            match (native, read) {
                (Some(a), Some(b)) => s += &format!(" {:.0} % |\n", 100.0 * a / b),
                _ => s += " - |\n",
            }
        }
    }
    s
}
