//! The rolling key/value cache of one sequence.
//!
//! Each layer keeps `n_slots` rows of keys and of values (`head_dim * n_head_kv` elements each,
//! in F32, F16 or Q8_0). With a sliding window `W` no larger than the context, `n_slots = W` and
//! position `p` lives in slot `p % W`: generation continues indefinitely in constant memory,
//! because a query at position `i` only sees keys `j` with `i - W < j <= i`. With full attention
//! (or a window larger than the context) `n_slots` is the context length and a sequence ends when
//! it is full.
//!
//! The cache also plans each step's attention: which slots the new keys go to, which cached
//! positions every query may see (the mask), and whether a prefill chunk must read the cache
//! *before* writing to it (when writing would overwrite history the chunk's earlier queries
//! still need).

use crate::ggml::{BackendBuffer, BufferType, Context, GgmlType, Tensor};

/// Element type of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
    Q8_0,
}

impl KvType {
    /// The ggml type.
    pub fn ggml(self) -> GgmlType {
        match self {
            KvType::F32 => GgmlType::F32,
            KvType::F16 => GgmlType::F16,
            KvType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// The name used in configuration and logs (`f32`, `f16`, `q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Parses `f32`, `f16` or `q8_0`.
    pub fn parse(s: &str) -> Option<KvType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            _ => None,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KvType::parse(s)
            .ok_or_else(|| format!("unknown KV cache type '{s}' (expected f32, f16 or q8_0)"))
    }
}

/// The fixed shape of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Layers.
    pub n_layer: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Ring size.
    pub n_slots: usize,
    /// Attention window (`None`: full causal attention).
    pub window: Option<usize>,
    /// Element type.
    pub kv_type: KvType,
}

impl KvShape {
    /// Elements per slot row.
    pub fn row_elems(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Bytes of one slot row.
    pub fn row_bytes(&self) -> usize {
        self.kv_type
            .ggml()
            .row_bytes(self.row_elems() as u64)
            .expect("validated row") as usize
    }

    /// Bytes of one head's part of a row.
    pub fn head_bytes(&self) -> usize {
        self.kv_type
            .ggml()
            .row_bytes(self.head_dim as u64)
            .expect("validated row") as usize
    }

    /// Total bytes of keys and values for all layers.
    pub fn total_bytes(&self) -> usize {
        2 * self.n_layer * self.n_slots * self.row_bytes()
    }

    /// Whether the sequence can roll past `n_slots` positions (window fits in the ring).
    pub fn rolls(&self) -> bool {
        self.window.is_some_and(|w| w <= self.n_slots)
    }
}

/// How one step reads the cache for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum AttnSource {
    /// Write the new keys/values first, then attend over slots `0..n_view` of the ring.
    Direct {
        /// Number of leading slots the queries may see.
        n_view: usize,
    },
    /// Attend over cached rows `rows` (gathered in position order) followed by the new keys,
    /// then write the new keys/values.
    Gather {
        /// Slots of the history positions, oldest first.
        rows: Vec<i32>,
    },
}

/// The attention plan of one step of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnPlan {
    /// Position of the first new token.
    pub pos0: u64,
    /// Number of new tokens.
    pub n_new: usize,
    /// Slot each new token's key/value row is written to.
    pub write_slots: Vec<i64>,
    /// Where the keys come from.
    pub source: AttnSource,
    /// Key columns of the attention (`n_view`, or history + new for `Gather`).
    pub n_kv: usize,
    /// `[n_new][n_kv]` mask: true where query `i` may see key column `c`.
    pub visible: Vec<bool>,
}

/// Errors the cache reports for a step that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Full attention (or a window larger than the context) and no room left.
    #[error("context full: {used} of {n_slots} positions used, {requested} more requested")]
    ContextFull {
        used: u64,
        n_slots: usize,
        requested: usize,
    },
    /// The ring no longer holds the positions a cut-back sequence would need.
    #[error("cannot cut the cache back from {n_past} to {to} positions: the ring has moved on")]
    CannotTruncate { n_past: u64, to: u64 },
    /// A step larger than the ring.
    #[error("step of {0} tokens is larger than the cache ({1} slots)")]
    ChunkTooLarge(usize, usize),
}

/// Where a cache's layers live: all in CPU memory, or the layers from `first_gpu_layer` on in a
/// GPU's memory (the layers that GPU computes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPlacement {
    /// The GPU memory for the offloaded layers (`None`: every layer on the CPU).
    pub gpu: Option<BufferType>,
    /// The first layer in GPU memory (ignored without `gpu`).
    pub first_gpu_layer: usize,
}

