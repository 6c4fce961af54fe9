//! The Mistral forward pass as a ggml graph, over a batch of tokens from several sequences.
//!
//! ```text
//! x = embed(tokens)
//! for each block:
//!     h = rms_norm(x) * attn_norm
//!     q, k, v = h·Wq, h·Wk, h·Wv            (q: n_head heads, k/v: n_head_kv heads)
//!     q, k = rope(q, pos), rope(k, pos)      (ggml "normal" mode: adjacent pairs)
//!     per sequence: store k, v in its rolling cache; attend over its window (GQA)
//!     x = x + attn·Wo
//!     h = rms_norm(x) * ffn_norm
//!     x = x + (silu(h·Wgate) * (h·Wup))·Wdown
//! logits = (rms_norm(x) * output_norm)·Wout   (only for the rows asked for)
//! ```
//!
//! Weight matrices are read once per step for all tokens of all sequences; only attention is
//! per sequence, since each sequence has its own cache.

use super::{HParams, Weights};
use crate::ggml::{Context, GgmlType, Graph, OpHandle, Tensor};
use crate::kernels::ggml_op::{AttentionOp, MatmulOp, QuantizeOp};
use crate::kernels::matmul::{Matmul, PackedMatrix};
use crate::kernels::{self, AttnParams, Kernel};
use crate::kv_cache::{AttnPlan, AttnSource, KvCache, KvShape, KvType};
use std::sync::Arc;

/// How attention is computed.
#[derive(Clone, Copy, Debug)]
pub enum AttentionImpl {
    /// mistrald's native kernel (vendor/kernels): reads the rolling cache in place, each
    /// cached row once per group of query heads, no mask.
    Native(Kernel),
    /// ggml's `ggml_flash_attn_ext` over the ring with a mask (the reference path).
    Ggml,
}

impl AttentionImpl {
    /// A short name (`native (avx512)`, `ggml`).
    pub fn describe(&self) -> String {
        match self {
            AttentionImpl::Native(k) => format!("native ({})", k.path().name()),
            AttentionImpl::Ggml => "ggml flash_attn_ext".into(),
        }
    }

    /// Whether the native kernel supports attention of `hp`'s shape over a cache of `shape`.
    pub fn native_supports(hp: &HParams, shape: &KvShape) -> bool {
        kernel_params(hp, shape, 0, 1).validate_layout().is_ok()
    }
}

/// How a step's graph computes attention.
#[derive(Clone, Copy, Debug)]
pub struct StepCompute {
    /// The attention implementation.
    pub attention: AttentionImpl,
    /// Threads the graph will be computed with (sizes the native kernel's scratch memory).
    pub n_threads: usize,
    /// The native matrix kernel for the products whose matrices were packed for it
    /// ([`Weights::packed`]); `None`: every product through ggml.
    pub matmul: Option<Matmul>,
    /// The first block offloaded to a GPU (`n_layer`: none). Those blocks' attention is
    /// ggml's (the GPU runs it over the ring with the window mask); their matrices are never
    /// packed, so their products are ggml's too.
    pub first_gpu_layer: usize,
}

/// One sequence's share of a batch.
pub struct SeqInput<'a> {
    /// The sequence's cache (read, and written by the graph).
    pub cache: &'a KvCache,
    /// The attention plan for this step (from [`KvCache::plan`]).
    pub plan: &'a AttnPlan,
    /// Index of this sequence's first token in the batch.
    pub first_token: usize,
}

/// The graph of one step and the input tensors to fill before computing it.
pub struct StepGraph<'g> {
    /// The graph.
    pub graph: Graph<'g>,
    /// Token ids, I32 `[n_tokens]`.
    pub tokens: Tensor<'g>,
    /// Absolute positions, I32 `[n_tokens]`.
    pub positions: Tensor<'g>,
    /// Batch rows whose logits are computed, I32 `[n_out]`.
    pub out_rows: Tensor<'g>,
    /// Per sequence: cache slots to write, I64 `[n_new]`.
    pub write_slots: Vec<Tensor<'g>>,
    /// Per sequence (ggml attention only): mask, F16 `[n_kv, n_new]`.
    pub masks: Vec<Option<Tensor<'g>>>,
    /// Per sequence (gather plans only): cache rows to read, I32 `[n_hist]`.
    pub gather_rows: Vec<Option<Tensor<'g>>>,
    /// Logits, F32 `[n_vocab, n_out]`.
    pub logits: Tensor<'g>,
    /// Custom operations of the graph (kept alive until it has been computed).
    pub ops: Vec<OpHandle>,
}

