//! GPU offload: which layers of the model run on a GPU (`--gpu-layers`, `--device`).
//!
//! The last `n` transformer blocks are offloaded — their weights and KV rings in the GPU's
//! memory, their operations on the GPU — and, when every block is, the output head too. The
//! token embedding stays on the CPU (its row lookup is cheap and it is the largest matrix).

use super::HParams;
use crate::ggml::device::{no_gpu_reason, Device};
use crate::ggml::gguf::GgufFile;

/// How many transformer blocks to offload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuLayers {
    /// As many as fit in the GPU's free memory (all of them when they fit); none without a GPU.
    #[default]
    Auto,
    /// Every block and the output head; an error without a GPU.
    All,
    /// The last `n` blocks (`0`: CPU only; `n` ≥ the number of blocks means all).
    Count(usize),
}

impl std::str::FromStr for GpuLayers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GpuLayers::Auto),
            "all" => Ok(GpuLayers::All),
            n => n.parse().map(GpuLayers::Count).map_err(|_| {
                format!("invalid GPU layer count '{s}' (expected a number, all or auto)")
            }),
        }
    }
}

impl std::fmt::Display for GpuLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuLayers::Auto => f.write_str("auto"),
            GpuLayers::All => f.write_str("all"),
            GpuLayers::Count(n) => write!(f, "{n}"),
        }
    }
}

/// What the user asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuRequest {
    /// How many blocks.
    pub layers: GpuLayers,
    /// The GPU by name (`Vulkan0`, `CUDA0`) or description; `None`: the first GPU.
    pub device: Option<String>,
    /// GPU memory to keep per offloaded block for KV caches (the caller knows how many
    /// sequences it runs and how long they are); used by [`GpuLayers::Auto`].
    pub kv_bytes_per_layer: u64,
}

impl GpuRequest {
    /// CPU only.
    pub fn cpu() -> GpuRequest {
        GpuRequest {
            layers: GpuLayers::Count(0),
            ..GpuRequest::default()
        }
    }

    /// The default request: `MISTRALD_GPU_LAYERS` and `MISTRALD_DEVICE` when set (as for the
    /// kernels' `MISTRALD_KERNEL`), else [`GpuLayers::Auto`] on the first GPU.
    pub fn from_env() -> anyhow::Result<GpuRequest> {
        let layers = match std::env::var("MISTRALD_GPU_LAYERS") {
            Ok(v) => v
                .parse()
                .map_err(|e| anyhow::anyhow!("MISTRALD_GPU_LAYERS: {e}"))?,
            Err(_) => GpuLayers::Auto,
        };
        let device = std::env::var("MISTRALD_DEVICE")
            .ok()
            .filter(|d| !d.is_empty());
        Ok(GpuRequest {
            layers,
            device,
            kv_bytes_per_layer: 0,
        })
    }
}

/// The decided offload: which blocks (and whether the output head) live on which GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuPlacement {
    /// The GPU.
    pub device: Device,
    /// The first offloaded block; blocks `first_layer..n_layer` run on the GPU.
    pub first_layer: usize,
    /// Whether the final norm and output head run on the GPU too.
    pub output: bool,
}

impl GpuPlacement {
    /// Whether block `l` runs on the GPU.
    pub fn has_layer(&self, l: usize) -> bool {
        l >= self.first_layer
    }

    /// Number of offloaded blocks of a model with `n_layer` blocks.
    pub fn n_layers(&self, n_layer: usize) -> usize {
        n_layer.saturating_sub(self.first_layer)
    }
}

/// GPU memory kept free beyond weights and caches, for compute buffers and the driver: a
/// tenth of the free memory, at least 256 MiB.
fn headroom(free: u64) -> u64 {
    (free / 10).max(256 << 20)
}

