//! The sandbox policy: which imports a plugin may have, and the WASI context
//! it runs with. By default a plugin gets the `mistrald:plugin/host` log
//! import and the WASI plumbing the Rust standard library links in (I/O
//! streams, exit, stdio captured by the host, an empty environment,
//! random numbers); clocks, the filesystem, sockets and environment variables
//! only when its configuration grants them.

use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::config::{Grant, PluginConfig};
use super::error::LoadProblem;

/// What an import of a plugin needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImportClass {
    /// Always provided.
    Allowed,
    /// Provided only with this grant.
    Needs(Grant),
    /// Never provided.
    Unknown,
}

/// Classifies an import by its interface name (`package/interface@version`).
pub(crate) fn classify(import: &str) -> ImportClass {
    let name = import.split('@').next().unwrap_or(import);
    match name {
        "mistrald:plugin/host" => ImportClass::Allowed,
        "wasi:cli/exit"
        | "wasi:cli/stdin"
        | "wasi:cli/stdout"
        | "wasi:cli/stderr"
        | "wasi:cli/environment" => ImportClass::Allowed,
        _ if name.starts_with("wasi:cli/terminal-")
            || name.starts_with("wasi:io/")
            || name.starts_with("wasi:random/") =>
        {
            ImportClass::Allowed
        }
        _ if name.starts_with("wasi:clocks/") => ImportClass::Needs(Grant::Clock),
        _ if name.starts_with("wasi:filesystem/") => ImportClass::Needs(Grant::Filesystem),
        _ if name.starts_with("wasi:sockets/") => ImportClass::Needs(Grant::Network),
        _ => ImportClass::Unknown,
    }
}

/// The grants a plugin with these imports needs, each once, in config order.
pub(crate) fn needed_grants<'a>(imports: impl IntoIterator<Item = &'a str>) -> Vec<Grant> {
    let mut grants = Vec::new();
    for import in imports {
        if let ImportClass::Needs(grant) = classify(import) {
            if !grants.contains(&grant) {
                grants.push(grant);
            }
        }
    }
    grants.sort_by_key(|g| g.as_str());
    grants
}

/// Refuses the first import that is unknown or not granted.
pub(crate) fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    config: &PluginConfig,
) -> Result<(), LoadProblem> {
    for import in imports {
        match classify(import) {
            ImportClass::Allowed => {}
            ImportClass::Needs(grant) if config.grants(grant) => {}
            ImportClass::Needs(grant) => {
                return Err(LoadProblem::NotGranted {
                    import: import.to_owned(),
                    grant,
                })
            }
            ImportClass::Unknown => return Err(LoadProblem::UnknownImport(import.to_owned())),
        }
    }
    Ok(())
}

/// Builds the WASI context of one instance: stdin closed, stdout and stderr
/// captured into `output`, no environment, no preopened directory, no network,
/// except what `config` grants.
pub(crate) fn wasi_ctx(
    config: &PluginConfig,
    output: &MemoryOutputPipe,
) -> Result<WasiCtx, LoadProblem> {
    let mut builder = WasiCtxBuilder::new();
    builder.stdout(output.clone()).stderr(output.clone());
    if config.grants(Grant::Env) {
        builder.inherit_env();
    }
    if config.grants(Grant::Filesystem) {
        for dir in &config.dirs {
            let guest = dir.to_string_lossy();
            builder
                .preopened_dir(dir, guest.as_ref(), FsPerms::ReadOnly)
                .map_err(|error| LoadProblem::Dir {
                    dir: dir.clone(),
                    error: format!("{error:#}"),
                })?;
        }
    }
    if config.grants(Grant::Network) {
        builder
            .inherit_network()
            .allow_ip_name_lookup(true)
            .allow_tcp(true)
            .allow_udp(true);
    }
    Ok(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_imports() {
        assert_eq!(classify("mistrald:plugin/host@0.1.0"), ImportClass::Allowed);
        assert_eq!(classify("wasi:io/streams@0.2.6"), ImportClass::Allowed);
        assert_eq!(
            classify("wasi:cli/terminal-stdout@0.2.0"),
            ImportClass::Allowed
        );
        assert_eq!(
            classify("wasi:random/insecure-seed@0.2.4"),
            ImportClass::Allowed
        );
        assert_eq!(
            classify("wasi:clocks/wall-clock@0.2.6"),
            ImportClass::Needs(Grant::Clock)
        );
        assert_eq!(
            classify("wasi:filesystem/preopens@0.2.0"),
            ImportClass::Needs(Grant::Filesystem)
        );
        assert_eq!(
            classify("wasi:sockets/tcp@0.2.0"),
            ImportClass::Needs(Grant::Network)
        );
        assert_eq!(
            classify("wasi:http/outgoing-handler@0.2.0"),
            ImportClass::Unknown
        );
        assert_eq!(classify("env"), ImportClass::Unknown);
    }

    #[test]
    fn grants_gate_imports() {
        let imports = ["wasi:io/streams@0.2.6", "wasi:sockets/tcp@0.2.6"];
        let mut config = PluginConfig::new("p");
        let err = check_imports(imports, &config).unwrap_err().to_string();
        assert!(
            err.contains("wasi:sockets/tcp@0.2.6") && err.contains("\"network\""),
            "{err}"
        );
        config.grants.push(Grant::Network);
        check_imports(imports, &config).unwrap();
        assert_eq!(needed_grants(imports), vec![Grant::Network]);
        let err = check_imports(["wasi:http/types@0.2.0"], &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not provide"), "{err}");
    }
}