/// Upper bound on graph nodes for a step over `n_seqs` sequences.
pub fn graph_size(hp: &HParams, n_seqs: usize) -> usize {
    64 + hp.n_layer * (40 + 24 * n_seqs)
}

/// Matrix products of one step: through the native kernels for packed matrices (for more than
/// 8 rows one quantization node per input, shared by the products that read it; for up to 8
/// each product's threads quantize them), else ggml's `mul_mat`.
struct Products<'g> {
    ctx: &'g Context,
    matmul: Option<Matmul>,
    n_threads: usize,
}

impl<'g> Products<'g> {
    /// `w·x` for `x` `[k, n]` f32; `xq` caches `x`'s quantization node across calls.
    fn mul(
        &self,
        ops: &mut Vec<OpHandle>,
        w: Tensor<'_>,
        packed: &Option<Arc<PackedMatrix>>,
        x: Tensor<'g>,
        xq: &mut Option<Tensor<'g>>,
    ) -> Tensor<'g> {
        let ctx = self.ctx;
        let (ne, nb) = (x.ne(), x.nb());
        let native = match (self.matmul, packed) {
            (Some(m), Some(p))
                if ne[2] == 1 && ne[3] == 1 && nb[0] == 4 && x.ty() == GgmlType::F32 =>
            {
                Some((m, p))
            }
            _ => None,
        };
        let Some((m, p)) = native else {
            return ctx.mul_mat(w, x);
        };
        let rows = ne[1] as usize;
        if rows <= kernels::matmul::MAX_ROWS {
            // Decode and small batches: every thread quantizes the few rows itself (no
            // quantization node, one barrier less per input).
            let op = MatmulOp::with_f32_input(m, p.clone(), rows, self.n_threads)
                .expect("activation shape of a packed matrix");
            let (y, handle) =
                ctx.custom_op([p.n_rows() as i64, rows as i64, 1, 1], &[x], Box::new(op));
            ops.push(handle);
            return y;
        }
        let q = match *xq {
            Some(q) => q,
            None => {
                let op = QuantizeOp::new(rows, ne[0] as usize)
                    .expect("activation shape of a packed matrix");
                let len = op.output_len() as i64;
                let (q, handle) = ctx.custom_op([len, 1, 1, 1], &[x], Box::new(op));
                ops.push(handle);
                *xq = Some(q);
                q
            }
        };
        let op = MatmulOp::new(m, p.clone(), rows).expect("activation shape of a packed matrix");
        let (y, handle) = ctx.custom_op([p.n_rows() as i64, rows as i64, 1, 1], &[q], Box::new(op));
        ops.push(handle);
        y
    }
}

