//! The service files in `systemd/`, checked with systemd's own tools (no running systemd
//! needed): every unit passes `systemd-analyze verify` (system and user manager, the system
//! service also with each opt-in drop-in); the system service's exposure from `systemd-analyze
//! security --offline=true` is not above the figure README.md states, which is below 2.0
//! ("OK"); the sysusers and tmpfiles snippets, applied to a throwaway root, create the user and
//! directories the units expect; and the sockets and D-Bus activation files name the paths,
//! user and services the daemon uses. The tools come with Debian's `systemd` package, which
//! `scripts/install-deps` installs.
#![cfg(feature = "daemon")]

use mistrald::api::dbus::BUS_NAME;
use mistrald::config::{socket_path_for, ServerConfig, SYSTEM_SOCKET_PATH};
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the package installs the daemon; unit files name it in `ExecStart=`.
const INSTALLED_BINARY: &str = "/usr/bin/mistrald";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Runs one of systemd's tools; returns its exit success and what it printed (stdout, then
/// stderr). A missing tool fails the test with what to install.
fn run(mut command: Command) -> (bool, String) {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {program} ({e}): run scripts/install-deps, which installs Debian's \
                 systemd package (systemd-analyze, systemd-sysusers, systemd-tmpfiles)"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A systemd tool with an environment that does not leak the caller's unit search path.
fn tool(name: &str) -> Command {
    let mut command = Command::new(name);
    command
        .env_remove("SYSTEMD_UNIT_PATH")
        .env("SYSTEMD_PAGER", "cat")
        .env("SYSTEMD_COLORS", "0");
    command
}

/// One `key=value` line of a unit-style file (systemd units, D-Bus service files).
#[derive(Debug)]
struct Entry {
    section: String,
    key: String,
    value: String,
}

/// Parses a unit-style file: `[Section]` headers, `key=value` lines, `#`/`;` comments.
fn parse(relative: &str) -> Vec<Entry> {
    let text = read(relative);
    let mut section = String::new();
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{relative}:{}: continuation lines are not expected",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{relative}:{}: not key=value: {line}", n + 1));
        entries.push(Entry {
            section: section.clone(),
            key: key.trim().to_string(),
            value: value.trim().to_string(),
        });
    }
    entries
}

/// Every value of `section`'s `key`, in order.
fn values<'a>(entries: &'a [Entry], section: &str, key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|e| e.section == section && e.key == key)
        .map(|e| e.value.as_str())
        .collect()
}

/// The single value of `section`'s `key`.
fn value<'a>(entries: &'a [Entry], file: &str, section: &str, key: &str) -> &'a str {
    match values(entries, section, key).as_slice() {
        [v] => v,
        other => panic!("{file}: expected one [{section}] {key}=, found {other:?}"),
    }
}

/// A systemd time span such as `45s`, `3min`, `5min 30s` or `500ms`.
fn timespan(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    for word in text.split_whitespace() {
        let split = word
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(word.len());
        let (number, unit) = word.split_at(split);
        let number: f64 = number
            .parse()
            .unwrap_or_else(|_| panic!("time span {text:?}"));
        let seconds = match unit {
            "" | "s" | "sec" => 1.0,
            "ms" | "msec" => 1e-3,
            "m" | "min" => 60.0,
            "h" | "hr" => 3600.0,
            _ => panic!("time span {text:?}: unit {unit:?}"),
        };
        total += Duration::from_secs_f64(number * seconds);
    }
    total
}

/// Copies `files` (paths relative to the repository) into `dir`, with the installed binary's
/// path replaced by the one cargo built: `systemd-analyze verify` checks that `ExecStart=`
/// names an executable, and the package is not installed here.
fn stage(dir: &Path, files: &[&str]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    files
        .iter()
        .map(|relative| {
            let text = read(relative);
            let name = Path::new(relative).file_name().unwrap();
            if name.to_string_lossy().ends_with(".service") {
                assert!(
                    text.contains(&format!("ExecStart={INSTALLED_BINARY} ")),
                    "{relative}: ExecStart= should run {INSTALLED_BINARY}"
                );
            }
            let path = dir.join(name);
            std::fs::write(
                &path,
                text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_mistrald")),
            )
            .unwrap();
            path
        })
        .collect()
}

