//! The weight tensors of a Mistral model, used in place from the memory-mapped GGUF file.

use super::offload::{self, GpuPlacement, GpuRequest};
use super::{HParams, MappedGguf};
use crate::ggml::gguf::{GgufFile, TensorInfo};
use crate::ggml::{BackendBuffer, BufferType, Context, GgmlType, RepackBufferType, Tensor};
use crate::kernels::matmul::{PackedMatrix, WeightType};
use anyhow::Context as _;
use std::sync::Arc;

/// One transformer block's weights.
#[derive(Clone, Copy)]
pub struct LayerWeights<'a> {
    /// RMSNorm scale before attention, `[n_embd]`.
    pub attn_norm: Tensor<'a>,
    /// Query projection, `[n_embd, n_head*head_dim]`.
    pub wq: Tensor<'a>,
    /// Key projection, `[n_embd, n_head_kv*head_dim]`.
    pub wk: Tensor<'a>,
    /// Value projection, `[n_embd, n_head_kv*head_dim]`.
    pub wv: Tensor<'a>,
    /// Attention output projection, `[n_head*head_dim, n_embd]`.
    pub wo: Tensor<'a>,
    /// RMSNorm scale before the feed-forward block, `[n_embd]`.
    pub ffn_norm: Tensor<'a>,
    /// SwiGLU gate projection, `[n_embd, n_ff]`.
    pub w_gate: Tensor<'a>,
    /// SwiGLU up projection, `[n_embd, n_ff]`.
    pub w_up: Tensor<'a>,
    /// SwiGLU down projection, `[n_ff, n_embd]`.
    pub w_down: Tensor<'a>,
}

/// All weights of the model.
pub struct Weights<'a> {
    /// Token embeddings, `[n_embd, n_vocab]`.
    pub tok_embd: Tensor<'a>,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights<'a>>,
    /// Final RMSNorm scale, `[n_embd]`.
    pub output_norm: Tensor<'a>,
    /// Output head, `[n_embd, n_vocab]` (the embedding matrix when the file ties them).
    pub output: Tensor<'a>,
    /// The matrices converted for mistrald's native matrix kernels (see
    /// [`LoadOptions::native_matmul`]); a product whose matrix is here runs natively.
    pub packed: PackedWeights,
}

/// One block's matrices in the native kernels' packed layout (`None`: used through ggml).
#[derive(Clone, Default)]
pub struct PackedLayer {
    /// Query projection.
    pub wq: Option<Arc<PackedMatrix>>,
    /// Key projection.
    pub wk: Option<Arc<PackedMatrix>>,
    /// Value projection.
    pub wv: Option<Arc<PackedMatrix>>,
    /// Attention output projection.
    pub wo: Option<Arc<PackedMatrix>>,
    /// SwiGLU gate projection.
    pub w_gate: Option<Arc<PackedMatrix>>,
    /// SwiGLU up projection.
    pub w_up: Option<Arc<PackedMatrix>>,
    /// SwiGLU down projection.
    pub w_down: Option<Arc<PackedMatrix>>,
}

/// The weight matrices converted for the native matrix kernels.
#[derive(Clone, Default)]
pub struct PackedWeights {
    /// Per block (empty when nothing was converted).
    pub layers: Vec<PackedLayer>,
    /// Output head.
    pub output: Option<Arc<PackedMatrix>>,
}

impl PackedWeights {
    /// Bytes of packed matrices.
    pub fn bytes(&self) -> u64 {
        let one = |m: &Option<Arc<PackedMatrix>>| m.as_ref().map_or(0, |m| m.bytes().len() as u64);
        self.layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .into_iter()
                    .map(one)
                    .sum::<u64>()
            })
            .sum::<u64>()
            + one(&self.output)
    }

    /// Whether any matrix was converted.
    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }
}