impl KvPlacement {
    /// Every layer in CPU memory.
    pub fn cpu() -> KvPlacement {
        KvPlacement {
            gpu: None,
            first_gpu_layer: usize::MAX,
        }
    }

    /// Whether layer `l` lives in GPU memory.
    pub fn on_gpu(&self, l: usize) -> bool {
        self.gpu.is_some() && l >= self.first_gpu_layer
    }
}

/// The KV cache of one sequence: per-layer key and value rings plus the number of positions
/// processed so far.
pub struct KvCache {
    shape: KvShape,
    keys: Vec<Tensor<'static>>,
    values: Vec<Tensor<'static>>,
    n_past: u64,
    gpu_bytes: usize,
    _buffers: Vec<BackendBuffer>,
    _ctxs: Vec<Context>,
}

impl KvCache {
    /// Allocates a zeroed cache of `shape`, each layer where `placement` says.
    pub fn new(shape: KvShape, placement: &KvPlacement) -> anyhow::Result<KvCache> {
        anyhow::ensure!(shape.n_slots > 0, "KV cache needs at least one slot");
        anyhow::ensure!(
            shape
                .kv_type
                .ggml()
                .row_bytes(shape.head_dim as u64)
                .is_some(),
            "KV cache type {:?} needs a head dimension that is a multiple of {}",
            shape.kv_type,
            shape.kv_type.ggml().block_size()
        );
        // One context (and buffer) for the CPU's layers, one for the GPU's.
        let n_gpu = (0..shape.n_layer).filter(|&l| placement.on_gpu(l)).count();
        let (cpu_ctx, gpu_ctx) = (
            Context::new(
                (2 * (shape.n_layer - n_gpu) + 1) * crate::ggml::tensor_overhead(),
                true,
            )?,
            Context::new((2 * n_gpu + 1) * crate::ggml::tensor_overhead(), true)?,
        );
        let mut keys = Vec::with_capacity(shape.n_layer);
        let mut values = Vec::with_capacity(shape.n_layer);
        let ne = [shape.row_elems() as i64, shape.n_slots as i64];
        for l in 0..shape.n_layer {
            let ctx = if placement.on_gpu(l) {
                &gpu_ctx
            } else {
                &cpu_ctx
            };
            // SAFETY: the contexts live in the returned cache as long as the handles.
            keys.push(unsafe {
                ctx.new_tensor(shape.kv_type.ggml(), &ne)
                    .set_name(&format!("cache_k_l{l}"))
                    .detach()
            });
            values.push(unsafe {
                ctx.new_tensor(shape.kv_type.ggml(), &ne)
                    .set_name(&format!("cache_v_l{l}"))
                    .detach()
            });
        }
        let mut buffers = Vec::new();
        if n_gpu < shape.n_layer {
            buffers.push(BufferType::cpu().alloc_context_tensors(&cpu_ctx)?);
        }
        let mut gpu_bytes = 0;
        if let (Some(gpu), true) = (placement.gpu, n_gpu > 0) {
            let b = gpu.alloc_context_tensors(&gpu_ctx).map_err(|e| {
                anyhow::anyhow!("{e} for a sequence's KV cache (offload fewer layers)")
            })?;
            gpu_bytes = b.size();
            buffers.push(b);
        }
        Ok(KvCache {
            shape,
            keys,
            values,
            n_past: 0,
            gpu_bytes,
            _buffers: buffers,
            _ctxs: vec![cpu_ctx, gpu_ctx],
        })
    }

    /// Bytes of this cache in GPU memory.
    pub fn gpu_bytes(&self) -> usize {
        self.gpu_bytes
    }

    /// The cache's shape.
    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    /// Positions processed so far (the next token's position).
    pub fn n_past(&self) -> u64 {
        self.n_past
    }

    /// Bytes of cache memory (constant for the cache's life).
    pub fn bytes(&self) -> usize {
        self.shape.total_bytes()
    }

    /// Forgets every position so the cache can serve a new sequence.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Whether the cache can be cut back to its first `n` positions and continued from there:
    /// the ring must still hold every position a query at `n` sees (true until the ring has
    /// wrapped, or when nothing is cut).
    pub fn can_truncate(&self, n: u64) -> bool {
        if n > self.n_past {
            return false;
        }
        if n == self.n_past || n == 0 {
            return true;
        }
        // The ring holds positions `oldest_kept..n_past`; a query at `n` sees keys from
        // `oldest_needed` on (and later queries need no earlier ones).
        let oldest_kept = self.n_past.saturating_sub(self.shape.n_slots as u64);
        let window = self.shape.window.map_or(u64::MAX, |w| w as u64);
        let oldest_needed = (n + 1).saturating_sub(window);
        oldest_needed >= oldest_kept
    }

