//! Disk trouble under the state directory: a full file system and a
//! read-only one. The state directory is a small tmpfs mounted for the
//! test (root only; CI runs as root), always unmounted, even on failure.

use crate::harness::*;
use crate::security::is_root;
use crate::sync_util::{P, assert_mirror, export, sku};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs mounted for one test; unmounted on drop (lazily as a last
/// resort, so a failing test never leaves a mount behind).
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("cobbyd-test")
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", path.display());
        Mount {
            path: path.to_path_buf(),
        }
    }

    fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount,{opts} {}: {}",
            self.path.display(),
            stderr(&out)
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.path)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !umount(false) && !umount(true) {
            eprintln!("*** could not unmount {} ***", self.path.display());
        }
    }
}

const QUIET: &str =
    "[probe]\ninterval = \"1h\"\n\n[sync]\ninterval = \"2s\"\nfull_interval = \"240h\"\n";

/// Fills the file system under `dir` with one file until it is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1024 * 1024, 4096, 512] {
        let buf = vec![0u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// `/v1/status`, or None while the daemon is not answering (restarting).
fn try_status(d: &Daemon) -> Option<Value> {
    match d.try_http("GET", "/v1/status", None) {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

#[test]
fn disk_full_is_reported_and_recovered_in_place() {
    if !is_root("disk_full_is_reported_and_recovered_in_place") {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("cobbyd-disk")
        .tempdir()
        .unwrap();
    let state = base.path().join("state");
    let mnt = Mount::tmpfs(&state, "24m");
    let sim = Sim::start(1000);
    let d = Daemon::start_with(
        QUIET,
        &[("COBBYD__DAEMON__STATE_DIR", state.to_str().unwrap())],
    );
    d.add_synced_m2_shop("acme", &sim);
    let pid = d.pid();

    // The disk fills up; the shop grows, and the next sync has to write.
    let filler = fill(&mnt.path);
    let mut problem = Value::Null;
    let t = Instant::now();
    while problem.is_null() {
        // New products: the sync must write them.
        sim.create(1000);
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            problem = d.status()["storage"].clone();
            if !problem.is_null() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            t.elapsed() < WAIT,
            "no storage problem reported on a full disk:\n{}",
            d.log()
        );
    }
    let dir = state.display().to_string();
    assert_eq!(problem["kind"], "disk_full", "{problem:#}");
    assert!(
        problem["message"].as_str().unwrap().contains(&dir),
        "{problem:#}"
    );
    assert!(
        problem["hint"].as_str().unwrap().contains("free space"),
        "{problem:#}"
    );
    assert!(problem["since"].is_string(), "{problem:#}");

    // /health says degraded; `cobbyd status` names the problem and the fix.
    let (code, body) = d.http("GET", "/health", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"degraded\""), "{body}");
    let out = d.cli(&["status"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("storage disk_full"), "{text}");
    assert!(text.contains(&dir), "{text}");
    assert!(text.contains("free space"), "{text}");

    // The sync in progress failed with a clear error, and nothing spins:
    // no job runs while the disk is full.
    let s = d.wait_shop("acme", "sync stopped", |s| s["sync"]["state"] == "idle");
    assert_eq!(s["sync"]["progress"], Value::Null);
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("sync failed") && l.contains("no space left")),
        "{log}"
    );
    let pages = sim.counters().m2_product_pages;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sim.counters().m2_product_pages, pages, "syncs kept running");
    // Mutations are refused with the same explanation.
    let out = d.cli(&["sync", "acme"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));

    // Space returns: the daemon reopens its database by itself (same
    // process), syncs resume and the mirror converges.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    loop {
        if let Some(v) = try_status(&d)
            && v["storage"].is_null()
            && d.try_http("GET", "/health", None).map(|r| r.0).unwrap_or(0) == 200
        {
            assert_eq!(v["daemon"]["pid"].as_u64(), Some(pid as u64));
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "no recovery after space returned:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let want = sim.m2_items("default");
    let t = Instant::now();
    let sorted = |mut v: Vec<Value>| {
        v.sort_by_key(sku);
        v
    };
    while sorted(export(&d, "acme", None)) != want {
        assert!(t.elapsed() < WAIT, "mirror did not converge:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_mirror(&d, &sim, "acme", P::M2, None);

    // Nothing was corrupted: a clean stop and a fresh start open it all.
    let mut d = d;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0), "{}", d.log());
    d.restart();
    assert!(d.status()["storage"].is_null());
    assert_mirror(&d, &sim, "acme", P::M2, None);
}

#[test]
fn read_only_state_dir_stops_start_with_the_fix() {
    if !is_root("read_only_state_dir_stops_start_with_the_fix") {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("cobbyd-disk")
        .tempdir()
        .unwrap();
    let state = base.path().join("state");
    let mnt = Mount::tmpfs(&state, "16m");
    let sim = Sim::start(200);
    let mut d = Daemon::start_with(
        QUIET,
        &[("COBBYD__DAEMON__STATE_DIR", state.to_str().unwrap())],
    );
    d.add_synced_m2_shop("acme", &sim);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0), "{}", d.log());

    // A read-only state directory (the kernel refuses to remount a file
    // system read-only while a file on it is open for writing, so this
    // happens while the daemon is stopped): start fails with 75
    // (EX_TEMPFAIL, systemd retries) naming the directory and the fix.
    mnt.remount("ro");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&d.config)
        .env("COBBYD__DAEMON__STATE_DIR", &state)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert!(err.contains("remount"), "{err}");

    // Writable again: everything opens, nothing lost.
    mnt.remount("rw");
    d.restart();
    assert!(d.status()["storage"].is_null());
    assert_mirror(&d, &sim, "acme", P::M2, None);
}