/// How weights are placed in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Convert the weight matrices ggml can repack (Q4_0, Q4_K, ... on AVX2/AVX-512/NEON) into
    /// its interleaved layout at load time (the default): about twice as fast matrix products
    /// on CPUs. Those weights then live in anonymous memory; their mapped pages are released
    /// as each is converted, so the process never holds two copies. Without it every weight is
    /// used in place from the memory map (for models that must stream from the page cache).
    pub repack: bool,
    /// Convert the Q4_0, Q8_0, Q4_K and Q6_K weight matrices into the packed layout of
    /// mistrald's own matrix kernels (`vendor/kernels/mm_*`), which the engine then uses for
    /// their products (the default). Like the repack, the converted matrices live in anonymous
    /// memory and their mapped pages are released as each is converted. Matrices of other
    /// types keep to `repack`.
    pub native_matmul: bool,
    /// Which blocks to offload to a GPU (see [`offload::plan`]). Offloaded weights are copied
    /// into the GPU's memory as they are read and their mapped pages released, so a board
    /// whose GPU shares the system memory (Jetson) never holds them twice.
    pub gpu: GpuRequest,
}

impl Default for LoadOptions {
    /// Repacked and native matrices; offload per `MISTRALD_GPU_LAYERS`/`MISTRALD_DEVICE`, else
    /// as many blocks as fit on the first GPU (none without one). An invalid
    /// `MISTRALD_GPU_LAYERS` is logged and ignored here; [`GpuRequest::from_env`] reports it.
    fn default() -> Self {
        let gpu = GpuRequest::from_env().unwrap_or_else(|e| {
            log::warn!("{e}; ignored");
            GpuRequest::default()
        });
        LoadOptions {
            repack: true,
            native_matmul: true,
            gpu,
        }
    }
}

/// The blocks a GPU computes and their weights in its memory.
pub struct GpuWeights {
    /// Which blocks, on which device.
    pub placement: GpuPlacement,
    /// Bytes of weights in the GPU's memory.
    pub bytes: u64,
    _buffer: BackendBuffer,
}

/// A loaded model: hyper-parameters and weights, backed by the memory-mapped file.
pub struct Model {
    /// Hyper-parameters.
    pub hparams: HParams,
    weights: Weights<'static>,
    repacked_bytes: u64,
    gpu: Option<GpuWeights>,
    _ctx: Context,
    _repack_buffer: Option<BackendBuffer>,
    _buffer: BackendBuffer,
    file: MappedGguf,
}

/// Tensors the loader recognises but mistrald does not run (mixture-of-experts layers).
const UNSUPPORTED_TENSORS: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_gate_inp"];

impl Model {
    /// Validates every weight tensor of `file` against the hyper-parameters and places them:
    /// in place in the memory map, or repacked (see [`LoadOptions`], default). Errors name the
    /// file, the tensor and the problem.
    pub fn load(file: MappedGguf) -> anyhow::Result<Model> {
        Model::load_with(file, LoadOptions::default())
    }

    /// [`Model::load`] with options.
    pub fn load_with(file: MappedGguf, opts: LoadOptions) -> anyhow::Result<Model> {
        Model::load_reporting(file, opts, &mut |_, _| {})
    }