/// Runs `systemd-analyze verify` on `units` and fails on a non-zero exit or any output: it
/// reports unknown keys and unparsable values on stderr but still exits 0. `--man=no`: the
/// man pages named by `Documentation=` come with the Debian package, not with this checkout.
fn verify(units: &[PathBuf], user: bool, what: &str) {
    let runtime = tempfile::tempdir().unwrap();
    std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut command = tool("systemd-analyze");
    command.arg("verify").arg("--man=no");
    if user {
        // A user manager in test mode needs a runtime directory of its own.
        command
            .arg("--user")
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env("HOME", runtime.path())
            .env_remove("XDG_CONFIG_HOME");
    }
    command.args(units);
    let (ok, output) = run(command);
    assert!(
        ok && output.trim().is_empty(),
        "systemd-analyze verify{} {what}: exit ok = {ok}\n{output}",
        if user { " --user" } else { "" }
    );
}

#[test]
fn system_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = stage(
        dir.path(),
        &["systemd/mistrald.service", "systemd/mistrald.socket"],
    );
    verify(&units, false, "mistrald.service mistrald.socket");
}

#[test]
fn system_service_passes_verify_with_each_drop_in() {
    for drop_in in ["gpu.conf", "tcp.conf"] {
        let dir = tempfile::tempdir().unwrap();
        let units = stage(
            dir.path(),
            &["systemd/mistrald.service", "systemd/mistrald.socket"],
        );
        // Drop-ins next to a unit file given by path are read as for an installed unit.
        stage(
            &dir.path().join("mistrald.service.d"),
            &[&format!("systemd/drop-ins/{drop_in}")],
        );
        verify(&units[..1], false, &format!("mistrald.service + {drop_in}"));
    }
}

#[test]
fn user_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = stage(
        dir.path(),
        &[
            "systemd/user/mistrald.service",
            "systemd/user/mistrald.socket",
        ],
    );
    verify(&units, true, "user mistrald.service mistrald.socket");
}

/// `systemd-analyze security --offline=true FILE`'s overall exposure (`→ Overall exposure level
/// for mistrald.service: 0.4 SAFE 😀`).
fn exposure(unit: &Path) -> f64 {
    let mut command = tool("systemd-analyze");
    command.args(["security", "--offline=true"]).arg(unit);
    let (ok, output) = run(command);
    assert!(ok, "systemd-analyze security failed:\n{output}");
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level for mistrald.service:"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{output}"));
    let figure = line.rsplit(':').next().unwrap().split_whitespace().next();
    figure
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {line:?}"))
}

/// The figure README.md records after `prefix` (e.g. "`systemd-analyze security
/// --offline=true mistrald.service`: 0.4 SAFE").
fn readme_figure(prefix: &str) -> f64 {
    let readme = read("README.md");
    let at = readme
        .find(prefix)
        .unwrap_or_else(|| panic!("README.md does not state {prefix:?}"));
    let rest = readme[at + prefix.len()..].trim_start_matches([' ', '*']);
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("README.md: no number after {prefix:?}"))
}

#[test]
fn system_service_exposure_is_not_above_the_readme_figure() {
    let stated = readme_figure("`systemd-analyze security --offline=true mistrald.service`:");
    assert!(
        stated < 2.0,
        "README.md states exposure {stated}; the target is below 2.0 (\"OK\")"
    );
    let measured = exposure(&root().join("systemd/mistrald.service"));
    assert!(
        measured <= stated,
        "mistrald.service's exposure is {measured}, above the {stated} README.md states"
    );

    // With both opt-in drop-ins (GPU devices, TCP) it stays "OK" as well.
    let stated = readme_figure("with both opt-in drop-ins:");
    assert!(stated < 2.0, "README.md: {stated} with both drop-ins");
    let dir = tempfile::tempdir().unwrap();
    let units = stage(dir.path(), &["systemd/mistrald.service"]);
    stage(
        &dir.path().join("mistrald.service.d"),
        &["systemd/drop-ins/gpu.conf", "systemd/drop-ins/tcp.conf"],
    );
    let measured = exposure(&units[0]);
    assert!(
        measured <= stated,
        "with both drop-ins the exposure is {measured}, above the {stated} README.md states"
    );
}