/// Builds the graph for `n_tokens` tokens belonging to `seqs` (in batch order), producing the
/// logits of `n_out` batch rows.
pub fn build_step<'g>(
    ctx: &'g Context,
    hp: &HParams,
    w: &Weights<'_>,
    n_tokens: usize,
    seqs: &[SeqInput<'_>],
    n_out: usize,
    compute: StepCompute,
) -> StepGraph<'g> {
    let StepCompute {
        attention,
        n_threads,
        matmul,
        first_gpu_layer,
    } = compute;
    let layer_attention = |l: usize| {
        if l >= first_gpu_layer {
            AttentionImpl::Ggml
        } else {
            attention
        }
    };
    let products = Products {
        ctx,
        matmul,
        n_threads,
    };
    let no_pack = super::weights::PackedLayer::default();
    let n = n_tokens as i64;
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let mut graph = ctx.new_graph(graph_size(hp, seqs.len()));

    let tokens = ctx
        .new_tensor(GgmlType::I32, &[n])
        .set_name("tokens")
        .mark_input();
    let positions = ctx
        .new_tensor(GgmlType::I32, &[n])
        .set_name("positions")
        .mark_input();
    let out_rows = ctx
        .new_tensor(GgmlType::I32, &[n_out as i64])
        .set_name("out_rows")
        .mark_input();
    let mut write_slots = Vec::new();
    let mut masks = Vec::new();
    let mut gather_rows = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let p = seq.plan;
        write_slots.push(
            ctx.new_tensor(GgmlType::I64, &[p.n_new as i64])
                .set_name(&format!("slots_s{s}"))
                .mark_input(),
        );
        // Masks and gathered rows are inputs of ggml's attention only (all blocks', or the
        // offloaded ones').
        let ggml = matches!(attention, AttentionImpl::Ggml) || first_gpu_layer < hp.n_layer;
        masks.push(ggml.then(|| {
            ctx.new_tensor(GgmlType::F16, &[p.n_kv as i64, p.n_new as i64])
                .set_name(&format!("mask_s{s}"))
                .mark_input()
        }));
        gather_rows.push(match &p.source {
            AttnSource::Gather { rows } if ggml => Some(
                ctx.new_tensor(GgmlType::I32, &[rows.len() as i64])
                    .set_name(&format!("gather_s{s}"))
                    .mark_input(),
            ),
            _ => None,
        });
    }

    let mut ops = Vec::new();
    let mut x = ctx.get_rows(w.tok_embd, tokens);
    for (l, lw) in w.layers.iter().enumerate() {
        let pw = w.packed.layers.get(l).unwrap_or(&no_pack);
        let mut mm =
            |w: Tensor<'_>, p: &Option<Arc<PackedMatrix>>, x, xq: &mut Option<Tensor<'g>>| {
                products.mul(&mut ops, w, p, x, xq)
            };
        // --- attention ---
        let h = ctx.mul(ctx.rms_norm(x, hp.rms_eps), lw.attn_norm);
        let hq = &mut None;
        let q = ctx.reshape(mm(lw.wq, &pw.wq, h, hq), &[hd, n_head, n]);
        let k = ctx.reshape(mm(lw.wk, &pw.wk, h, hq), &[hd, n_head_kv, n]);
        let v = ctx.reshape(mm(lw.wv, &pw.wv, h, hq), &[hd, n_head_kv, n]);
        let q = ctx.rope_normal(
            q,
            positions,
            hp.n_rot as i32,
            hp.n_ctx_train as i32,
            hp.rope_freq_base,
        );
        let k = ctx.rope_normal(
            k,
            positions,
            hp.n_rot as i32,
            hp.n_ctx_train as i32,
            hp.rope_freq_base,
        );

        let mut attn: Option<Tensor<'g>> = None;
        for (s, seq) in seqs.iter().enumerate() {
            let out = match (layer_attention(l), masks[s]) {
                (AttentionImpl::Native(kernel), _) => native_attention(
                    ctx,
                    &mut graph,
                    &mut ops,
                    hp,
                    l,
                    (q, k, v),
                    seq,
                    write_slots[s],
                    kernel,
                    n_threads,
                ),
                (AttentionImpl::Ggml, Some(mask)) => attention_for_sequence(
                    ctx,
                    &mut graph,
                    hp,
                    l,
                    q,
                    k,
                    v,
                    seq,
                    write_slots[s],
                    mask,
                    gather_rows[s],
                ),
                (AttentionImpl::Ggml, None) => unreachable!("ggml attention without a mask"),
            };
            attn = Some(match attn {
                None => out,
                Some(prev) => ctx.concat(prev, out, 1),
            });
        }
        let attn = attn.expect("a step has at least one sequence");
        let mut mm =
            |w: Tensor<'_>, p: &Option<Arc<PackedMatrix>>, x, xq: &mut Option<Tensor<'g>>| {
                products.mul(&mut ops, w, p, x, xq)
            };
        x = ctx.add(x, mm(lw.wo, &pw.wo, attn, &mut None));

        // --- feed-forward ---
        let h = ctx.mul(ctx.rms_norm(x, hp.rms_eps), lw.ffn_norm);
        let hq = &mut None;
        let ff = ctx.swiglu(
            mm(lw.w_gate, &pw.w_gate, h, hq),
            mm(lw.w_up, &pw.w_up, h, hq),
        );
        x = ctx.add(x, mm(lw.w_down, &pw.w_down, ff, &mut None));
    }

    // Only the rows whose logits are wanted go through the output head.
    let x = if n_out == n_tokens {
        x
    } else {
        ctx.get_rows(x, out_rows)
    };
    let x = ctx.mul(ctx.rms_norm(x, hp.rms_eps), w.output_norm);
    let logits = products
        .mul(&mut ops, w.output, &w.packed.output, x, &mut None)
        .set_name("logits")
        .mark_output();
    graph.expand(logits);
    StepGraph {
        graph,
        tokens,
        positions,
        out_rows,
        write_slots,
        masks,
        gather_rows,
        logits,
        ops,
    }
}