    /// [`Model::load_with`], calling `progress(done, total)` with the bytes of weights placed
    /// so far as the repack converts them (the slow part of loading a big model).
    pub fn load_reporting(
        file: MappedGguf,
        opts: LoadOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> anyhow::Result<Model> {
        let g = &file.info;
        let hp = HParams::from_gguf(g)?;
        if hp.n_vocab == 0 {
            return Err(g
                .error(
                    "missing tensor 'token_embd.weight' (is this a vocabulary-only file?)".into(),
                )
                .into());
        }
        if let Some(t) = g
            .tensors
            .iter()
            .find(|t| UNSUPPORTED_TENSORS.iter().any(|u| t.name.contains(u)))
        {
            return Err(g
                .error(format!(
                    "tensor '{}': mixture-of-experts models are not supported",
                    t.name
                ))
                .into());
        }
        let placement = offload::plan(g, &hp, &opts.gpu)?;
        let n_tensors = 3 + 9 * hp.n_layer + 1;
        let ctx = Context::new(n_tensors * crate::ggml::tensor_overhead(), true)?;
        let data_len = (g.file_size - g.data_offset) as usize;
        // SAFETY: the buffer points into `file.mmap`, which `Model` owns and drops after it.
        let buffer = unsafe {
            BackendBuffer::from_host_memory(
                file.mmap.as_ptr().add(g.data_offset as usize),
                data_len,
            )
        }
        .with_context(|| format!("{}: cannot use the tensor data in place", g.path.display()))?;

        let (e, q, kv, ff, v) = (
            hp.n_embd as u64,
            (hp.n_head * hp.head_dim) as u64,
            hp.kv_row() as u64,
            hp.n_ff as u64,
            hp.n_vocab as u64,
        );
        let repack = if opts.repack {
            RepackBufferType::find()
        } else {
            None
        };
        let mut to_repack: Vec<(Tensor<'static>, u64)> = Vec::new();
        // Matrices for the native kernels.
        let mut to_pack: Vec<ToPack> = Vec::new();
        // Tensors for the GPU's memory, with their data offsets.
        let mut to_upload: Vec<(Tensor<'static>, u64)> = Vec::new();
        let mut load =
            |name: &str, ne: &[u64], norm: bool, on_gpu: bool| -> anyhow::Result<Tensor<'static>> {
                let info = g
                    .tensor(name)
                    .ok_or_else(|| g.error(format!("missing tensor '{name}'")))?;
                check_tensor(g, info, ne, norm)?;
                let dims: Vec<i64> = ne.iter().map(|&d| d as i64).collect();
                // SAFETY: `ctx` moves into the returned `Model` together with these handles.
                let t = unsafe { ctx.new_tensor(info.ty, &dims).set_name(name).detach() };
                if on_gpu {
                    to_upload.push((t, info.offset));
                    return Ok(t);
                }
                // The embedding matrix is read by row lookups, which need the file's layout.
                let matrix = ne.len() == 2 && name != "token_embd.weight";
                let native =
                    WeightType::from_ggml(info.ty).filter(|_| matrix && opts.native_matmul);
                match (&repack, native) {
                    (_, Some(ty)) => {
                        // Also placed in place, so the tensor stays valid for ggml (its pages are
                        // released once packed, and read back from the file if ever used).
                        buffer.place(t, info.offset as usize)?;
                        to_pack.push(ToPack {
                            name: name.to_string(),
                            ty,
                            rows: ne[1] as usize,
                            cols: ne[0] as usize,
                            offset: info.offset,
                            size: info.size,
                            release: true,
                        });
                    }
                    (Some(r), None) if matrix && r.supports(t) => to_repack.push((t, info.offset)),
                    _ => buffer.place(t, info.offset as usize)?,
                }
                Ok(t)
            };
        let output_on_gpu = placement.is_some_and(|p| p.output);
        let tok_embd = load("token_embd.weight", &[e, v], false, false)?;
        let output_norm = load("output_norm.weight", &[e], true, output_on_gpu)?;
        let tied = g.tensor("output.weight").is_none();
        let mut output = if tied {
            tok_embd
        } else {
            load("output.weight", &[e, v], false, output_on_gpu)?
        };
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let gpu = placement.is_some_and(|p| p.has_layer(i));
            layers.push(LayerWeights {
                attn_norm: load(&n("attn_norm"), &[e], true, gpu)?,
                wq: load(&n("attn_q"), &[e, q], false, gpu)?,
                wk: load(&n("attn_k"), &[e, kv], false, gpu)?,
                wv: load(&n("attn_v"), &[e, kv], false, gpu)?,
                wo: load(&n("attn_output"), &[q, e], false, gpu)?,
                ffn_norm: load(&n("ffn_norm"), &[e], true, gpu)?,
                w_gate: load(&n("ffn_gate"), &[e, ff], false, gpu)?,
                w_up: load(&n("ffn_up"), &[e, ff], false, gpu)?,
                w_down: load(&n("ffn_down"), &[ff, e], false, gpu)?,
            });
        }
        if tied && output_on_gpu {
            // The GPU's copy of a tied head; the CPU keeps the embedding for its row lookups.
            let info = g.tensor("token_embd.weight").expect("loaded above");
            // SAFETY: as in `load`.
            output = unsafe {
                ctx.new_tensor(info.ty, &[e as i64, v as i64])
                    .set_name("output.weight")
                    .detach()
            };
            to_upload.push((output, info.offset));
        }
        // A tied output head is packed from the embedding matrix, whose pages the row lookups
        // keep reading (so they stay).
        if tied && !output_on_gpu && opts.native_matmul {
            let info = g.tensor("token_embd.weight").expect("loaded above");
            if let Some(ty) = WeightType::from_ggml(info.ty) {
                to_pack.push(ToPack {
                    name: "output.weight".into(),
                    ty,
                    rows: v as usize,
                    cols: e as usize,
                    offset: info.offset,
                    size: info.size,
                    release: false,
                });
            }
        }
        if let Some(extra) = g
            .tensors
            .iter()
            .find(|t| t.name.starts_with(&format!("blk.{}.", hp.n_layer)))
        {
            return Err(g
                .error(format!(
                    "tensor '{}' belongs to a block beyond block_count {}",
                    extra.name, hp.n_layer
                ))
                .into());
        }
        let repack_buffer = match &repack {
            Some(r) if !to_repack.is_empty() => Some(
                copy_weights(r.buffer_type(), &to_repack, &file, progress)
                    .context("repacking the weights")?,
            ),
            _ => None,
        };
        let gpu = match placement {
            Some(p) => {
                let buffer = copy_weights(p.device.buffer_type(), &to_upload, &file, progress)
                    .with_context(|| {
                        format!(
                            "offloading {} layers to {} (offload fewer with --gpu-layers)",
                            p.n_layers(hp.n_layer),
                            p.device.name()
                        )
                    })?;
                Some(GpuWeights {
                    placement: p,
                    bytes: buffer.size() as u64,
                    _buffer: buffer,
                })
            }
            None => None,
        };
        let repacked_bytes = to_repack.iter().map(|(t, _)| t.nbytes() as u64).sum();
        let packed = pack_weights(&to_pack, hp.n_layer, &file, progress)?;
        Ok(Model {
            hparams: hp,
            weights: Weights {
                tok_embd,
                layers,
                output_norm,
                output,
                packed,
            },
            repacked_bytes,
            gpu,
            _ctx: ctx,
            _repack_buffer: repack_buffer,
            _buffer: buffer,
            file,
        })
    }

    /// The weight tensors.
    pub fn weights(&self) -> &Weights<'_> {
        &self.weights
    }

