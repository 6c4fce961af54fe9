//! The daemon's Unix socket: binding it safely next to a possible stale socket or a running
//! daemon, its permissions, and its removal at exit.

use anyhow::{bail, Context};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};

/// Removes the socket file when dropped — only if the file at the path is still the socket
/// this process bound (a newer daemon's socket is left alone).
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    /// An `O_PATH` handle on our socket's inode: it keeps the inode (and so its number) from
    /// being reused by another file while we compare.
    inode: fs::File,
}

impl SocketGuard {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = match self.inode.metadata() {
            Ok(md) => md,
            Err(e) => {
                log::warn!("checking the socket {}: {e}", self.path.display());
                return;
            }
        };
        match fs::symlink_metadata(&self.path) {
            Ok(md)
                if md.file_type().is_socket()
                    && md.dev() == ours.dev()
                    && md.ino() == ours.ino() =>
            {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("removing the socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => log::debug!(
                "{} is no longer our socket; leaving it",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// Binds the daemon's socket at `path` and returns it with the guard that removes it.
///
/// Creates the parent directory (mode 0755) when missing. A socket file already at `path` is
/// probed: if a server answers, this fails with "another mistrald is already running on PATH";
/// if the connection is refused, it is a stale socket left by a daemon that died and is
/// replaced. Anything else at `path` (a regular file, a directory, a symlink) is refused, never
/// removed. The new socket is given `mode` (e.g. `0o660`, not reduced by the umask) and, with
/// `group`, that group id (the daemon must be a member or privileged).
///
/// Must be called within a Tokio runtime (the listener is registered with its reactor).
pub fn bind_unix_socket(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> anyhow::Result<(tokio::net::UnixListener, SocketGuard)> {
    if mode & !0o7777 != 0 {
        bail!("invalid socket mode {mode:o}: only permission bits (at most 7777) are allowed");
    }
    if tokio::runtime::Handle::try_current().is_err() {
        bail!("bind_unix_socket must be called within a Tokio runtime");
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if fs::symlink_metadata(parent).is_err() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .with_context(|| format!("creating the socket directory {}", parent.display()))?;
        }
    }
    remove_stale(path)?;

    let listener = StdUnixListener::bind(path)
        .with_context(|| format!("binding the socket {}", path.display()))?;
    let inode = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening the new socket {}", path.display()))?;
    // From here on the file is ours: the guard removes it if anything below fails.
    let guard = SocketGuard {
        path: path.to_owned(),
        inode,
    };
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
            format!(
                "setting the group of the socket {} to {gid}",
                path.display()
            )
        })?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| {
        format!(
            "setting the mode of the socket {} to {mode:o}",
            path.display()
        )
    })?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("registering the socket {}", path.display()))?;
    Ok((listener, guard))
}

/// Makes way for a new socket at `path`: nothing there, or a stale socket (removed).
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !md.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match StdUnixStream::connect(path) {
        Ok(_) => bail!("another mistrald is already running on {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing the stale socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing the stale socket {}", path.display()))
                }
                _ => Ok(()),
            }
        }
        // Removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking whether {} is in use", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn binds_in_a_new_directory_with_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/mistrald/api.sock");
        let (listener, guard) = bind_unix_socket(&path, 0o660, None).unwrap();
        assert_eq!(guard.path(), path);
        assert!(fs::metadata(path.parent().unwrap()).unwrap().is_dir());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(mode_of(&path), 0o660);
        let client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_conn, _) = listener.accept().await.unwrap();
        drop(client);
        drop(listener);
        drop(guard);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn other_modes_and_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let gid = unsafe { libc::getegid() };
        let (_l, _g) = bind_unix_socket(&path, 0o600, Some(gid)).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::symlink_metadata(&path).unwrap().gid(), gid);
        let path = dir.path().join("b.sock");
        let (_l, _g) = bind_unix_socket(&path, 0o666, None).unwrap();
        assert_eq!(mode_of(&path), 0o666);
        assert!(bind_unix_socket(&dir.path().join("c.sock"), 0o100666, None).is_err());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(StdUnixListener::bind(&path).unwrap()); // the file stays, nobody listens
        let (listener, _guard) = bind_unix_socket(&path, 0o660, None).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[tokio::test]
    async fn live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _running = StdUnixListener::bind(&path).unwrap();
        let ino = fs::symlink_metadata(&path).unwrap().ino();
        let err = bind_unix_socket(&path, 0o660, None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("already running"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // The running daemon's socket is untouched.
        assert_eq!(fs::symlink_metadata(&path).unwrap().ino(), ino);
    }

    #[tokio::test]
    async fn non_socket_files_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "data").unwrap();
        let msg = format!("{:#}", bind_unix_socket(&file, 0o660, None).unwrap_err());
        assert!(msg.contains("not a socket"), "{msg}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "data");

        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        assert!(bind_unix_socket(&sub, 0o660, None).is_err());
        assert!(sub.is_dir());

        // A symlink, even to a stale socket, is not replaced.
        let target = dir.path().join("stale.sock");
        drop(StdUnixListener::bind(&target).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(bind_unix_socket(&link, 0o660, None).is_err());
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[tokio::test]
    async fn guard_removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, guard) = bind_unix_socket(&path, 0o660, None).unwrap();
        drop(listener);
        // Another daemon replaced the socket meanwhile.
        fs::remove_file(&path).unwrap();
        let _other = StdUnixListener::bind(&path).unwrap();
        drop(guard);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());

        let path = dir.path().join("own.sock");
        let (_listener, guard) = bind_unix_socket(&path, 0o660, None).unwrap();
        drop(guard);
        assert!(fs::symlink_metadata(&path).is_err());
    }

    #[test]
    fn needs_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let err = bind_unix_socket(&dir.path().join("x.sock"), 0o660, None).unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"));
        assert!(!dir.path().join("x.sock").exists());
    }
}
