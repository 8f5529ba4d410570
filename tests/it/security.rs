//! The control socket's security: who may connect, how its directory is
//! checked, and that idle or slow clients cannot starve real ones.
//!
//! Oversized request bodies (413) are covered by
//! `daemon::socket_limits_body_size_and_idle_clients`.

use crate::harness::*;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Tests that switch users or mount need root (CI runs as root).
pub fn is_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("\n*** SKIPPED {test}: needs root (CI runs as root) ***\n");
    false
}

/// `cobbyd status --socket P` as user nobody with the given group.
fn status_as_nobody(socket: &Path, group: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=nobody",
            &format!("--regid={group}"),
            "--clear-groups",
        ])
        .arg(BIN)
        .args(["status", "--config", "/nonexistent/cobbyd.toml", "--socket"])
        .arg(socket)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn socket_admits_its_group_and_refuses_other_users() {
    if !is_root("socket_admits_its_group_and_refuses_other_users") {
        return;
    }
    let d = Daemon::start_with("", &[("COBBYD__DAEMON__SOCKET_GROUP", "nogroup")]);
    // The harness's directory is private (0700): open it for traversal so
    // that the socket's own mode and group are what is tested.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(meta.gid(), nogroup.gid.as_raw(), "socket group");

    // A member of the socket's group may use it.
    let out = status_as_nobody(&d.socket, "nogroup");
    assert_eq!(
        out.status.code(),
        Some(0),
        "group member refused:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("No shops yet"), "{}", stdout(&out));

    // Anyone else is refused, with the socket, the problem and the fix.
    let out = status_as_nobody(&d.socket, "54321");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&d.socket.display().to_string()), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("group nogroup"), "{err}");
    assert!(err.contains("daemon.socket_group"), "{err}");
    assert!(err.contains("usermod -aG nogroup"), "{err}");
    // The daemon still serves its owner.
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

/// Open file descriptors of a process.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// True once the peer closed `s` (EOF or reset), false if `deadline` passed.
fn closed_by_peer(s: &mut UnixStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An answer (a 408, say) before the close is fine.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_slow_clients_do_not_starve_status() {
    let d = Daemon::start("");
    let pid = d.pid();
    let fds_before = fd_count(pid);
    let max_connections = 64; // the default daemon.max_connections

    // 200 clients that connect and say nothing...
    let mut idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // ... and 20 that drip a request header, a byte every 300 ms.
    let drip: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let drip_clones: Vec<UnixStream> = drip.iter().map(|s| s.try_clone().unwrap()).collect();
    let stop_drip = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = stop_drip.clone();
    let dripper = std::thread::spawn(move || {
        let header = format!(
            "GET /health HTTP/1.1\r\nHost: cobbyd\r\nX-Pad: {}\r\n\r\n",
            "x".repeat(400)
        );
        let mut socks: Vec<Option<UnixStream>> = drip_clones.into_iter().map(Some).collect();
        for byte in header.as_bytes() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) || socks.iter().all(Option::is_none)
            {
                return;
            }
            for s in socks.iter_mut() {
                if let Some(sock) = s
                    && sock.write_all(&[*byte]).is_err()
                {
                    *s = None;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });

    // While they are all open, the real CLI answers.
    let mut cli = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&d.config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while cli.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = cli.kill();
            panic!(
                "`cobbyd status` got no answer behind idle clients:\n{}",
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cli.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("No shops yet"), "{}", stdout(&out));

    // The daemon's descriptors stay bounded by the connection cap.
    let fds_during = fd_count(pid);
    assert!(
        fds_during <= fds_before + max_connections + 8,
        "daemon holds {fds_during} descriptors (was {fds_before}; cap {max_connections})"
    );

    // Every idle and dripping client is cut off (evicted at the cap, or by
    // the header timeout).
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_by_peer(s, deadline), "idle client {i} still open");
    }
    for (i, mut s) in drip.into_iter().enumerate() {
        assert!(
            closed_by_peer(&mut s, deadline),
            "dripping client {i} still open"
        );
    }
    stop_drip.store(true, std::sync::atomic::Ordering::Relaxed);
    dripper.join().unwrap();
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

/// 300 clients stuck in the middle of a request body (headers complete, 10
/// of 1000 announced bytes sent) do not lock `cobbyd status` out: a
/// connection waiting for its body is evicted at the cap like an idle one.
#[test]
fn clients_stuck_mid_body_do_not_starve_status() {
    let d = Daemon::start("");
    let head = "POST /v1/shops/nosuchshop/sync HTTP/1.1\r\nHost: cobbyd\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"full\": ";
    let mut stuck: Vec<UnixStream> = Vec::new();
    // 50 (under the cap of 64) first: a request behind them is answered
    // once the daemon has read their headers, so they wait for bodies.
    for _ in 0..50 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        stuck.push(s);
    }
    assert_eq!(d.http("GET", "/health", None).0, 200);
    for _ in 0..250 {
        if let Ok(mut s) = UnixStream::connect(&d.socket)
            && s.write_all(head.as_bytes()).is_ok()
        {
            stuck.push(s);
        }
    }
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&d.config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "`cobbyd status` behind clients stuck mid-body: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("No shops yet"), "{}", stdout(&out));
    drop(stuck);
    assert_eq!(d.http("GET", "/health", None).0, 200);
}

/// `cobbyd run` with the socket at `socket`, stderr to `log`.
fn run_with_socket(config: &Path, socket: &Path, log: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("COBBYD__DAEMON__SOCKET", socket)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn socket_in_a_world_writable_directory_is_refused_or_warned() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");

    // World-writable without the sticky bit: refused at start.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = dir.path().join("open.log");
    let mut child = run_with_socket(&config, &open.join("cobbyd.sock"), &log);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > WAIT {
            let _ = child.kill();
            panic!("daemon started in a world-writable directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&open.display().to_string()), "{err}");
    assert!(err.contains("writable by everyone"), "{err}");
    assert!(err.contains("/run/cobbyd"), "{err}");
    assert!(!open.join("cobbyd.sock").exists());

    // With the sticky bit (like /tmp): it starts, and warns once.
    let sticky = dir.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = sticky.join("cobbyd.sock");
    let log = dir.path().join("sticky.log");
    let mut child = run_with_socket(&config, &socket, &log);
    let t = Instant::now();
    while http_unix(&socket, "GET", "/health", None)
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        if t.elapsed() > WAIT || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "daemon did not start in a sticky directory:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("writable by everyone (sticky").count(),
        1,
        "{text}"
    );
    assert!(text.contains(&sticky.display().to_string()), "{text}");
}