    /// The blocks offloaded to a GPU (`None`: everything on the CPU).
    pub fn gpu(&self) -> Option<&GpuWeights> {
        self.gpu.as_ref()
    }

    /// The parsed GGUF header (metadata for the tokenizer and chat template).
    pub fn gguf(&self) -> &GgufFile {
        &self.file.info
    }

    /// Bytes of tensor data (mapped, not copied).
    pub fn weight_bytes(&self) -> u64 {
        self.file.info.tensors.iter().map(|t| t.size).sum()
    }

    /// Bytes of weights converted into ggml's repacked layout (0 unless loaded with `repack`).
    pub fn repacked_bytes(&self) -> u64 {
        self.repacked_bytes
    }

    /// The most common weight type among the matrices (the file's quantization).
    pub fn main_weight_type(&self) -> GgmlType {
        let mut by_type: Vec<(GgmlType, u64)> = Vec::new();
        for t in &self.file.info.tensors {
            match by_type.iter_mut().find(|(ty, _)| *ty == t.ty) {
                Some((_, n)) => *n += t.size,
                None => by_type.push((t.ty, t.size)),
            }
        }
        by_type
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(t, _)| t)
            .unwrap_or(GgmlType::F32)
    }
}

fn check_tensor(g: &GgufFile, info: &TensorInfo, ne: &[u64], norm: bool) -> anyhow::Result<()> {
    let mut want = [1u64; 4];
    want[..ne.len()].copy_from_slice(ne);
    if info.ne != want {
        return Err(g
            .error(format!(
                "tensor '{}' has shape {:?}, expected {:?} for this model's hyper-parameters",
                info.name,
                &info.ne[..info.n_dims as usize],
                ne
            ))
            .into());
    }
    if norm && info.ty != GgmlType::F32 {
        return Err(g
            .error(format!(
                "tensor '{}' has type {}, norm weights must be f32",
                info.name, info.ty
            ))
            .into());
    }
    Ok(())
}

