//! The daemon's side of the service manager (systemd): readiness and status notifications
//! (`sd_notify`), the watchdog, and listening sockets passed in by socket activation.
//!
//! Every part is inert when the daemon was not started by a service manager: without
//! `NOTIFY_SOCKET` notifications are not sent, without `WATCHDOG_USEC` there is no watchdog,
//! and without `LISTEN_FDS`/`LISTEN_PID` (naming this process) there are no inherited sockets.

use anyhow::{bail, Context as _};
use sd_notify::NotifyState;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Notifications to the service manager (`Type=notify`).
#[derive(Debug)]
pub struct ServiceManager {
    /// Whether `NOTIFY_SOCKET` was set at start.
    enabled: bool,
    /// `WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog: Option<Duration>,
    /// Whether a failed send was already logged (logged once, not on every status line).
    send_failed: AtomicBool,
}

impl ServiceManager {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> ServiceManager {
        ServiceManager {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            send_failed: AtomicBool::new(false),
        }
    }

    /// Whether a service manager listens for notifications.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The watchdog interval the service manager expects `WATCHDOG=1` within, when it has one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` with a status line: the model is loaded and every interface listens.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A `STATUS=` line (what `systemctl status` shows).
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Asks for `extra` more time to start (`EXTEND_TIMEOUT_USEC`), while a big model loads.
    pub fn extend_start_timeout(&self, extra: Duration, status: &str) {
        let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status(status),
        ]);
    }

    /// `RELOADING=1` (with `MONOTONIC_USEC`, as systemd asks): the configuration is being read
    /// again; [`ServiceManager::ready`] ends the reload.
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        states.push(NotifyState::Status("Reloading the configuration"));
        self.send(&states);
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// The pinger the engine loop calls on every iteration, when a watchdog is on.
    pub fn watchdog_pinger(&self) -> Option<WatchdogPinger> {
        // Pinging at a quarter of the interval leaves room for a slow step and for scheduling.
        self.watchdog
            .filter(|_| self.enabled)
            .map(|d| WatchdogPinger {
                every: d / 4,
                last: Mutex::new(None),
            })
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.send_failed.swap(true, Ordering::Relaxed) {
                log::warn!("cannot notify the service manager: {e}");
            }
        }
    }
}

/// Sends `WATCHDOG=1` at most every quarter of the watchdog interval. Called from the engine
/// loop, so the service manager sees a live engine, not merely a live process: a step that
/// hangs stops the pings and systemd restarts the service.
#[derive(Debug)]
pub struct WatchdogPinger {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl WatchdogPinger {
    /// Pings the watchdog unless it was pinged less than a quarter interval ago.
    pub fn beat(&self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            log::warn!("cannot ping the watchdog: {e}");
        }
    }
}

/// Listening sockets inherited from the service manager (socket activation).
#[derive(Debug, Default)]
pub struct InheritedSockets {
    /// Unix stream sockets: the HTTP API (with the path each is bound to, for the log).
    pub unix: Vec<(StdUnixListener, PathBuf)>,
    /// TCP sockets: the HTTP API's optional TCP listener.
    pub tcp: Vec<std::net::TcpListener>,
}

impl InheritedSockets {
    /// Whether nothing was inherited.
    pub fn is_empty(&self) -> bool {
        self.unix.is_empty() && self.tcp.is_empty()
    }
}

/// Takes the listening sockets the service manager passed (`LISTEN_FDS` from fd 3 on, for
/// this process per `LISTEN_PID`; names in `LISTEN_FDNAMES`), and removes those variables from
/// the environment. Each must be a listening stream socket: Unix ones serve the HTTP API, TCP
/// ones its TCP listener. Anything else is an error naming the descriptor.
///
/// # Safety
/// Edits the environment: call it before any other thread runs.
pub unsafe fn take_inherited_sockets() -> anyhow::Result<InheritedSockets> {
    // SAFETY: the caller guarantees no other thread runs.
    let fds: Vec<(RawFd, String)> = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .context("socket activation: bad LISTEN_FDS/LISTEN_FDNAMES")?
        .collect();
    let mut sockets = InheritedSockets::default();
    for (fd, name) in fds {
        // SAFETY: the service manager passed us this descriptor; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match classify(&owned).with_context(|| format!("socket activation: fd {fd} ({name})"))? {
            Family::Unix => {
                let listener = StdUnixListener::from(owned);
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
                    .unwrap_or_else(|| PathBuf::from(format!("<fd {fd}: {name}>")));
                sockets.unix.push((listener, path));
            }
            Family::Inet => sockets.tcp.push(std::net::TcpListener::from(owned)),
        }
    }
    Ok(sockets)
}

enum Family {
    Unix,
    Inet,
}

/// Checks that `fd` is a listening stream socket and says its address family.
fn classify(fd: &OwnedFd) -> anyhow::Result<Family> {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_raw_fd();
    let get = |opt: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are valid for the int-sized options read here.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let ty = get(libc::SO_TYPE).context("not a socket")?;
    if ty != libc::SOCK_STREAM {
        bail!("not a stream socket (use ListenStream= in the socket unit)");
    }
    if get(libc::SO_ACCEPTCONN)? == 0 {
        bail!("not a listening socket (the socket unit must have Accept=no)");
    }
    match get(libc::SO_DOMAIN)? {
        libc::AF_UNIX => Ok(Family::Unix),
        libc::AF_INET | libc::AF_INET6 => Ok(Family::Inet),
        other => bail!("unsupported address family {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd as _;

    #[test]
    fn classifies_listening_sockets_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let unix = StdUnixListener::bind(dir.path().join("s")).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let file = std::fs::File::open(dir.path()).unwrap();
        let dup = |fd: RawFd| {
            // SAFETY: dup of a live descriptor; the copy is owned by the returned OwnedFd.
            unsafe { OwnedFd::from_raw_fd(libc::dup(fd)) }
        };
        assert!(matches!(
            classify(&dup(unix.as_raw_fd())).unwrap(),
            Family::Unix
        ));
        assert!(matches!(
            classify(&dup(tcp.as_raw_fd())).unwrap(),
            Family::Inet
        ));
        let e = classify(&dup(dgram.as_raw_fd())).err().unwrap();
        assert!(e.to_string().contains("not a stream socket"), "{e}");
        let e = classify(&dup(file.as_raw_fd())).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let connected = std::os::unix::net::UnixStream::connect(dir.path().join("s")).unwrap();
        let e = classify(&dup(connected.as_raw_fd())).err().unwrap();
        assert!(e.to_string().contains("not a listening socket"), "{e}");
    }

    #[test]
    fn watchdog_pinger_rate_limits() {
        let p = WatchdogPinger {
            every: Duration::from_secs(3600),
            last: Mutex::new(None),
        };
        p.beat();
        let first = *p.last.lock().unwrap();
        assert!(first.is_some());
        p.beat();
        assert_eq!(
            *p.last.lock().unwrap(),
            first,
            "a second beat within the interval is skipped"
        );
    }
}
