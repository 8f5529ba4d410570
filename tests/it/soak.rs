//! Crash soak: SIGKILL at random moments of the daemon's life (a page
//! write or its flush in the middle of a sync, a probe, a shutdown, a
//! credential rotation, a `shop remove --purge`), both platforms at once,
//! the catalogs changing between rounds. After every kill the state must
//! pass `cobbyd check-state` (no job lost or doubled, no orphan, mirrors
//! consistent), no checkpoint may claim a product the mirror does not hold,
//! and once restarted the next completed sync must bring the mirror to the
//! catalog exactly.
//!
//! Rounds: `COBBYD_SOAK_ROUNDS` (default 8); seed: `COBBYD_SOAK_SEED`
//! (printed at the start, so that a failure can be replayed).

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::{Fault, SimCredentials};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VICTIM_PRODUCTS: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// Blind, a random moment after the syncs were asked for: a page
    /// write, a flush, a request in flight.
    MidSync,
    /// SIGTERM (draining: pages finish, then the last flush), SIGKILL a
    /// few ms later.
    Shutdown,
    /// While `shop test` probes.
    Probe,
    /// While `shop rotate` tests and swaps the credentials.
    Rotate,
    /// While `shop remove --purge` unregisters a shop.
    Remove,
}

const CYCLE: [Kill; 5] = [
    Kill::MidSync,
    Kill::Probe,
    Kill::Rotate,
    Kill::Shutdown,
    Kill::Remove,
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Starts a CLI command without waiting (it is killed with the daemon or
/// fails when the socket goes away).
fn spawn_cli(d: &Daemon, args: &[&str], stdin: Option<&str>) -> Child {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
    }
    child
}

/// `cobbyd check-state --json` on the stopped daemon's state; asserts it
/// passes and returns the report.
fn check_state(d: &Daemon, when: &str) -> Value {
    let out = d.cli(&["check-state", "--json"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{when}: check-state failed ({:?}):\n{text}{}\nlog tail:\n{}",
        out.status.code(),
        stderr(&out),
        tail(d, 60)
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], true, "{when}: {v:#}");
    v
}

/// Offline, on the stopped daemon's state: every catalog product saved
/// before the second of a shop's checkpoint is in the mirror with that
/// `updated_at`. The catalog does not change within a round and a change
/// between rounds gets the current second, never one before an existing
/// checkpoint, so this holds for a checkpoint written in any round; the
/// checkpoint's own second is left out (products saved in it after it was
/// written are re-read by the next run by design). Returns how many
/// products the checkpoint covered.
fn assert_cursor_covered(d: &Daemon, sim: &Sim, shop: &str, p: P, when: &str) -> usize {
    let (cursor, stored) = {
        let store = cobbyd::store::Store::open_existing(&d.state_dir, 4).unwrap();
        let m = cobbyd::mirror::Mirror::open(&store, shop, "default").unwrap();
        let cursor = m.cursor().unwrap();
        let mut stored: HashMap<String, String> = HashMap::new();
        for kv in m.index().iter() {
            let (k, v) = kv.unwrap();
            let e = cobbyd::mirror::decode(&v).unwrap();
            stored.insert(
                String::from_utf8_lossy(&k).into_owned(),
                e.updated_at.to_string(),
            );
        }
        (cursor, stored)
    };
    let Some(at) = cursor.updated_at.clone() else {
        return 0;
    };
    let mut covered = 0;
    for item in p.items(sim, "default") {
        let ua = item["updated_at"].as_str().unwrap_or_default().to_string();
        if ua.as_str() >= at.as_str() {
            continue;
        }
        covered += 1;
        let k = sku(&item);
        assert_eq!(
            stored.get(&k),
            Some(&ua),
            "{when}: {shop}'s checkpoint is at {at} (last id {}), but {k} (updated {ua}) is not stored at that version: the checkpoint ran ahead of the data",
            cursor.last_id
        );
    }
    covered
}

fn find_mirror<'a>(report: &'a Value, shop: &str) -> Option<&'a Value> {
    report["mirrors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["shop"] == shop)
}

fn has(report: &Value, field: &str, shop: &str) -> bool {
    report[field].as_array().unwrap().iter().any(|s| s == shop)
}

/// Nothing of the victim is left: no record, health, mirror or checkpoint,
/// no removal still to finish (jobs and runs: check-state's orphan check).
fn assert_victim_gone(report: &Value, when: &str) {
    assert!(!has(report, "shops", "victim"), "{when}: {report:#}");
    assert!(!has(report, "health", "victim"), "{when}: {report:#}");
    assert!(
        find_mirror(report, "victim").is_none(),
        "{when}: {report:#}"
    );
    let notes = report["notes"].to_string();
    assert!(!notes.contains("victim"), "{when}: {report:#}");
}

