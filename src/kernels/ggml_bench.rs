//! The yardstick for the attention microbenchmark: ggml's `ggml_flash_attn_ext` computing the
//! same decode attention (Mistral 7B shapes) over the same kind of cache, on ggml's CPU backend.

use super::KvType;
use crate::ggml::{Context, Graph, Tensor};
use crate::ggml::{CpuBackend, GgmlType, GraphAllocator};
use std::time::{Duration, Instant};

const HEAD_DIM: i64 = 128;
const N_HEAD: i64 = 32;
const N_HEAD_KV: i64 = 8;

/// Median microseconds of one decode attention call (one layer) by `ggml_flash_attn_ext` over
/// `n_hist + 1` cached positions of `kv_type`, with `threads` threads, measured for at least
/// `min_time`. One graph computes `layers` such calls, each over its own cache (as a decode
/// step does, layer after layer); the time is per call.
pub fn ggml_flash_attn_micros(
    n_hist: usize,
    kv_type: KvType,
    threads: usize,
    min_time: Duration,
    layers: usize,
) -> anyhow::Result<f64> {
    let layers = layers.max(1);
    let ty = match kv_type {
        KvType::F32 => GgmlType::F32,
        KvType::F16 => GgmlType::F16,
        KvType::Q8_0 => GgmlType::Q8_0,
    };
    let n_kv = n_hist as i64 + 1;
    let backend = CpuBackend::new(threads)?;
    let data_ctx = Context::new((2 * layers + 8) * crate::ggml::tensor_overhead(), true)?;
    let caches: Vec<(Tensor<'_>, Tensor<'_>)> = (0..layers)
        .map(|_| {
            (
                data_ctx.new_tensor(ty, &[HEAD_DIM * N_HEAD_KV, n_kv]),
                data_ctx.new_tensor(ty, &[HEAD_DIM * N_HEAD_KV, n_kv]),
            )
        })
        .collect();
    let q = data_ctx.new_tensor(GgmlType::F32, &[HEAD_DIM, N_HEAD, 1]);
    let mask = data_ctx.new_tensor(GgmlType::F16, &[n_kv, 1]);
    let _buffer = crate::ggml::BufferType::cpu().alloc_context_tensors(&data_ctx)?;
    for &(k, v) in &caches {
        fill(k, ty, 1)?;
        fill(v, ty, 2)?;
    }
    q.write(
        &(0..HEAD_DIM * N_HEAD)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.3)
            .collect::<Vec<f32>>(),
    );
    mask.write(&vec![0u16; n_kv as usize]);

    let nodes = 8 * layers + 16;
    let ctx = Context::for_graph(nodes, nodes)?;
    let mut graph = ctx.new_graph(nodes);
    let heads = |t: Tensor<'_>| {
        let row = t.nb()[1];
        let head = ty.row_bytes(HEAD_DIM as u64).expect("whole blocks") as usize;
        ctx.view(t, &[HEAD_DIM, n_kv, N_HEAD_KV], &[row, head], 0)
    };
    let qp = ctx.permute(q, [0, 2, 1, 3]);
    for &(k, v) in &caches {
        let out = ctx.flash_attn(qp, heads(k), heads(v), mask, 1.0 / (HEAD_DIM as f32).sqrt());
        graph.expand(out);
    }
    let samples = time_graph(&backend, &graph, min_time)?;
    Ok(samples[samples.len() / 2] / layers as f64)
}

/// Allocates `graph`, computes it once to warm up, then times whole computations for at least
/// `min_time` (and at least 5): the samples in microseconds, sorted ascending.
fn time_graph(
    backend: &CpuBackend,
    graph: &Graph<'_>,
    min_time: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut alloc = GraphAllocator::new()?;
    alloc.alloc(graph)?;
    backend.compute(graph)?; // warm-up
    let mut samples = compute_samples(backend, graph, min_time, 5)?;
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Times whole computations of an allocated `graph` for at least `min_time` and `min_samples`
/// computations: the microseconds of each, in the order taken.
pub(crate) fn compute_samples(
    backend: &CpuBackend,
    graph: &Graph<'_>,
    min_time: Duration,
    min_samples: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < min_time || samples.len() < min_samples {
        let t = Instant::now();
        backend.compute(graph)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// Fills a cache tensor with small deterministic values, quantized to its type.
fn fill(t: Tensor<'_>, ty: GgmlType, seed: u64) -> anyhow::Result<()> {
    let n = t.n_elements() as usize;
    let values: Vec<f32> = (0..n as u64)
        .map(|i| (((i * 2654435761 + seed * 97) % 2000) as f32 / 1000.0 - 1.0) * 0.5)
        .collect();
    let bytes = crate::ggml::gguf_writer::quantize(ty, &values, t.ne()[0] as usize)?;
    t.write::<u8>(&bytes);
    Ok(())
}
