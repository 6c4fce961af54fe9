//! Model loading: a memory-mapped GGUF file, its hyper-parameters and its weights.
//!
//! - [`hparams`]: the Mistral shape read from metadata.
//! - [`weights`]: the weight tensors, validated and placed in place in the memory map.
//! - [`offload`]: which blocks run on a GPU (`--gpu-layers`, `--device`).
//! - [`mistral`]: the forward pass as a ggml graph.

pub mod bundled;
pub mod hparams;
pub mod mistral;
pub mod offload;
pub mod synthetic;
pub mod weights;

pub use hparams::HParams;
pub use weights::{LayerWeights, LoadOptions, Model, Weights};

use crate::ggml::gguf::GgufFile;
use anyhow::Context as _;
use memmap2::Mmap;
use std::path::Path;

/// A GGUF file mapped into memory, with its parsed and validated header.
pub struct MappedGguf {
    /// The memory map of the whole file (read-only, shared with the page cache).
    pub mmap: Mmap,
    /// The parsed header.
    pub info: GgufFile,
}

impl MappedGguf {
    /// Opens, maps and parses a GGUF file. Errors name the file and the problem.
    pub fn open(path: &Path) -> anyhow::Result<MappedGguf> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open model file {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        anyhow::ensure!(meta.is_file(), "{}: not a regular file", path.display());
        anyhow::ensure!(
            meta.len() > 0,
            "{}: empty file, not a GGUF model",
            path.display()
        );
        // SAFETY: the map is read-only; mistrald never writes the file while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let info = GgufFile::parse(&mmap, path)?;
        Ok(MappedGguf { mmap, info })
    }
}
