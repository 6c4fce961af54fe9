//! Private message buses (a real `dbus-daemon`, session-like or with the system policy file)
//! for the D-Bus tests, the daemon started on one, and the stock clients (`gdbus`, `busctl`,
//! `dbus-send`) pointed at it.
#![allow(dead_code)]

use super::daemon::Daemon;
use mistrald::api::dbus::{Mistrald1Proxy, BUS_NAME};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use zbus::names::BusName;

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `dbus-daemon` of its own, listening in a temporary directory; killed on drop.
pub struct Bus {
    child: Option<Child>,
    /// Its directory (socket, configuration, service files).
    pub dir: tempfile::TempDir,
    /// The address clients connect to (`unix:path=…`).
    pub address: String,
    /// Whether it is the system-like bus (clients get `--system` environments).
    pub system: bool,
}

/// The default policy of Debian's system bus (`/usr/share/dbus-1/system.conf`), without its
/// includes: nothing may be owned and no method called unless a policy file allows it.
const SYSTEM_DEFAULT_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
"#;

/// The default policy of a session bus (`/usr/share/dbus-1/session.conf`): its user may do
/// anything.
const SESSION_DEFAULT_POLICY: &str = r#"
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
"#;

impl Bus {
    /// A session-like bus with the repository's session policy file.
    pub fn session() -> Bus {
        Bus::session_with(None)
    }

    /// A session-like bus whose activatable services are the `.service` files in `services`.
    pub fn session_with(services: Option<&Path>) -> Bus {
        let policy = std::fs::read_to_string(
            root().join("systemd/dbus/session/org.mistrald.Mistrald1.conf"),
        )
        .expect("systemd/dbus/session/org.mistrald.Mistrald1.conf");
        let dir = tempfile::tempdir().unwrap();
        let services = services
            .map(|p| format!("<servicedir>{}</servicedir>", p.display()))
            .unwrap_or_default();
        let config = format!(
            "<busconfig>\n<type>session</type>\n<listen>unix:path={}/bus</listen>\n\
             <auth>EXTERNAL</auth>\n{services}\n{SESSION_DEFAULT_POLICY}\n{}\n</busconfig>\n",
            dir.path().display(),
            busconfig_body(&policy)
        );
        Bus::start(dir, config, false)
    }

    /// A system-like bus (Debian's default system policy) with `policy`, the text of a
    /// `system.d` file. Its directory is world-readable so that other users can connect.
    pub fn system(policy: &str) -> Bus {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let config = format!(
            "<busconfig>\n<type>system</type>\n<listen>unix:path={}/bus</listen>\n\
             <auth>EXTERNAL</auth>\n{SYSTEM_DEFAULT_POLICY}\n{}\n</busconfig>\n",
            dir.path().display(),
            busconfig_body(policy)
        );
        Bus::start(dir, config, true)
    }

    fn start(dir: tempfile::TempDir, config: String, system: bool) -> Bus {
        let path = dir.path().join("bus.conf");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", path.display()))
            .args(["--nofork", "--print-address=1", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon (scripts/install-deps installs package dbus)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon did not start (printed {line:?})"
        );
        Bus {
            child: Some(child),
            dir,
            address,
            system,
        }
    }

    /// The environment variable that points clients at this bus.
    pub fn env_var(&self) -> &'static str {
        if self.system {
            "DBUS_SYSTEM_BUS_ADDRESS"
        } else {
            "DBUS_SESSION_BUS_ADDRESS"
        }
    }

