//! On-disk cache of compiled plugins. A component's machine code is stored
//! under a key made of the SHA-256 of the plugin file and of the engine's
//! compatibility hash (wasmtime version and settings), so an unchanged plugin
//! is not compiled again on restart or reload.
//!
//! Cached files are native code that wasmtime loads without re-validating it,
//! so the cache directory must be private to the daemon: it is created with
//! mode 0700 and refused if another user owns it or others can write to it;
//! files are written by the daemon only (to a temporary name, then renamed).

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// A directory of compiled components.
#[derive(Debug, Clone)]
pub(crate) struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// Opens (creating if needed) a private cache directory.
    pub(crate) fn open(dir: &Path) -> Result<Self, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
        let meta = fs::metadata(dir)
            .map_err(|e| format!("cannot read cache directory {}: {e}", dir.display()))?;
        if !private(&meta) {
            return Err(format!(
                "cache directory {} must be owned by this user and not writable by others",
                dir.display()
            ));
        }
        Ok(CompileCache {
            dir: dir.to_owned(),
        })
    }

    /// The cached component for `wasm`, or a freshly compiled one (stored for
    /// next time; a failure to store is logged, not fatal).
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> wasmtime::Result<Component> {
        let file = self.dir.join(format!("{}.cwasm", key(engine, wasm)));
        if let Ok(meta) = fs::symlink_metadata(&file) {
            if meta.is_file() && private(&meta) {
                // SAFETY: the file was written by `store` below from
                // `Component::serialize` for the same wasm bytes and a
                // compatible engine (both are in the key), in a directory only
                // this user can write to (checked in `open`) and the file itself
                // is ours and not writable by others (checked just above).
                // wasmtime additionally checks the header (version, settings).
                match unsafe { Component::deserialize_file(engine, &file) } {
                    Ok(component) => return Ok(component),
                    Err(e) => log::warn!("plugin cache: ignoring {}: {e:#}", file.display()),
                }
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = store(&file, &component) {
            log::warn!("plugin cache: cannot write {}: {e}", file.display());
        }
        Ok(component)
    }
}

/// Owned by us, not writable by group or others.
fn private(meta: &fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    meta.uid() == uid && meta.mode() & 0o022 == 0
}

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let mut sha = Sha256::new();
    sha.update(wasm);
    sha.update(compat.finish().to_le_bytes());
    sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn store(file: &Path, component: &Component) -> Result<(), String> {
    let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut out = fs::File::create(&tmp)?;
        out.set_permissions(fs::Permissions::from_mode(0o600))?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        fs::rename(&tmp, file)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        e.to_string()
    })
}
