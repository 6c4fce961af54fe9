//! The bundled default model: `fortunes-22m`, a small trained Mistral-architecture model that
//! ships with mistrald so every command works without `--model`.
//!
//! Where it is looked for, in order (the first existing file wins):
//! 1. next to the binary: `<bindir>/fortunes-22m-q8_0.gguf`, `<bindir>/models/…`, and
//!    `<bindir>/../share/mistrald/models/…` (an installation prefix such as `/usr/local`);
//! 2. the source repository: `models/…` in the directory the binary lies under (so
//!    `target/release/mistrald` finds the repository's copy) and in the source tree it was
//!    built from;
//! 3. the installed data directories `/usr/share/mistrald/models/` and
//!    `/usr/local/share/mistrald/models/`.

use anyhow::bail;
use std::path::{Path, PathBuf};

/// File name of the bundled model.
pub const BUNDLED_MODEL_FILE: &str = "fortunes-22m-q8_0.gguf";

/// System data directories searched last.
pub const INSTALLED_MODEL_DIRS: [&str; 2] = [
    "/usr/share/mistrald/models",
    "/usr/local/share/mistrald/models",
];

/// Every place the bundled model is looked for, in order.
pub fn bundled_model_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(dir) = &exe_dir {
        out.push(dir.join(BUNDLED_MODEL_FILE));
        out.push(dir.join("models").join(BUNDLED_MODEL_FILE));
        out.push(
            dir.join("../share/mistrald/models")
                .join(BUNDLED_MODEL_FILE),
        );
        out.extend(
            dir.ancestors()
                .skip(1)
                .map(|a| a.join("models").join(BUNDLED_MODEL_FILE)),
        );
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(BUNDLED_MODEL_FILE),
    );
    out.extend(
        INSTALLED_MODEL_DIRS
            .iter()
            .map(|d| Path::new(d).join(BUNDLED_MODEL_FILE)),
    );
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The bundled model's path, or an error listing where it was looked for.
pub fn find_bundled_model() -> anyhow::Result<PathBuf> {
    let candidates = bundled_model_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.canonicalize().unwrap_or_else(|_| found.clone()));
    }
    bail!(
        "no model given and the bundled model {BUNDLED_MODEL_FILE} was not found (looked in: {}); pass --model FILE",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `explicit` when given, else the bundled model; `announce` is told which bundled file was
/// chosen (so a command can say which model it loaded).
pub fn resolve_model(
    explicit: Option<&Path>,
    announce: impl FnOnce(&Path),
) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let p = find_bundled_model()?;
            announce(&p);
            Ok(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_copy_is_found_from_a_build_directory() {
        let found = find_bundled_model().expect("bundled model in the repository");
        assert!(found.ends_with(Path::new("models").join(BUNDLED_MODEL_FILE)));
        let c = bundled_model_candidates();
        assert!(c.iter().any(|p| p.starts_with(INSTALLED_MODEL_DIRS[0])));
    }

    #[test]
    fn an_explicit_model_is_used_as_given() {
        let mut announced = false;
        let p = resolve_model(Some(Path::new("/x/m.gguf")), |_| announced = true).unwrap();
        assert_eq!(p, Path::new("/x/m.gguf"));
        assert!(!announced);
    }
}