    /// `--session` or `--system`.
    pub fn bus_flag(&self) -> &'static str {
        if self.system {
            "--system"
        } else {
            "--session"
        }
    }

    /// A command whose environment points at this bus (and at no other).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.point_at(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Points `cmd`'s environment at this bus (and at no other).
    pub fn point_at(&self, cmd: &mut Command) {
        cmd.env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env_remove("DBUS_STARTER_ADDRESS")
            .env(self.env_var(), &self.address);
    }

    /// Runs `gdbus ARGS` on this bus.
    pub fn gdbus(&self, args: &[&str]) -> Output {
        self.command("gdbus")
            .args(args)
            .output()
            .expect("run gdbus (package libglib2.0-bin)")
    }

    /// `gdbus call` of `method` on the daemon's object with `args` (GVariant text).
    pub fn gdbus_call(&self, method: &str, args: &[&str]) -> Output {
        let method = format!("org.mistrald.Mistrald1.{method}");
        let mut all = vec![
            "call",
            self.bus_flag(),
            "--dest",
            BUS_NAME,
            "--object-path",
            "/org/mistrald/Mistrald1",
            "--method",
            &method,
        ];
        all.extend_from_slice(args);
        self.gdbus(&all)
    }

    /// Runs `busctl --address=… ARGS`.
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.command("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .expect("run busctl (package systemd)")
    }

    /// Runs `dbus-send --bus=… ARGS`.
    pub fn dbus_send(&self, args: &[&str]) -> Output {
        self.command("dbus-send")
            .arg(format!("--bus={}", self.address))
            .args(args)
            .output()
            .expect("run dbus-send (package dbus)")
    }

    /// A zbus connection to this bus.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap()
    }

    /// A proxy of the daemon's interface on a new connection.
    pub async fn proxy(&self) -> Mistrald1Proxy<'static> {
        let conn = self.connect().await;
        Mistrald1Proxy::new(&conn).await.unwrap()
    }

    /// Whether the daemon owns its name on this bus.
    pub async fn name_owned(&self) -> bool {
        let conn = self.connect().await;
        let driver = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
        driver
            .name_has_owner(BusName::try_from(BUS_NAME).unwrap())
            .await
            .unwrap()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What is inside `<busconfig>` … `</busconfig>` of a bus configuration file.
fn busconfig_body(text: &str) -> String {
    let start = text.find("<busconfig>").expect("<busconfig>") + "<busconfig>".len();
    let end = text.rfind("</busconfig>").expect("</busconfig>");
    text[start..end].to_string()
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts `mistrald serve --dbus BUS` (with `config` and `flags`) on `bus`, and waits until it
/// serves HTTP and owns its name.
pub fn start_daemon(bus: &Bus, config: &str, flags: &[&str]) -> Daemon {
    let d = spawn_daemon(bus, config, flags);
    d.wait_ready();
    wait_for_name(bus, &d);
    d
}

/// Starts `mistrald serve` for `bus` without waiting (as `Daemon::spawn`, with the bus's
/// environment).
pub fn spawn_daemon(bus: &Bus, config: &str, flags: &[&str]) -> Daemon {
    let which = if bus.system { "system" } else { "session" };
    let mut all = vec!["--dbus", which];
    all.extend_from_slice(flags);
    Daemon::spawn_custom(config, &all, false, |cmd| bus.point_at(cmd))
}

/// Waits until the daemon owns its name on `bus` (it requests it once its model is loaded).
pub fn wait_for_name(bus: &Bus, d: &Daemon) {
    let t0 = Instant::now();
    while !super::daemon::block_on(bus.name_owned()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "mistrald did not take {BUS_NAME}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// stdout of a command that must succeed.
pub fn ok_stdout(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a command that must fail.
pub fn err_stderr(what: &str, out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{what} should have failed:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `(s, s)` answer of `gdbus call` (`('text', 'finish')`), unescaped.
pub fn gdbus_strings(out: &str) -> Vec<String> {
    // GVariant text: strings in single quotes (double quotes when the text has a single
    // quote), with backslash escapes.
    let mut strings = Vec::new();
    let mut chars = out.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' && c != '"' {
            continue;
        }
        let quote = c;
        let mut s = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('u') => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        if let Some(ch) =
                            u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                        {
                            s.push(ch);
                        }
                    }
                    Some(other) => s.push(other),
                    None => {}
                },
                c if c == quote => break,
                c => s.push(c),
            }
        }
        strings.push(s);
    }
    strings
}

/// The example client built by `cargo build --examples` (built now when missing).
pub fn rust_example() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<this test> → target/<profile>/examples/dbus_client
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
            let example = profile_dir.join("examples/dbus_client");
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "--example", "dbus_client"]);
            if profile_dir.ends_with("release") {
                cargo.arg("--release");
            }
            let out = cargo
                .current_dir(root())
                .output()
                .expect("run cargo build --example dbus_client");
            assert!(
                out.status.success(),
                "cargo build --example dbus_client failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(example.exists(), "{} was not built", example.display());
            example
        })
        .clone()
}

/// Whether the tests run as root (the policy tests switch to other users with `setpriv`).
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of a user in the password database.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}