/// Decides the offload of the model `g` (shape `hp`) for `req`. `None`: everything on the CPU.
/// Errors when a GPU was asked for explicitly (a device name, `All` or a count) and there is
/// none, naming the reason.
pub fn plan(g: &GgufFile, hp: &HParams, req: &GpuRequest) -> anyhow::Result<Option<GpuPlacement>> {
    if req.layers == GpuLayers::Count(0) {
        return Ok(None);
    }
    let device = match &req.device {
        Some(name) => Device::find_gpu(name)?,
        None => match Device::gpus().first() {
            Some(d) => *d,
            None if req.layers == GpuLayers::Auto => return Ok(None),
            None => anyhow::bail!(
                "--gpu-layers {} asks for a GPU, but {}",
                req.layers,
                no_gpu_reason()
            ),
        },
    };
    let n_layer = hp.n_layer;
    // Bytes each block needs on the GPU: its tensors and its KV caches.
    let layer_bytes: Vec<u64> = (0..n_layer)
        .map(|l| {
            let prefix = format!("blk.{l}.");
            g.tensors
                .iter()
                .filter(|t| t.name.starts_with(&prefix))
                .map(|t| t.size)
                .sum::<u64>()
                + req.kv_bytes_per_layer
        })
        .collect();
    let output_bytes: u64 = ["output.weight", "output_norm.weight"]
        .iter()
        .filter_map(|n| g.tensor(n))
        .map(|t| t.size)
        .sum::<u64>()
        + match g.tensor("output.weight") {
            // A tied head is copied from the embedding matrix.
            None => g.tensor("token_embd.weight").map_or(0, |t| t.size),
            Some(_) => 0,
        };
    let (first_layer, output) = match req.layers {
        GpuLayers::All => (0, true),
        GpuLayers::Count(n) if n >= n_layer => (0, true),
        GpuLayers::Count(n) => (n_layer - n, false),
        GpuLayers::Auto => {
            let (free, _) = device.memory();
            let budget = free.saturating_sub(headroom(free));
            let all: u64 = layer_bytes.iter().sum::<u64>() + output_bytes;
            if all <= budget {
                (0, true)
            } else {
                // The last blocks first, as many as fit.
                let mut used = 0;
                let mut first = n_layer;
                while first > 0 && used + layer_bytes[first - 1] <= budget {
                    used += layer_bytes[first - 1];
                    first -= 1;
                }
                if first == n_layer {
                    log::warn!(
                        "{} has {} MiB free: not enough for one layer; running on the CPU",
                        device.name(),
                        free >> 20
                    );
                    return Ok(None);
                }
                (first, false)
            }
        }
    };
    let placement = GpuPlacement {
        device,
        first_layer,
        output,
    };
    if req.layers != GpuLayers::Auto {
        let need: u64 =
            layer_bytes[first_layer..].iter().sum::<u64>() + if output { output_bytes } else { 0 };
        let (free, _) = device.memory();
        if need > free {
            log::warn!(
                "offloading {} layers needs about {} MiB on {}, which reports {} MiB free",
                placement.n_layers(n_layer),
                need >> 20,
                device.name(),
                free >> 20
            );
        }
    }
    Ok(Some(placement))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_counts_parse() {
        assert_eq!("auto".parse::<GpuLayers>(), Ok(GpuLayers::Auto));
        assert_eq!("all".parse::<GpuLayers>(), Ok(GpuLayers::All));
        assert_eq!("12".parse::<GpuLayers>(), Ok(GpuLayers::Count(12)));
        assert!("-1".parse::<GpuLayers>().unwrap_err().contains("'-1'"));
        assert!("half".parse::<GpuLayers>().is_err());
        for l in [GpuLayers::Auto, GpuLayers::All, GpuLayers::Count(3)] {
            assert_eq!(l.to_string().parse::<GpuLayers>(), Ok(l));
        }
    }

    #[test]
    fn placement_counts_the_last_blocks() {
        let device = Device::all()[0]; // the CPU, in every build
        let p = GpuPlacement {
            device,
            first_layer: 6,
            output: false,
        };
        assert_eq!(p.n_layers(8), 2);
        assert!(!p.has_layer(5) && p.has_layer(6) && p.has_layer(7));
    }
}