/// Drops the pages of `bytes` (inside the read-only map) from this process's memory: a copy in
/// another layout replaces them. They are read back from the file if ever touched again.
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize;
    let begin = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > begin {
        // SAFETY: the range lies inside the read-only file map; MADV_DONTNEED on it only drops
        // clean pages, which the kernel reads back from the file on a later access.
        unsafe { libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_DONTNEED) };
    }
}

/// A matrix to convert for the native kernels.
struct ToPack {
    /// Tensor name, which says its role.
    name: String,
    ty: WeightType,
    rows: usize,
    cols: usize,
    /// Offset and size of its data in the data section.
    offset: u64,
    size: u64,
    /// Release its mapped pages once converted (not for data used in place too).
    release: bool,
}

/// Converts the matrices `to_pack` lists into the native kernels' layout, releasing each one's
/// mapped pages once converted (where asked), and files them by role.
fn pack_weights(
    to_pack: &[ToPack],
    n_layer: usize,
    file: &MappedGguf,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<PackedWeights> {
    let mut packed = PackedWeights::default();
    if to_pack.is_empty() {
        return Ok(packed);
    }
    packed.layers = vec![PackedLayer::default(); n_layer];
    let total: u64 = to_pack.iter().map(|t| t.size).sum();
    let mut done = 0u64;
    let data = &file.mmap[file.info.data_offset as usize..];
    for t in to_pack {
        let name = &t.name;
        let bytes = &data[t.offset as usize..(t.offset + t.size) as usize];
        let m = PackedMatrix::pack(t.ty, t.rows, t.cols, bytes)
            .with_context(|| format!("{}: tensor '{name}'", file.info.path.display()))?;
        if t.release {
            release_pages(bytes);
        }
        let m = Some(Arc::new(m));
        if name == "output.weight" {
            packed.output = m;
        } else if let Some((layer, role)) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, role)| Some((l.parse::<usize>().ok()?, role)))
        {
            let slot = &mut packed.layers[layer];
            match role {
                "attn_q.weight" => slot.wq = m,
                "attn_k.weight" => slot.wk = m,
                "attn_v.weight" => slot.wv = m,
                "attn_output.weight" => slot.wo = m,
                "ffn_gate.weight" => slot.w_gate = m,
                "ffn_up.weight" => slot.w_up = m,
                "ffn_down.weight" => slot.w_down = m,
                _ => anyhow::bail!("internal: no role for packed tensor '{name}'"),
            }
        }
        done += t.size;
        progress(done, total);
    }
    Ok(packed)
}

/// Copies `tensors` (with their data offsets) from the map into one new buffer of `buft` —
/// ggml's repack buffer, which converts them as they are written, or a GPU's memory — then
/// releases the mapped pages they came from (unless another tensor still reads them in place:
/// a tied output head shares the embedding's).
fn copy_weights(
    buft: BufferType,
    tensors: &[(Tensor<'static>, u64)],
    file: &MappedGguf,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<BackendBuffer> {
    let align = buft.alignment();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut total = 0usize;
    for (t, _) in tensors {
        offsets.push(total);
        total += buft.alloc_size(*t).next_multiple_of(align);
    }
    let buf = buft.alloc(total)?;
    let weight_bytes: u64 = tensors.iter().map(|(t, _)| t.nbytes() as u64).sum();
    let mut done = 0u64;
    let data = &file.mmap[file.info.data_offset as usize..];
    let embd_offset = file.info.tensor("token_embd.weight").map(|t| t.offset);
    for ((t, file_offset), &at) in tensors.iter().zip(&offsets) {
        buf.place(*t, at)?;
        let bytes = &data[*file_offset as usize..*file_offset as usize + t.nbytes()];
        t.write::<u8>(bytes);
        // The copy replaces these pages: drop them from this process's memory right away, so
        // loading never holds two copies of the weights.
        if Some(*file_offset) != embd_offset {
            release_pages(bytes);
        }
        done += t.nbytes() as u64;
        progress(done, weight_bytes);
    }
    Ok(buf)
}
