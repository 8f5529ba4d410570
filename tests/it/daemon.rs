//! The daemon foundation: start, status, signals, systemd notifications,
//! config errors, the socket's limits.

use crate::harness::*;
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

#[test]
fn status_answers_and_exit_codes() {
    let d = Daemon::start("");
    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("cobbyd"), "{}", stdout(&out));
    let out = d.cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["daemon"]["pid"].as_u64(), Some(d.pid() as u64));
    assert_eq!(v["daemon"]["state_dir"], d.state_dir.display().to_string());
    assert_eq!(v["daemon"]["config_path"], d.config.display().to_string());
    assert!(v["shops"].as_array().unwrap().is_empty());
    // The socket is 0660.
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // No daemon at another path: exit 3 with a one-line reason.
    let out = d.cli(&["status", "--socket", "/nonexistent/cobbyd.sock"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1);
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start("");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!d.socket.exists(), "socket left behind");
    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    // A restart on the same state works (the lock was released).
    d.restart();
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn sighup_reloads_and_keeps_the_old_config_when_the_new_is_bad() {
    let d = Daemon::start("[probe]\ninterval = \"45s\"\n");
    assert_eq!(d.json("/v1/config")["probe"]["interval"], "45s");
    let good = std::fs::read_to_string(&d.config).unwrap();
    // A good change is applied.
    std::fs::write(&d.config, good.replace("45s", "50s")).unwrap();
    d.signal(Signal::SIGHUP);
    let t = Instant::now();
    while d.json("/v1/config")["probe"]["interval"] != "50s" {
        assert!(t.elapsed() < WAIT, "reload not applied:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file is refused and logged; the daemon keeps serving.
    std::fs::write(
        &d.config,
        good.replace("interval = \"45s\"", "interval = \"soon\""),
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    let t = Instant::now();
    while !d.log().contains("reload failed") {
        assert!(t.elapsed() < WAIT, "no reload error logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("probe.interval"), "{}", d.log());
    assert_eq!(d.json("/v1/config")["probe"]["interval"], "50s");
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

/// A config path that is a device is read up to the config cap, never
/// without end: by `check-config`, and by a reload.
#[test]
fn a_config_that_is_a_device_is_read_up_to_the_cap() {
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config", "/dev/zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/dev/zero") && stderr(&out).contains("larger than 1048576 bytes"),
        "{}",
        stderr(&out)
    );
    let d = Daemon::start("");
    std::fs::remove_file(&d.config).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &d.config).unwrap();
    d.signal(Signal::SIGHUP);
    let t = Instant::now();
    while !d.log().contains("reload failed") {
        assert!(t.elapsed() < WAIT, "no reload error logged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("larger than 1048576 bytes"), "{}", d.log());
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

/// Collects sd_notify datagrams until `want` arrives.
fn expect_notify(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
        assert!(t.elapsed() < WAIT, "no {want} among {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn notifies_systemd_ready_watchdog_reloading_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.display().to_string();
    let mut d = Daemon::start_with(
        "",
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "200000")],
    );
    let mut seen = Vec::new();
    expect_notify(&sock, "READY=1", &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=0 shops")),
        "{seen:?}"
    );
    expect_notify(&sock, "WATCHDOG=1", &mut seen);
    d.signal(Signal::SIGHUP);
    expect_notify(&sock, "RELOADING=1", &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    d.signal(Signal::SIGTERM);
    expect_notify(&sock, "STOPPING=1", &mut seen);
    assert_eq!(d.wait_exit().code(), Some(0));
}

#[test]
fn a_second_daemon_on_the_same_state_fails_fast() {
    let d = Daemon::start("");
    // Same state directory, another socket.
    let cfg = d.dir.path().join("second.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n",
            d.state_dir.display(),
            d.dir.path().join("second.sock").display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "it hung");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&d.state_dir.display().to_string()), "{err}");
    assert!(err.contains("in use by another cobbyd"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The first one is unharmed.
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn config_errors_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[probe]\nintervall = \"5s\"\n", "intervall"),
        ("[sync]\ninterval = \"fortnightly\"\n", "sync.interval"),
        (
            "[daemon]\nshutdown_timeout = 30\n",
            "daemon.shutdown_timeout",
        ),
        ("[nonsense]\n", "nonsense"),
    ] {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, text).unwrap();
        for cmd in ["check-config", "run"] {
            let out = std::process::Command::new(BIN)
                .args([cmd, "--config"])
                .arg(&cfg)
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(78),
                "{cmd} {text}: {}",
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(err.contains(key), "{cmd}: {err} lacks {key}");
            assert!(err.contains(&cfg.display().to_string()), "{err}");
        }
    }
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/cobbyd.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn socket_limits_body_size_and_idle_clients() {
    let d = Daemon::start("");
    // A client that connects and says nothing.
    let _idle = UnixStream::connect(&d.socket).unwrap();
    let mut half = UnixStream::connect(&d.socket).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    assert_eq!(d.http("GET", "/health", None).0, 200);
    // An oversized body is refused with 413 and the daemon keeps serving.
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(100 * 1024));
    let (code, body) = d.http("POST", "/v1/shops", Some(&big));
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("too_large"), "{body}");
    assert_eq!(d.http("GET", "/health", None).0, 200);
    // Unknown routes answer JSON errors.
    let (code, body) = d.http("GET", "/v2/nothing", None);
    assert_eq!(code, 404);
    assert!(body.contains("\"error\""), "{body}");
    // The idle client is cut off eventually (header timeout), not kept forever.
    let mut idle = UnixStream::connect(&d.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
}

/// A route that answers from the headers alone (an unknown path, a wrong
/// method) while the body is still on its way: the daemon reads the body
/// before it closes, so the late body is accepted and the answer read.
/// A connection closed with the body unread reset the client's side
/// (ECONNRESET or EPIPE), losing the answer.
#[test]
fn a_body_that_arrives_after_the_answer_does_not_reset_the_connection() {
    let d = Daemon::start("");
    let body = format!("{{\"x\": \"{}\"}}", "a".repeat(4000));
    for (path, code) in [("/v2/nothing", "404"), ("/v1/status", "405")] {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: cobbyd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // The split: the body follows once the daemon had time to answer.
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(body.as_bytes())
            .unwrap_or_else(|e| panic!("{path}: writing the body: {e}"));
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("{path}: reading the answer: {e}"));
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {code}")),
            "{path}: {text}"
        );
        assert!(text.contains("\"error\""), "{path}: {text}");
    }
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

#[test]
fn stale_socket_replaced_other_files_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "", "");
    let sock = dir.path().join("cobbyd.sock");
    // A stale socket: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while http_unix(&sock, "GET", "/health", None)
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        assert!(t.elapsed() < WAIT, "stale socket not replaced");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // A regular file at the socket path stops start-up.
    let _ = std::fs::remove_file(&sock);
    std::fs::write(&sock, "not a socket").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
}

#[test]
fn draining_reports_503_and_a_second_sigterm_exits_at_once() {
    let sim = Sim::start(500);
    // A drain that would outlast the test's patience unless the second
    // signal cuts it short.
    let mut d = Daemon::start_with("", &[("COBBYD__DAEMON__SHUTDOWN_TIMEOUT", "10min")]);
    d.add_synced_m2_shop("slow", &sim);
    sim.set_fault(cobbyd::sim::Fault::Slow(Duration::from_secs(600)));
    let out = d.cli(&["sync", "slow", "--full"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    d.wait_shop("slow", "a sync in flight", |s| {
        !s["sync"]["progress"].is_null()
    });
    d.signal(Signal::SIGTERM);
    let t = Instant::now();
    loop {
        let (code, body) = d
            .try_http("GET", "/health", None)
            .unwrap_or_else(|e| panic!("socket gone while draining ({e}):\n{}", d.log()));
        if code == 503 {
            assert!(body.contains("stopping"), "{body}");
            break;
        }
        assert!(t.elapsed() < WAIT, "health never turned 503");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mutations are refused while draining; reads still work.
    let (code, _) = d.http("POST", "/v1/shops/slow/sync", Some("{}"));
    assert_eq!(code, 503);
    assert_eq!(d.http("GET", "/v1/status", None).0, 200);
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert!(status.code().is_some(), "killed by a signal: {status}");
    assert!(d.log().contains("second stop signal"), "{}", d.log());
    assert!(!d.socket.exists());
    sim.set_fault(cobbyd::sim::Fault::None);
    // The interrupted run resumes after a restart and completes.
    d.restart();
    d.wait_shop("slow", "the full sync to finish", |s| {
        s["sync"]["last_run"]["kind"] == "full_sync" && s["sync"]["last_run"]["outcome"] == "ok"
    });
}