/// Attention of one sequence's tokens in layer `l`: stores its keys/values in the cache and
/// returns the attention output `[n_head*head_dim, n_new]`.
#[allow(clippy::too_many_arguments)]
fn attention_for_sequence<'g>(
    ctx: &'g Context,
    graph: &mut Graph<'g>,
    hp: &HParams,
    l: usize,
    q: Tensor<'g>,
    k: Tensor<'g>,
    v: Tensor<'g>,
    seq: &SeqInput<'_>,
    write_slots: Tensor<'g>,
    mask: Tensor<'g>,
    gather_rows: Option<Tensor<'g>>,
) -> Tensor<'g> {
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let plan = seq.plan;
    let n_new = plan.n_new as i64;
    let first = seq.first_token;
    let scale = 1.0 / (hp.head_dim as f32).sqrt();

    // This sequence's rows of q, k, v.
    let q_s = ctx.view(
        q,
        &[hd, n_head, n_new],
        &[q.nb()[1], q.nb()[2]],
        first * q.nb()[2],
    );
    let k_rows = token_rows(ctx, k, first, n_new);
    let v_rows = token_rows(ctx, v, first, n_new);
    let q_s = ctx.permute(q_s, [0, 2, 1, 3]); // [hd, n_new, n_head]

    let (cache_k, cache_v) = (seq.cache.keys(l), seq.cache.values(l));
    let out = match (&plan.source, gather_rows) {
        (AttnSource::Direct { n_view }, _) => {
            // Store first, then attend over the first n_view slots of the ring.
            let kc = ctx.set_rows(cache_k, k_rows, write_slots);
            let vc = ctx.set_rows(cache_v, v_rows, write_slots);
            let heads = |c: Tensor<'g>| {
                let row = c.nb()[1];
                let head = c.ty().row_bytes(hd as u64).unwrap() as usize;
                ctx.view(c, &[hd, *n_view as i64, n_head_kv], &[row, head], 0)
            };
            ctx.flash_attn(q_s, heads(kc), heads(vc), mask, scale)
        }
        (AttnSource::Gather { rows }, Some(gather)) => {
            // Read the history (dequantized, in position order) before the new rows overwrite
            // it, append the new keys/values, attend, then store.
            let n_kv = rows.len() as i64 + n_new;
            // The new rows, copied once: read by the attention and stored afterwards.
            let (k_new, v_new) = (ctx.cont(k_rows), ctx.cont(v_rows));
            let all = |cache: Tensor<'_>, new: Tensor<'g>| -> Tensor<'g> {
                let hist: Tensor<'g> = ctx.get_rows(cache, gather);
                let joined = ctx.concat(hist, new, 1); // [row_elems, n_kv] f32
                ctx.view(
                    joined,
                    &[hd, n_kv, n_head_kv],
                    &[joined.nb()[1], hd as usize * 4],
                    0,
                )
            };
            let out = ctx.flash_attn(q_s, all(cache_k, k_new), all(cache_v, v_new), mask, scale);
            graph.expand(out);
            // Expanded after the attention, so the writes run after the reads.
            graph.expand(ctx.set_rows(cache_k, k_new, write_slots));
            graph.expand(ctx.set_rows(cache_v, v_new, write_slots));
            out
        }
        (AttnSource::Gather { .. }, None) => unreachable!("gather plan without gather rows"),
    };
    // [hd, n_head, n_new] -> [hd*n_head, n_new]
    ctx.reshape(out, &[hd * n_head, n_new])
}