    /// Cuts the cache back to its first `n` positions (see [`KvCache::can_truncate`]); slots
    /// of later positions are overwritten as the sequence continues.
    pub fn truncate(&mut self, n: u64) -> Result<(), KvError> {
        if !self.can_truncate(n) {
            return Err(KvError::CannotTruncate {
                n_past: self.n_past,
                to: n,
            });
        }
        self.n_past = n;
        Ok(())
    }

    /// Layer `l`'s key ring, `[row_elems, n_slots]`.
    pub fn keys(&self, l: usize) -> Tensor<'_> {
        self.keys[l]
    }

    /// Layer `l`'s value ring, `[row_elems, n_slots]`.
    pub fn values(&self, l: usize) -> Tensor<'_> {
        self.values[l]
    }

    /// Largest number of tokens one step may add.
    pub fn max_step(&self) -> usize {
        self.shape.n_slots
    }

    /// How many more positions fit (`None`: unlimited, the ring rolls).
    pub fn remaining(&self) -> Option<u64> {
        if self.shape.rolls() {
            None
        } else {
            Some(self.shape.n_slots as u64 - self.n_past)
        }
    }

    /// Plans a step adding `n_new` tokens at the next positions. Does not change the cache.
    pub fn plan(&self, n_new: usize) -> Result<AttnPlan, KvError> {
        let s = &self.shape;
        let n_slots = s.n_slots;
        if n_new == 0 || n_new > n_slots {
            return Err(KvError::ChunkTooLarge(n_new, n_slots));
        }
        let pos0 = self.n_past;
        let end = pos0 + n_new as u64;
        if !s.rolls() && end > n_slots as u64 {
            return Err(KvError::ContextFull {
                used: pos0,
                n_slots,
                requested: n_new,
            });
        }
        let window = s.window.map(|w| w as u64).unwrap_or(u64::MAX);
        let sees = |query: u64, key: u64| key <= query && query - key < window;
        let write_slots: Vec<i64> = (pos0..end).map(|p| (p % n_slots as u64) as i64).collect();

        // Writing first loses nothing any query of this step needs when one token is added,
        // when the ring has not wrapped yet, or when the ring is at least `n_new - 1` slots
        // larger than the window (as for blocks offloaded to a GPU, see `engine::kv_shape`).
        let roomy = window != u64::MAX && n_slots as u64 >= window + n_new as u64 - 1;
        if n_new == 1 || end <= n_slots as u64 || roomy {
            let n_view = end.min(n_slots as u64) as usize;
            // Position held by slot `c` once the new rows are written.
            let slot_pos = |c: usize| {
                let c = c as u64;
                c + (end - 1 - c) / n_slots as u64 * n_slots as u64
            };
            let mut visible = vec![false; n_new * n_view];
            for i in 0..n_new {
                let q = pos0 + i as u64;
                for c in 0..n_view {
                    visible[i * n_view + c] = sees(q, slot_pos(c));
                }
            }
            Ok(AttnPlan {
                pos0,
                n_new,
                write_slots,
                source: AttnSource::Direct { n_view },
                n_kv: n_view,
                visible,
            })
        } else {
            // History the first query still sees, oldest first; then the new tokens.
            let first = pos0.saturating_sub(window.min(n_slots as u64) - 1);
            let rows: Vec<i32> = (first..pos0).map(|p| (p % n_slots as u64) as i32).collect();
            let n_kv = rows.len() + n_new;
            let mut visible = vec![false; n_new * n_kv];
            for i in 0..n_new {
                let q = pos0 + i as u64;
                for c in 0..n_kv {
                    visible[i * n_kv + c] = sees(q, first + c as u64);
                }
            }
            Ok(AttnPlan {
                pos0,
                n_new,
                write_slots,
                source: AttnSource::Gather { rows },
                n_kv,
                visible,
            })
        }
    }

    /// Records that a planned step ran: its `n_new` positions are now cached.
    pub fn commit(&mut self, n_new: usize) {
        self.n_past += n_new as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(n_slots: usize, window: Option<usize>) -> KvCache {
        let shape = KvShape {
            n_layer: 1,
            head_dim: 32,
            n_head_kv: 1,
            n_slots,
            window,
            kv_type: KvType::F32,
        };
        KvCache::new(shape, &KvPlacement::cpu()).unwrap()
    }

    #[test]
    fn a_ring_larger_than_the_window_stores_chunks_first() {
        // 10 slots, window 4: chunks of up to 7 tokens never overwrite what their queries see.
        let shape = KvShape {
            n_layer: 1,
            head_dim: 32,
            n_head_kv: 1,
            n_slots: 10,
            window: Some(4),
            kv_type: KvType::F32,
        };
        let mut c = KvCache::new(shape, &KvPlacement::cpu()).unwrap();
        c.commit(23);
        let plan = c.plan(7).unwrap();
        assert!(matches!(plan.source, AttnSource::Direct { n_view: 10 }));
        assert_eq!(plan.write_slots, vec![3, 4, 5, 6, 7, 8, 9]);
        // After the writes slot s holds position 20 + s (23..29 just written, 20..22 kept).
        let slot_pos = |s: u64| 20 + s;
        for i in 0..7u64 {
            let q = 23 + i;
            let seen: Vec<u64> = (0..10)
                .filter(|&s| plan.visible[i as usize * 10 + s as usize])
                .map(slot_pos)
                .collect();
            let mut want: Vec<u64> = (q - 3..=q).collect();
            want.sort_by_key(|&p| p % 10);
            assert_eq!(seen, want, "query {q}");
        }
        // One token more than the ring allows for this window: the history is gathered.
        assert!(matches!(
            c.plan(8).unwrap().source,
            AttnSource::Gather { .. }
        ));
    }

    #[test]
    fn decode_past_the_window_sees_exactly_the_window() {
        let mut c = cache(4, Some(4));
        c.commit(9);
        let plan = c.plan(1).unwrap();
        assert_eq!(plan.write_slots, vec![1]);
        assert_eq!(plan.source, AttnSource::Direct { n_view: 4 });
        // slots hold positions 8, 9(new), 6, 7: all within the window of position 9.
        assert_eq!(plan.visible, vec![true; 4]);
    }

    #[test]
    fn chunk_that_would_overwrite_history_gathers_first() {
        let mut c = cache(4, Some(4));
        c.commit(5);
        let plan = c.plan(3).unwrap();
        assert_eq!(plan.write_slots, vec![1, 2, 3]);
        // query 5 sees 2,3,4,5; history 2,3,4 (slots 2,3,0), then new 5,6,7
        assert_eq!(
            plan.source,
            AttnSource::Gather {
                rows: vec![2, 3, 0]
            }
        );
        let rows: Vec<Vec<bool>> = plan.visible.chunks(6).map(|r| r.to_vec()).collect();
        assert_eq!(rows[0], vec![true, true, true, true, false, false]);
        assert_eq!(rows[1], vec![false, true, true, true, true, false]);
        assert_eq!(rows[2], vec![false, false, true, true, true, true]);
    }

    #[test]
    fn first_chunk_is_causal_and_windowed() {
        let c = cache(8, Some(2));
        let plan = c.plan(3).unwrap();
        assert_eq!(plan.source, AttnSource::Direct { n_view: 3 });
        assert_eq!(
            plan.visible,
            vec![true, false, false, true, true, false, false, true, true]
        );
    }

    #[test]
    fn full_attention_fills_then_reports_context_full() {
        let mut c = cache(4, None);
        c.commit(3);
        assert!(c.plan(1).is_ok());
        assert!(matches!(c.plan(2), Err(KvError::ContextFull { .. })));
        c.reset();
        assert_eq!(c.n_past(), 0);
        assert!(c.plan(4).is_ok());
    }

    #[test]
    fn truncation_is_allowed_while_the_ring_holds_what_the_next_query_needs() {
        let mut c = cache(4, Some(4));
        c.commit(4);
        assert!(c.can_truncate(2), "not wrapped yet: any prefix");
        assert!(c.can_truncate(0));
        assert!(!c.can_truncate(5));
        c.commit(2); // positions 2..=5 in the ring (0 and 1 overwritten by 4 and 5)
        assert!(c.can_truncate(6));
        assert!(c.can_truncate(5), "a query at 5 sees 2..=5, all still held");
        assert!(
            !c.can_truncate(4),
            "a query at 4 would see position 1, overwritten"
        );
        assert!(c.truncate(3).is_err());
        c.truncate(5).unwrap();
        assert_eq!(c.n_past(), 5);
        let mut full = cache(8, None);
        full.commit(6);
        full.truncate(3).unwrap();
        assert_eq!(full.n_past(), 3);
        let plan = full.plan(2).unwrap();
        assert_eq!(plan.pos0, 3);
        assert_eq!(plan.write_slots, vec![3, 4]);
    }

    #[test]
    fn cache_memory_is_constant() {
        let mut c = cache(4, Some(4));
        let before = c.bytes();
        for _ in 0..100 {
            c.plan(1).unwrap();
            c.commit(1);
        }
        assert_eq!(c.bytes(), before);
        assert_eq!(c.remaining(), None);
    }
}
