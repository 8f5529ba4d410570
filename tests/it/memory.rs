//! The daemon's peak memory against answers built to blow it up: it must
//! stay a small multiple of `sync.max_response_mb`, whatever the shop
//! sends.
//!
//! The numbers are printed (`--nocapture`); `COBBYD_MEASURE_BIN=PATH` runs
//! another build of the daemon (an older one, to compare) against the same
//! simulator, without the assertion.

use crate::harness::*;
use cobbyd::sim::Fault;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `VmHWM` (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Items of the huge page: tiny products of 67 bytes, just under 64 MiB in
/// all (the default `sync.max_response_mb`), so the size cap alone lets the
/// answer through.
const ITEMS: u64 = 950_000;
const LIMIT_MIB: u64 = 64;

#[test]
fn a_page_of_a_million_tiny_items_stays_within_a_small_multiple_of_the_limit() {
    let other: Option<PathBuf> = std::env::var_os("COBBYD_MEASURE_BIN").map(PathBuf::from);
    let bin = other.clone().unwrap_or_else(|| PathBuf::from(BIN));
    let sim = Sim::start(50);
    let d = Daemon::start_bin(
        Path::new(&bin),
        &format!("[sync]\nmax_response_mb = {LIMIT_MIB}\n"),
        &[],
    );
    d.add_synced_m2_shop("big", &sim);
    let before = vm_hwm_kib(d.pid());
    let prev = d.shop("big")["sync"]["last_run"]["run_id"]
        .as_u64()
        .unwrap_or(0);
    sim.set_fault(Fault::HugePage { items: ITEMS });
    let (code, body) = d.http("POST", "/v1/shops/big/sync", Some(r#"{"full": true}"#));
    assert_eq!(code, 202, "{body}");
    let t = Instant::now();
    let mut run = serde_json::Value::Null;
    while t.elapsed() < WAIT * 3 {
        let s = d.shop("big");
        if s["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0) > prev {
            run = s["sync"]["last_run"].clone();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let after = vm_hwm_kib(d.pid());
    sim.set_fault(Fault::None);
    eprintln!(
        "memory: daemon {} VmHWM {} KiB before, {} KiB after a {} MB page of {ITEMS} items (run: {} {})",
        bin.display(),
        before,
        after,
        (ITEMS * 67) / 1_000_000,
        run["outcome"],
        run["error"]["message"]
    );
    if other.is_some() {
        return;
    }
    assert_eq!(run["outcome"], "failed", "{run:#}");
    assert_eq!(run["error"]["kind"], "protocol", "{run:#}");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("products per page asked for"),
        "{run:#}"
    );
    // The answer's bytes once, and a little: never a tree of the page.
    let bound = before + 3 * LIMIT_MIB * 1024;
    assert!(
        after <= bound,
        "peak {after} KiB after the page, {before} KiB before: more than 3 × max_response_mb over"
    );
    // Nothing of the made-up page reached the mirror.
    assert_eq!(d.shop("big")["sync"]["products"], 50, "{}", d.shop("big"));
}
