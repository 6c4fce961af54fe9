//! mistrald: an inference daemon for Mistral-architecture language models on Linux edge boards.
//!
//! See `ARCHITECTURE.md` for the module map and the path of a request.

#[cfg(feature = "daemon")]
pub mod api;
pub mod chat;
pub mod cli;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod ctl;
pub mod engine;
pub mod generation;
pub mod ggml;
pub mod kernels;
pub mod kv_cache;
#[cfg(feature = "daemon")]
pub mod metrics;
pub mod model;
#[cfg(feature = "plugins")]
pub mod plugins;
pub mod sampler;
#[cfg(feature = "daemon")]
pub mod service;
#[cfg(feature = "daemon")]
pub mod systemd;
pub mod tokenizer;