/// Attention of one sequence's tokens in layer `l` with the native kernel: it reads the cached
/// history in place (before this step's rows are stored) plus the new keys/values, then the new
/// rows are written to the ring. Returns `[n_head*head_dim, n_new]`.
#[allow(clippy::too_many_arguments)]
fn native_attention<'g>(
    ctx: &'g Context,
    graph: &mut Graph<'g>,
    ops: &mut Vec<OpHandle>,
    hp: &HParams,
    l: usize,
    (q, k, v): (Tensor<'g>, Tensor<'g>, Tensor<'g>),
    seq: &SeqInput<'_>,
    write_slots: Tensor<'g>,
    kernel: Kernel,
    n_threads: usize,
) -> Tensor<'g> {
    let (hd, n_head) = (hp.head_dim as i64, hp.n_head as i64);
    let plan = seq.plan;
    let n_new = plan.n_new as i64;
    let first = seq.first_token;
    let q_s = token_rows(ctx, q, first, n_new);
    let k_rows = token_rows(ctx, k, first, n_new);
    let v_rows = token_rows(ctx, v, first, n_new);
    let (cache_k, cache_v) = (seq.cache.keys(l), seq.cache.values(l));
    let params = kernel_params(hp, seq.cache.shape(), plan.pos0, plan.n_new);
    // The engine checked this shape (`native_supports`) when it was created.
    let op = AttentionOp::new(kernel, &params, n_threads)
        .expect("attention shape accepted by the kernel");
    let (out, handle) = ctx.custom_op(
        [hd * n_head, n_new, 1, 1],
        &[q_s, k_rows, v_rows, cache_k, cache_v],
        Box::new(op),
    );
    ops.push(handle);
    graph.expand(out);
    // Expanded after the attention, so the writes run after the reads.
    graph.expand(ctx.set_rows(cache_k, k_rows, write_slots));
    graph.expand(ctx.set_rows(cache_v, v_rows, write_slots));
    out
}

/// Tokens `first..first + n` of a `[a, b, n_tokens]` tensor, as a `[a*b, n]` matrix (one row
/// per token; contiguous because the token dimension is the outermost).
fn token_rows<'g>(ctx: &'g Context, t: Tensor<'_>, first: usize, n: i64) -> Tensor<'g> {
    let ne = t.ne();
    let stride = t.nb()[2];
    ctx.view(t, &[ne[0] * ne[1], n], &[stride], first * stride)
}

/// The native kernel's description of one attention call over a cache of `shape`.
pub fn kernel_params(hp: &HParams, shape: &KvShape, pos0: u64, n_q: usize) -> AttnParams {
    AttnParams {
        head_dim: hp.head_dim,
        n_head: hp.n_head,
        n_head_kv: hp.n_head_kv,
        window: shape.window.unwrap_or(0),
        kv_type: match shape.kv_type {
            KvType::F32 => kernels::KvType::F32,
            KvType::F16 => kernels::KvType::F16,
            KvType::Q8_0 => kernels::KvType::Q8_0,
        },
        n_slots: shape.n_slots,
        slot_bytes: shape.row_bytes(),
        head_bytes: shape.head_bytes(),
        pos0,
        n_hist: pos0.min(shape.n_slots as u64) as usize,
        n_q,
        scale: 1.0 / (hp.head_dim as f32).sqrt(),
    }
}

/// Fills the masks and index inputs of a step from the plans.
pub fn fill_attention_inputs(step: &StepGraph<'_>, plans: &[&AttnPlan]) {
    const ZERO: u16 = 0x0000;
    const NEG_INF: u16 = 0xFC00;
    for (s, plan) in plans.iter().enumerate() {
        step.write_slots[s].write(&plan.write_slots);
        if let Some(m) = step.masks[s] {
            let mask: Vec<u16> = plan
                .visible
                .iter()
                .map(|&v| if v { ZERO } else { NEG_INF })
                .collect();
            m.write(&mask);
        }
        if let (Some(t), AttnSource::Gather { rows }) = (step.gather_rows[s], &plan.source) {
            t.write(rows);
        }
    }
}
