//! Microbenchmark of decode attention (one query position) for Mistral 7B
//! shapes: 32 query heads, 8 KV heads, head_dim 128, over a ring holding the
//! whole history, for each available path (scalar included), F16 and Q8_0
//! caches, 1 and 2 threads. Threads are a small spinning pool started once,
//! like ggml's workers, so thread start-up is not timed (they spin, then
//! yield, between calls).

use super::{AttnParams, Kernel, KernelError, KernelPath, KvType, RawAttnParams};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How the ring is laid out in memory (the kernel takes any strides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayout {
    /// `[slot][kv head][row]`: one position's heads together (llama.cpp's layout).
    SlotMajor,
    /// `[kv head][slot][row]`: one head's positions contiguous.
    HeadMajor,
}

impl CacheLayout {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            CacheLayout::SlotMajor => "slot-major",
            CacheLayout::HeadMajor => "head-major",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// History lengths (cached positions) to time.
    pub n_hist: Vec<usize>,
    /// Cache element types.
    pub kv_types: Vec<KvType>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Cache layouts.
    pub layouts: Vec<CacheLayout>,
    /// Paths; empty = every available path.
    pub paths: Vec<KernelPath>,
    /// Minimum time measured per configuration.
    pub min_time: Duration,
    /// Separate caches (one per model layer) that successive calls cycle through, as decoding
    /// does: with Mistral 7B's 32 layers the data comes from main memory, not from the CPU's
    /// caches; with 1 every call reads the same (cache-warm) data.
    pub layers: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            n_hist: vec![512, 2048, 4096],
            kv_types: vec![KvType::F16, KvType::Q8_0],
            threads: vec![1, 2],
            layouts: vec![CacheLayout::SlotMajor, CacheLayout::HeadMajor],
            paths: Vec::new(),
            min_time: Duration::from_millis(300),
            layers: 32,
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Kernel path.
    pub path: KernelPath,
    /// Cache type.
    pub kv_type: KvType,
    /// History length.
    pub n_hist: usize,
    /// Ring layout.
    pub layout: CacheLayout,
    /// Threads.
    pub threads: usize,
    /// Median microseconds per call (one layer's decode attention).
    pub micros: f64,
    /// Fastest call, microseconds (less sensitive to other load on the machine).
    pub best_micros: f64,
    /// K+V cache bytes read per call divided by the time, GB/s.
    pub gbytes_per_s: f64,
}

const HEAD_DIM: usize = 128;
const N_HEAD: usize = 32;
const N_HEAD_KV: usize = 8;

/// Runs the benchmark and returns one row per configuration.
pub fn bench_attention(opts: &BenchOptions) -> Result<Vec<BenchRow>, KernelError> {
    let paths = if opts.paths.is_empty() {
        super::available_paths()
    } else {
        opts.paths.clone()
    };
    let kernels = paths
        .iter()
        .map(|&p| Kernel::for_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::new();
    for &ty in &opts.kv_types {
        for (&n_hist, &layout) in opts
            .n_hist
            .iter()
            .flat_map(|h| opts.layouts.iter().map(move |l| (h, l)))
        {
            // Ring = history + this token, history wrapped by a third of the ring.
            let n_slots = n_hist + 1;
            let pos0 = (n_hist + n_slots / 3) as u64;
            let p = AttnParams::dense(HEAD_DIM, N_HEAD, N_HEAD_KV, 0, ty, n_slots, pos0, n_hist, 1);
            let bytes = p.cache_bytes();
            let layers = opts.layers.max(1);
            // Each layer's cache starts on a 64-byte boundary (u32 elements).
            let layer_words = bytes.div_ceil(64) * 16;
            let fill = |seed: u32| -> Vec<u32> {
                // plausible data: small f16 values / Q8_0 blocks with a sane scale
                let mut x = seed;
                (0..layer_words * layers)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        (x & 0x3bff_3bff) | 0x0000_2000
                    })
                    .collect()
            };
            let kc = fill(1);
            let vc = fill(2);
            let q: Vec<f32> = (0..N_HEAD * HEAD_DIM)
                .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
                .collect();
            let kn: Vec<f32> = (0..N_HEAD_KV * HEAD_DIM)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.02)
                .collect();
            let mut out = vec![0f32; N_HEAD * HEAD_DIM];
            let raws = (0..layers)
                .map(|l| {
                    let layer = |c: &[u32]| {
                        // SAFETY: one layer's u32 words viewed as bytes, `bytes` <= 4 * layer_words.
                        unsafe {
                            std::slice::from_raw_parts(
                                c[l * layer_words..].as_ptr().cast::<u8>(),
                                bytes,
                            )
                        }
                    };
                    let inputs = super::AttnInputs {
                        q: &q,
                        k_new: &kn,
                        v_new: &kn,
                        k_cache: layer(&kc),
                        v_cache: layer(&vc),
                    };
                    p.validate(&inputs, out.len())?;
                    Ok(p.to_raw(&inputs, out.as_mut_ptr()))
                })
                .collect::<Result<Vec<_>, KernelError>>()?;
            for k in &kernels {
                for &nth in &opts.threads {
                    let nth = nth.max(1);
                    // One scratch shared by the layers' calls (they run one after another).
                    let mut scratch = super::Scratch::for_params(&raws[0], nth);
                    let mut raws = raws.clone();
                    raws.iter_mut().for_each(|r| scratch.attach(r));
                    let (micros, best_micros) = time_kernel(k, &raws, nth, opts.min_time);
                    drop(scratch);
                    let kv_bytes = 2 * n_hist * N_HEAD_KV * ty.row_bytes(HEAD_DIM);
                    rows.push(BenchRow {
                        path: k.path(),
                        kv_type: ty,
                        n_hist,
                        layout,
                        threads: nth,
                        micros,
                        best_micros,
                        gbytes_per_s: kv_bytes as f64 / (micros * 1e3),
                    });
                }
            }
        }
    }
    Ok(rows)
}

