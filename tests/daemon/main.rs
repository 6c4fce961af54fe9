//! `mistrald serve` as a real process on a real Unix socket, driven by real HTTP clients (hyper
//! in these tests, and `curl --unix-socket`), on the bundled trained model and on a tiny random
//! model; real plugins built from `plugins/` and hostile ones written in WAT. One test binary
//! for all daemon tests, so the package is linked once.
#![cfg(feature = "daemon")]

#[path = "../common/mod.rs"]
mod common;

mod api;
mod bad_input;
mod load;
mod plugins;
mod systemd;
