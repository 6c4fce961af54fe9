//! The D-Bus interface `org.mistrald.Mistrald1` of the real `mistrald serve`, on private
//! `dbus-daemon`s (session-like, and one with the system policy file), driven by stock clients
//! (`gdbus call`, `busctl call`, `dbus-send`, `gdbus monitor`), by zbus connections, by the
//! example clients (`examples/dbus_client.py` with Gio, `examples/dbus_client.rs` with a zbus
//! proxy) and by `mistralctl --dbus`, compared with the same requests over the Unix socket.
#![cfg(feature = "daemon")]

#[path = "../common/mod.rs"]
mod common;

mod api;
mod errors;
mod load;
mod policy;
