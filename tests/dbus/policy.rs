//! The system-bus policy file (who may own and call the name) and session-bus activation.

use crate::common::daemon::{block_on, config_with, Daemon};
use crate::common::dbus::{
    err_stderr, gdbus_strings, is_root, ok_stdout, root, spawn_daemon, start_daemon, user_ids, Bus,
};
use mistrald::api::dbus::BUS_NAME;
use serde_json::json;
use std::time::{Duration, Instant};

fn system_policy() -> String {
    std::fs::read_to_string(root().join("systemd/dbus/system/org.mistrald.Mistrald1.conf")).unwrap()
}

fn complete_args() -> [&'static str; 2] {
    [
        "The meaning of life is",
        "{'max_tokens': <8>, 'temperature': <0.0>}",
    ]
}

/// `gdbus call --system … Complete` as another user (`setpriv`).
fn complete_as(bus: &Bus, uid: u32, gid: u32) -> std::process::Output {
    let [prompt, options] = complete_args();
    bus.command("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--init-groups")
        .args([
            "gdbus",
            "call",
            "--system",
            "--dest",
            BUS_NAME,
            "--object-path",
            "/org/mistrald/Mistrald1",
            "--method",
            "org.mistrald.Mistrald1.Complete",
            prompt,
            options,
        ])
        .env("HOME", "/")
        .output()
        .expect("run setpriv (package util-linux)")
}

#[test]
fn the_system_policy_lets_root_and_the_group_call_and_denies_everyone_else() {
    if !is_root() {
        eprintln!("skipped: the policy test switches users with setpriv and needs root");
        return;
    }
    // The test daemon runs as root: the policy's user `mistrald` becomes this uid, and its
    // group `mistrald` the group of the system user `daemon` (uid 1 on Debian), so that a
    // caller of that group exists.
    let (member_uid, member_gid) = user_ids("daemon").expect("the system user daemon");
    let (nobody_uid, nobody_gid) = user_ids("nobody").expect("the user nobody");
    let uid = unsafe { libc::geteuid() };
    let policy = system_policy()
        .replace("user=\"mistrald\"", &format!("user=\"{uid}\""))
        .replace("group=\"mistrald\"", &format!("group=\"{member_gid}\""));
    assert_ne!(policy, system_policy());
    let bus = Bus::system(&policy);
    let d = start_daemon(&bus, &config_with(""), &[]);

    let (code, v) = d.post_json(
        "/v1/completions",
        &json!({"prompt": complete_args()[0], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(code, 200);
    let want = vec![
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        "length".to_string(),
    ];
    // Root may call.
    let out = bus.gdbus_call("Complete", &complete_args());
    assert_eq!(gdbus_strings(&ok_stdout("root's call", &out)), want);
    // A member of the group may call.
    let out = complete_as(&bus, member_uid, member_gid);
    assert_eq!(
        gdbus_strings(&ok_stdout("the group member's call", &out)),
        want
    );
    assert!(d.log_text().contains(&format!("from uid:{member_uid} ")));
    // Anyone else is denied by the bus, and may not own the name either.
    let out = complete_as(&bus, nobody_uid, nobody_gid);
    let stderr = err_stderr("nobody's call", &out);
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{stderr}"
    );
    let out = bus
        .command("setpriv")
        .arg(format!("--reuid={nobody_uid}"))
        .arg(format!("--regid={nobody_gid}"))
        .arg("--init-groups")
        .args([
            "gdbus",
            "call",
            "--system",
            "--dest",
            "org.freedesktop.DBus",
            "--object-path",
            "/org/freedesktop/DBus",
            "--method",
            "org.freedesktop.DBus.RequestName",
            BUS_NAME,
            "4",
        ])
        .env("HOME", "/")
        .output()
        .unwrap();
    let stderr = err_stderr("nobody owning the name", &out);
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{stderr}"
    );

    // A second daemon on the same bus stops at once, naming the owner problem.
    let mut second = spawn_daemon(&bus, &config_with(""), &[]);
    assert_eq!(second.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(
        second
            .log_text()
            .contains("is already owned on the system bus"),
        "{}",
        second.log_text()
    );
    drop(d);

    // With the policy as shipped, only the user mistrald may own the name: a daemon running
    // as anyone else is refused the name and says what to do.
    let shipped = Bus::system(&system_policy());
    let mut refused = spawn_daemon(&shipped, &config_with(""), &[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)), Some(1));
    let log = refused.log_text();
    assert!(
        log.contains("does not allow this user to own org.mistrald.Mistrald1")
            && log.contains("run mistrald as user mistrald"),
        "{log}"
    );
}

/// Terminates the daemon the bus started, also when the test fails.
struct Activated(i32);

impl Drop for Activated {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

#[test]
fn session_activation_starts_the_daemon_on_the_first_call() {
    let services = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let config = run.path().join("config.toml");
    std::fs::write(&config, config_with("")).unwrap();
    let socket = run.path().join("mistrald.sock");
    let shipped =
        std::fs::read_to_string(root().join("systemd/dbus/session/org.mistrald.Mistrald1.service"))
            .unwrap();
    assert!(shipped.contains("Exec=/usr/bin/mistrald serve --dbus session\n"));
    let service = shipped.replace(
        "Exec=/usr/bin/mistrald serve --dbus session",
        &format!(
            "Exec={} serve --dbus session --config {} --socket {}",
            env!("CARGO_BIN_EXE_mistrald"),
            config.display(),
            socket.display()
        ),
    );
    std::fs::write(
        services.path().join("org.mistrald.Mistrald1.service"),
        service,
    )
    .unwrap();
    let bus = Bus::session_with(Some(services.path()));
    assert!(!block_on(bus.name_owned()));

    // The first call starts the daemon and waits until it has loaded its model.
    let out = bus.gdbus_call("Complete", &complete_args());
    let answer = gdbus_strings(&ok_stdout("the activating call", &out));
    let out = bus.gdbus(&[
        "call",
        "--session",
        "--dest",
        "org.freedesktop.DBus",
        "--object-path",
        "/org/freedesktop/DBus",
        "--method",
        "org.freedesktop.DBus.GetConnectionUnixProcessID",
        BUS_NAME,
    ]);
    // `(uint32 12345,)`
    let pid: i32 = ok_stdout("GetConnectionUnixProcessID", &out)
        .split_whitespace()
        .last()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()))
        .and_then(|w| w.parse().ok())
        .expect("a process id");
    let guard = Activated(pid);
    // The socket of the same daemon gives the same answer.
    let daemon = Daemon {
        child: None,
        dir: tempfile::tempdir().unwrap(),
        socket: socket.clone(),
        config: config.clone(),
        log: run.path().join("none.log"),
    };
    let (code, v) = daemon.post_json(
        "/v1/completions",
        &json!({"prompt": complete_args()[0], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(code, 200);
    assert_eq!(answer[0], v["choices"][0]["text"].as_str().unwrap());

    // SIGTERM: the daemon releases the name and exits.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while block_on(bus.name_owned()) || socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // It has exited: nothing to kill.
    std::mem::forget(guard);
}