fn rotated(n: u64) -> SimCredentials {
    SimCredentials {
        api_key: format!("r{n:04}sim0rotated0key0000000000000"),
        ..SimCredentials::default()
    }
}

/// `shop test m1` with the shop accepting only `creds` (no M1 session left
/// from other credentials).
fn probe_with_only(d: &Daemon, sim: &Sim, creds: &SimCredentials) -> bool {
    sim.accept_credentials(vec![creds.clone()]);
    sim.expire_sessions();
    d.cli(&["shop", "test", "m1"]).status.success()
}

#[test]
fn crash_soak_both_platforms() {
    let rounds = env_u64("COBBYD_SOAK_ROUNDS").unwrap_or(8) as usize;
    let seed = env_u64("COBBYD_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("crash soak: {rounds} rounds, seed {seed} (COBBYD_SOAK_SEED={seed} repeats it)");
    let mut rng = Rng::new(seed);
    let m1 = Sim::start(2_000);
    let m2 = Sim::start(3_000);
    let victim_sim = Sim::start(VICTIM_PRODUCTS);
    let mut d = Daemon::start(
        "[probe]\ninterval = \"700ms\"\n\n[sync]\ninterval = \"24h\"\nfull_interval = \"240h\"\npage_size = 50\nm1_id_range = 200\nm1_batch_size = 25\nkeep_runs = 1000\n",
    );
    add(&d, &m1, "m1", P::M1, &[]);
    add(&d, &m2, "m2", P::M2, &[]);
    add(&d, &victim_sim, "victim", P::M2, &[]);
    let mut creds = SimCredentials::default();
    let mut victim_present = true;
    let mut log = Vec::new();
    let mut covered = 0;
    // Each kind once per cycle, in an order the seed picks.
    let mut order = CYCLE;
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    for round in 0..rounds {
        let kind = order[round % order.len()];
        let when = format!("round {round} ({kind:?}, seed {seed})");
        // The catalogs change between rounds.
        let mut what = Vec::new();
        for (name, sim) in [("m1", &m1), ("m2", &m2)] {
            let t = sim.touch(rng.range(1, 150) as usize).len();
            let c = sim.create(rng.range(0, 30) as usize).len();
            let x = sim.delete(rng.range(0, 15) as usize).len();
            what.push(format!("{name}: touch {t}, create {c}, delete {x}"));
        }
        if kind == Kill::Remove && !victim_present {
            add(&d, &victim_sim, "victim", P::M2, &[]);
            victim_present = true;
        }
        // Every answer a little late, so that a sync spans many moments.
        for sim in [&m1, &m2, &victim_sim] {
            sim.set_fault(Fault::Slow(Duration::from_millis(2)));
        }
        for name in ["m1", "m2"] {
            let full = rng.range(0, 2) == 0;
            start_sync(&d, name, full);
            what.push(format!(
                "{name} {}",
                if full { "full sync" } else { "sync" }
            ));
        }
        let delay_ms = match kind {
            Kill::MidSync => rng.range(0, 300),
            Kill::Shutdown => rng.range(0, 250),
            Kill::Probe => rng.range(0, 25),
            // The CLI starts, connects and the daemon probes (rotate) or
            // cancels a sync (remove) first: spread the kill over all of it.
            // Half the time early, while the CLI may still be connecting.
            Kill::Rotate | Kill::Remove if rng.range(0, 2) == 0 => rng.range(0, 15),
            Kill::Rotate | Kill::Remove => rng.range(0, 150),
        };
        let mut child = None;
        let mut rotate_to = None;
        match kind {
            Kill::MidSync => {
                std::thread::sleep(Duration::from_millis(delay_ms));
            }
            Kill::Shutdown => {
                std::thread::sleep(Duration::from_millis(delay_ms));
                d.signal(nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(rng.range(0, 30)));
            }
            Kill::Probe => {
                let shop = if rng.range(0, 2) == 0 { "m1" } else { "m2" };
                child = Some(spawn_cli(&d, &["shop", "test", shop], None));
                std::thread::sleep(Duration::from_millis(delay_ms));
            }
            Kill::Rotate => {
                let next = rotated(round as u64);
                m1.accept_credentials(vec![creds.clone(), next.clone()]);
                child = Some(spawn_cli(
                    &d,
                    &["shop", "rotate", "m1", "--credentials-file", "-"],
                    Some(&next.m1_toml()),
                ));
                rotate_to = Some(next);
                std::thread::sleep(Duration::from_millis(delay_ms));
            }
            Kill::Remove => {
                if rng.range(0, 2) == 0 {
                    // Sometimes with a sync of the shop to cancel.
                    start_sync(&d, "victim", true);
                    what.push("victim full sync".into());
                }
                child = Some(spawn_cli(
                    &d,
                    &["shop", "remove", "victim", "--purge"],
                    None,
                ));
                std::thread::sleep(Duration::from_millis(delay_ms));
            }
        }
        // How many syncs were going just before (for the log; a daemon
        // already draining may not answer).
        let running = ["m1", "m2"]
            .iter()
            .filter(|n| {
                d.try_http("GET", &format!("/v1/status?shop={n}"), None)
                    .ok()
                    .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                    .is_some_and(|v| !v["shops"][0]["sync"]["progress"].is_null())
            })
            .count();
        d.kill9();
        if let Some(mut c) = child {
            let _ = c.wait();
        }

        // Offline: the invariants, and no checkpoint ahead of its data.
        let report = check_state(&d, &format!("{when}, after the kill"));
        covered += assert_cursor_covered(&d, &m1, "m1", P::M1, &when);
        covered += assert_cursor_covered(&d, &m2, "m2", P::M2, &when);
        let mut outcome = String::new();
        if kind == Kill::Remove {
            if has(&report, "shops", "victim") {
                // Fully present: its mirror, checkpoint and health too (its
                // jobs: check-state).
                let m = find_mirror(&report, "victim")
                    .unwrap_or_else(|| panic!("{when}: victim without its mirror: {report:#}"));
                assert_eq!(m["owner"], "registered", "{when}: {report:#}");
                assert_eq!(
                    m["products"].as_u64(),
                    Some(VICTIM_PRODUCTS as u64),
                    "{when}: {report:#}"
                );
                assert!(m["cursor_updated_at"].is_string(), "{when}: {report:#}");
                assert!(has(&report, "health", "victim"), "{when}: {report:#}");
                outcome = "victim still registered".into();
            } else {
                assert!(!has(&report, "health", "victim"), "{when}: {report:#}");
                if let Some(m) = find_mirror(&report, "victim") {
                    // Trees not dropped yet: the next start finishes.
                    assert_eq!(m["owner"], "removing", "{when}: {report:#}");
                    outcome = "victim removed, trees left to the next start".into();
                } else {
                    outcome = "victim removed".into();
                }
            }
        }

        d.restart();
        for sim in [&m1, &m2, &victim_sim] {
            sim.set_fault(Fault::None);
        }
        if let Some(next) = rotate_to {
            // The record holds the old or the new credentials, whole:
            // exactly one set works.
            let old_ok = probe_with_only(&d, &m1, &creds);
            let new_ok = probe_with_only(&d, &m1, &next);
            assert!(
                old_ok != new_ok,
                "{when}: after a kill during rotate, old credentials work: {old_ok}, new ones: {new_ok}\nlog tail:\n{}",
                tail(&d, 40)
            );
            if new_ok {
                creds = next;
                outcome = "rotated".into();
            } else {
                outcome = "not rotated".into();
            }
            assert!(probe_with_only(&d, &m1, &creds), "{when}");
        }
        if kind == Kill::Remove {
            if d.http("GET", "/v1/shops/victim", None).0 == 200 {
                // Still there: removing it again works.
                let out = d.cli(&["shop", "remove", "victim", "--purge"]);
                assert!(
                    out.status.success(),
                    "{when}: remove again: {}",
                    stderr(&out)
                );
            }
            victim_present = false;
            // Stopped cleanly, nothing of it is left.
            d.signal(nix::sys::signal::Signal::SIGTERM);
            assert!(d.wait_exit().success(), "{when}");
            let report = check_state(&d, &format!("{when}, after the removal"));
            assert_victim_gone(&report, &when);
            d.restart();
        }

        // The next completed sync (a full reconcile: deletions included)
        // brings the catalog exactly.
        for (name, sim, p) in [("m1", &m1, P::M1), ("m2", &m2, P::M2)] {
            full_sync(&d, name);
            let got = export(&d, name, None);
            assert_same(&format!("{when}: {name}"), &got, &p.items(sim, "default"));
        }
        log.push(format!(
            "round {round}: {kind:?} after {delay_ms} ms, {running} sync(s) running; {}{}",
            what.join("; "),
            if outcome.is_empty() {
                String::new()
            } else {
                format!("; {outcome}")
            }
        ));
    }
    // A clean stop leaves a state that passes, too.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
    check_state(&d, "after the last round");
    eprintln!(
        "crash soak (seed {seed}):\n{}\n{covered} catalog products checked against checkpoints",
        log.join("\n")
    );
}
