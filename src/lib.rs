//! mistrald: an inference daemon for Mistral-architecture language models on Linux edge boards.
//!
//! See `ARCHITECTURE.md` for the module map and the path of a request.

pub mod chat;
pub mod cli;
pub mod engine;
pub mod generation;
pub mod ggml;
pub mod kernels;
pub mod kv_cache;
pub mod model;
#[cfg(feature = "plugins")]
pub mod plugins;
pub mod sampler;
pub mod tokenizer;