struct Shared(*const RawAttnParams, usize);
// SAFETY: the kernel may be called with the same params from several threads.
unsafe impl Sync for Shared {}

impl Shared {
    fn get(&self, g: u64) -> *const RawAttnParams {
        // SAFETY: the index is reduced modulo the array's length.
        unsafe { self.0.add(g as usize % self.1) }
    }
}

/// Busy-waits briefly, then yields the CPU: on a machine with more runnable
/// threads than cores a pure spin would wait out whole scheduler time slices.
fn relax(spins: &mut u32) {
    *spins += 1;
    if *spins < 2000 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Median and minimum time of one call (all `nth` shares), in microseconds. Call `g` uses
/// `raws[g % raws.len()]`.
fn time_kernel(k: &Kernel, raws: &[RawAttnParams], nth: usize, min_time: Duration) -> (f64, f64) {
    let shared = Shared(raws.as_ptr(), raws.len());
    time_parallel(nth, min_time, |g, ith| {
        // SAFETY: params validated by the caller; shares are disjoint.
        unsafe { k.run_raw(shared.get(g), ith as i32, nth as i32) }
    })
}

/// Times calls of `share(g, ith)` for `ith` in `0..nth` — call `g`'s share of thread `ith` —
/// on a small spinning pool started once, like ggml's workers (the calling thread is thread
/// 0). Returns the median and the minimum time of one call (every share done), in
/// microseconds, over at least `min_time` and 10 calls, after 3 warm-up calls.
pub(crate) fn time_parallel<F: Fn(u64, usize) + Sync>(
    nth: usize,
    min_time: Duration,
    share: F,
) -> (f64, f64) {
    let samples = time_parallel_samples(nth, min_time, share);
    (samples[samples.len() / 2], samples[0])
}

/// [`time_parallel`]'s samples: the time of every timed call in microseconds, sorted ascending
/// (at least 10).
pub(crate) fn time_parallel_samples<F: Fn(u64, usize) + Sync>(
    nth: usize,
    min_time: Duration,
    share: F,
) -> Vec<f64> {
    let gen = AtomicU64::new(0);
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut samples = Vec::new();
    std::thread::scope(|s| {
        for ith in 1..nth {
            let (share, gen, done, stop) = (&share, &gen, &done, &stop);
            s.spawn(move || {
                let mut seen = 0;
                let mut spins = 0u32;
                loop {
                    let g = loop {
                        let g = gen.load(Ordering::Acquire);
                        if g != seen || stop.load(Ordering::Acquire) {
                            break g;
                        }
                        relax(&mut spins);
                    };
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    seen = g;
                    spins = 0;
                    share(g, ith);
                    done.fetch_add(1, Ordering::AcqRel);
                }
            });
        }
        let call = |g: u64| {
            gen.store(g, Ordering::Release);
            share(g, 0);
            let mut spins = 0u32;
            while done.load(Ordering::Acquire) < (g as usize) * (nth - 1) {
                relax(&mut spins);
            }
        };
        let mut g = 0;
        // warm-up
        for _ in 0..3 {
            g += 1;
            call(g);
        }
        let start = Instant::now();
        while start.elapsed() < min_time || samples.len() < 10 {
            g += 1;
            let t = Instant::now();
            call(g);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        stop.store(true, Ordering::Release);
    });
    samples.sort_by(|a, b| a.total_cmp(b));
    samples
}

/// Formats rows as a Markdown table, with the speed-up over scalar.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| path | kv type | history | layout | threads | µs/call (median) | µs/call (best) | GB/s (K+V, median) | vs scalar (median) |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| {
                b.path == KernelPath::Scalar
                    && b.kv_type == r.kv_type
                    && b.n_hist == r.n_hist
                    && b.layout == r.layout
                    && b.threads == r.threads
            })
            .map(|b| format!("{:.2}×", b.micros / r.micros))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {} |\n",
            r.path.description(),
            r.kv_type.name(),
            r.n_hist,
            r.layout.name(),
            r.threads,
            r.micros,
            r.best_micros,
            r.gbytes_per_s,
            base
        );
    }
    s
}
