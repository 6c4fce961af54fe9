//! mistrald: an inference daemon for Mistral-architecture language models on
//! Linux edge boards.

pub mod plugins;