/// Applies `snippet` (relative to the repository) with `tool --root=ROOT [args] -`.
fn apply_to_root(root_dir: &Path, program: &str, args: &[&str], snippet: &str) {
    let mut command = tool(program);
    command
        .arg(format!("--root={}", root_dir.display()))
        .args(args)
        .arg("-");
    let file = std::fs::File::open(root().join(snippet)).unwrap();
    let out = command
        .stdin(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): run scripts/install-deps"));
    assert!(
        out.status.success(),
        "{program} {snippet}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sysusers_and_tmpfiles_create_what_the_units_expect() {
    let target = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(target.path().join("etc")).unwrap();
    apply_to_root(
        target.path(),
        "systemd-sysusers",
        &[],
        "systemd/sysusers.d/mistrald.conf",
    );
    let passwd = std::fs::read_to_string(target.path().join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("mistrald:"))
        .unwrap_or_else(|| panic!("no user mistrald in\n{passwd}"))
        .split(':')
        .collect();
    let group = std::fs::read_to_string(target.path().join("etc/group")).unwrap();
    let gid = group
        .lines()
        .find_map(|l| l.strip_prefix("mistrald:x:"))
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no group mistrald in\n{group}"));
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {user:?}");
    assert_eq!(user[3], gid, "its primary group is the group mistrald");
    assert_eq!(user[5], "/var/lib/mistrald", "home");
    assert!(user[6].ends_with("nologin"), "no login shell: {user:?}");

    // tmpfiles resolves the user in the same root.
    apply_to_root(
        target.path(),
        "systemd-tmpfiles",
        &["--create"],
        "systemd/tmpfiles.d/mistrald.conf",
    );
    let state = std::fs::metadata(target.path().join("var/lib/mistrald")).unwrap();
    assert_eq!(
        (state.uid(), state.gid().to_string()),
        (uid, gid.to_string())
    );
    let models = std::fs::metadata(target.path().join("var/lib/mistrald/models")).unwrap();
    assert!(models.is_dir());
    assert_eq!(
        models.uid(),
        0,
        "models belong to root; the daemon only reads them"
    );
    assert_eq!(models.permissions().mode() & 0o777, 0o755);

    // The units use the same user, group and state directory.
    let service = parse("systemd/mistrald.service");
    let f = "mistrald.service";
    assert_eq!(value(&service, f, "Service", "User"), "mistrald");
    assert_eq!(value(&service, f, "Service", "Group"), "mistrald");
    assert_eq!(value(&service, f, "Service", "StateDirectory"), "mistrald");
    let socket = parse("systemd/mistrald.socket");
    let f = "mistrald.socket";
    assert_eq!(value(&socket, f, "Socket", "SocketUser"), "mistrald");
    assert_eq!(value(&socket, f, "Socket", "SocketGroup"), "mistrald");
}

#[test]
fn sockets_listen_where_the_daemon_and_mistralctl_look() {
    // System: the path the daemon uses as a system service (no XDG_RUNTIME_DIR).
    let socket = parse("systemd/mistrald.socket");
    let f = "mistrald.socket";
    let listen = value(&socket, f, "Socket", "ListenStream");
    assert_eq!(Path::new(listen), socket_path_for(None, 0));
    assert_eq!(listen, SYSTEM_SOCKET_PATH);
    assert_eq!(value(&socket, f, "Socket", "SocketMode"), "0660");
    assert_eq!(value(&socket, f, "Socket", "Accept"), "no");
    assert_eq!(value(&socket, f, "Socket", "Service"), "mistrald.service");
    assert_eq!(value(&socket, f, "Install", "WantedBy"), "sockets.target");

    // The service keeps /run/mistrald (and the socket file in it) when it stops.
    let service = parse("systemd/mistrald.service");
    let f = "mistrald.service";
    let run_dir = Path::new("/run").join(value(&service, f, "Service", "RuntimeDirectory"));
    assert_eq!(Path::new(listen).parent(), Some(run_dir.as_path()));
    assert_eq!(
        value(&service, f, "Service", "RuntimeDirectoryPreserve"),
        "yes"
    );
    assert_eq!(value(&service, f, "Service", "Type"), "notify");
    assert_eq!(
        value(&service, f, "Service", "ExecStart"),
        "/usr/bin/mistrald serve --dbus system"
    );
    // systemd must not kill the daemon while requests use their shutdown grace.
    let stop = timespan(value(&service, f, "Service", "TimeoutStopSec"));
    let grace = Duration::from_secs_f64(ServerConfig::default().shutdown_grace);
    assert!(
        stop > grace,
        "TimeoutStopSec {stop:?} <= shutdown_grace {grace:?}"
    );

    // User: $XDG_RUNTIME_DIR/mistrald.sock, the daemon's default for a user.
    let socket = parse("systemd/user/mistrald.socket");
    let f = "user/mistrald.socket";
    let listen = value(&socket, f, "Socket", "ListenStream");
    let runtime_dir = "/run/user/1000";
    assert_eq!(
        PathBuf::from(listen.replace("%t", runtime_dir)),
        socket_path_for(Some(OsString::from(runtime_dir)), 1000),
        "%t is $XDG_RUNTIME_DIR"
    );
    assert_eq!(value(&socket, f, "Socket", "Service"), "mistrald.service");
    let service = parse("systemd/user/mistrald.service");
    let f = "user/mistrald.service";
    assert_eq!(value(&service, f, "Service", "Type"), "notify");
    assert_eq!(
        value(&service, f, "Service", "ExecStart"),
        "/usr/bin/mistrald serve --dbus session"
    );
    let stop = timespan(value(&service, f, "Service", "TimeoutStopSec"));
    assert!(stop > grace, "user unit: TimeoutStopSec {stop:?}");
}

#[test]
fn dbus_activation_files_start_the_right_services() {
    // System bus: only through systemd, as the user the policy lets own the name.
    let file = "systemd/dbus/system/org.mistrald.Mistrald1.service";
    let system = parse(file);
    let s = "D-BUS Service";
    assert_eq!(value(&system, file, s, "Name"), BUS_NAME);
    assert_eq!(value(&system, file, s, "Exec"), "/bin/false");
    assert_eq!(value(&system, file, s, "User"), "mistrald");
    let unit = value(&system, file, s, "SystemdService");
    assert_eq!(unit, "mistrald.service");
    assert!(root().join("systemd").join(unit).exists());
    let policy = read("systemd/dbus/system/org.mistrald.Mistrald1.conf");
    assert!(
        policy.contains(&format!(
            "<policy user=\"mistrald\">\n    <allow own=\"{BUS_NAME}\"/>"
        )),
        "the system policy lets the user mistrald own {BUS_NAME}"
    );
    let service = parse("systemd/mistrald.service");
    assert_eq!(
        value(&service, "mistrald.service", "Service", "User"),
        "mistrald"
    );

    // Session bus: the user unit under systemd --user, Exec elsewhere.
    let file = "systemd/dbus/session/org.mistrald.Mistrald1.service";
    let session = parse(file);
    assert_eq!(value(&session, file, s, "Name"), BUS_NAME);
    assert_eq!(
        value(&session, file, s, "Exec"),
        "/usr/bin/mistrald serve --dbus session"
    );
    let unit = value(&session, file, s, "SystemdService");
    assert_eq!(unit, "mistrald.service");
    assert!(root().join("systemd/user").join(unit).exists());
}
