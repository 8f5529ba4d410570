//! Magento 2 listings that lie, bad product data, and the concurrent id
//! walk: the mirror never loses a product on a bad answer, checkpoints never
//! freeze, a catalog without end is bounded, the full reconcile compares
//! content, counters add up, and a SIGKILL in the middle of a concurrent
//! walk resumes every range.

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::Fault;
use serde_json::Value;
use std::time::Duration;

/// `sync NAME [--full] --wait` whatever the outcome; the run it waited for.
fn run_any(d: &Daemon, name: &str, full: bool) -> Value {
    let before = run_id(&d.shop(name));
    let _ = sync_wait_any(d, name, full);
    let s = wait_idle_after(d, name, before);
    s["sync"]["last_run"].clone()
}

fn products(d: &Daemon, name: &str) -> u64 {
    d.shop(name)["sync"]["products"].as_u64().unwrap_or(0)
}

fn message(run: &Value) -> String {
    run["error"]["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn m2_lying_listings_never_delete() {
    let sim = Sim::start(300);
    let d = daemon("page_size = 20\n");
    add(&d, &sim, "m2", P::M2, &[]);
    assert_eq!(products(&d, "m2"), 300);
    // Five products really go: a complete listing would delete them.
    let gone = sim.delete(5);
    // Full pages with a total_count below what they hold.
    sim.set_fault(Fault::ShortTotal { total: 5 });
    let r = run_any(&d, "m2", true);
    assert_eq!(r["outcome"], "partial", "{r:#}\n{}", tail(&d, 40));
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    assert!(message(&r).contains("total_count"), "{r:#}");
    assert_eq!(r["deleted"], 0, "{r:#}");
    assert_eq!(products(&d, "m2"), 300, "a lying total deleted products");
    // A listing that holds 10 of the products it announces.
    sim.set_fault(Fault::PartialListing { items: 10 });
    let r = run_any(&d, "m2", true);
    assert!(
        r["outcome"] == "partial" || r["outcome"] == "failed",
        "{r:#}"
    );
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    assert_eq!(
        products(&d, "m2"),
        300,
        "a partial listing deleted products"
    );
    // An incremental run meets it too: 30 changes, a few listed.
    sim.touch(30);
    let r = run_any(&d, "m2", false);
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert!(message(&r).contains("ended after"), "{r:#}");
    assert_eq!(products(&d, "m2"), 300);
    // The shop answers again: a complete listing deletes what is gone.
    sim.set_fault(Fault::None);
    let r = full_sync(&d, "m2");
    assert_eq!(r["deleted"], 5, "{r:#}");
    let got = export(&d, "m2", None);
    for s in &gone {
        assert!(!got.iter().any(|v| v["sku"] == s.as_str()), "{s} kept");
    }
    assert_same("after the honest full sync", &got, &sim.m2_items("default"));
}

#[test]
fn m2_bad_updated_at_never_freezes_the_checkpoint() {
    let sim = Sim::start(200);
    let d = daemon("page_size = 20\n");
    add(&d, &sim, "m2", P::M2, &[]);
    let skus = sim.skus();
    let future = skus[3].clone();
    sim.render_updated_at(std::slice::from_ref(&future), "9999-12-31 23:59:59");
    let r = run_any(&d, "m2", false);
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert!(
        message(&r).contains(&future),
        "the run names {future}: {r:#}"
    );
    let cursor = d.shop("m2")["sync"]["stores"]["default"]["cursor_updated_at"].clone();
    assert!(
        cursor.as_str().is_some_and(|c| c < "9999"),
        "checkpoint moved to the future: {cursor}"
    );
    let got = export(&d, "m2", None);
    let line = got.iter().find(|v| v["sku"] == future.as_str()).unwrap();
    assert_eq!(line["updated_at"], "9999-12-31 23:59:59", "stored as sent");
    // Later changes are still found.
    let touched = sim.touch(3);
    let r = run_any(&d, "m2", false);
    assert!(r["fetched"].as_u64().unwrap_or(0) >= 3, "{r:#}");
    let got = export(&d, "m2", None);
    for s in &touched {
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(Some(line), sim.m2_item(s, "default").as_ref(), "{s}");
    }
    // A value that is no time at all.
    let garbled = skus[7].clone();
    sim.touch_skus(std::slice::from_ref(&garbled));
    sim.render_updated_at(std::slice::from_ref(&garbled), "zzzz-not-a-date");
    let r = run_any(&d, "m2", false);
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert!(message(&r).contains(&garbled), "{r:#}");
    let cursor = d.shop("m2")["sync"]["stores"]["default"]["cursor_updated_at"].clone();
    assert!(cursor.as_str().is_some_and(|c| c < "9999"), "{cursor}");
    let touched = sim.touch(2);
    run_any(&d, "m2", false);
    let got = export(&d, "m2", None);
    for s in &touched {
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(Some(line), sim.m2_item(s, "default").as_ref(), "{s}");
    }
}

/// A checkpoint frozen in the future by an earlier build (written into the
/// stopped daemon's state) is repaired by a full sync.
#[test]
fn m2_full_sync_repairs_a_frozen_checkpoint() {
    let sim = Sim::start(200);
    let mut d = daemon("page_size = 20\n");
    add(&d, &sim, "m2", P::M2, &[]);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit();
    {
        let store = cobbyd::store::Store::open(&d.state_dir, 4).unwrap();
        let m = cobbyd::mirror::Mirror::open(&store, "m2", "default").unwrap();
        let mut c = m.cursor().unwrap();
        c.updated_at = Some("9999-12-31 23:59:59".into());
        c.last_id = 7;
        m.save_cursor(&c).unwrap();
        store.flush_blocking().unwrap();
    }
    d.restart();
    let touched = sim.touch(4);
    // Frozen: an incremental run finds nothing.
    let r = run_any(&d, "m2", false);
    assert_eq!(r["fetched"], 0, "{r:#}");
    let r = full_sync(&d, "m2");
    assert_eq!(r["updated"], 4, "{r:#}");
    let cursor = d.shop("m2")["sync"]["stores"]["default"]["cursor_updated_at"].clone();
    assert!(
        cursor.as_str().is_some_and(|c| c < "9999"),
        "not repaired: {cursor}"
    );
    let more = sim.touch(2);
    let r = run_any(&d, "m2", false);
    assert_eq!(r["outcome"], "ok", "{r:#}");
    let got = export(&d, "m2", None);
    for s in touched.iter().chain(&more) {
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(Some(line), sim.m2_item(s, "default").as_ref(), "{s}");
    }
}

#[test]
fn m2_endless_catalog_is_bounded() {
    let sim = Sim::start(300);
    let d = daemon("page_size = 50\n");
    add(&d, &sim, "m2", P::M2, &[]);
    sim.set_fault(Fault::Endless {
        total: 1_000_000_000_000,
    });
    for full in [false, true] {
        let r = run_any(&d, "m2", full);
        assert_eq!(r["outcome"], "failed", "{r:#}");
        assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
        assert_eq!(products(&d, "m2"), 300, "{r:#}");
    }
    // A plausible count, and still no end: the run stops past the count
    // the shop announced (or the mirror's size) plus a margin.
    sim.set_fault(Fault::Endless { total: 2_000 });
    let r = run_any(&d, "m2", false);
    assert_eq!(r["outcome"], "failed", "{r:#}");
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    assert!(message(&r).contains("does not end"), "{r:#}");
    let n = products(&d, "m2");
    assert!(n <= 300 + 3_000 + 50, "the mirror grew to {n}");
    let r = run_any(&d, "m2", true);
    assert_eq!(r["outcome"], "failed", "{r:#}");
    assert_eq!(products(&d, "m2"), n, "{r:#}");
}

#[test]
fn m2_full_sync_finds_changes_that_left_updated_at_alone() {
    let sim = Sim::start(500);
    let d = daemon("page_size = 50\n");
    add(&d, &sim, "m2", P::M2, &[]);
    let changed = sim.change_silently(7);
    let r = run_any(&d, "m2", false);
    assert_eq!(r["updated"], 0, "incremental cannot see them: {r:#}");
    let r = full_sync(&d, "m2");
    assert_eq!(r["updated"], 7, "{r:#}");
    assert_eq!(r["fetched"], 500, "{r:#}");
    let got = export(&d, "m2", None);
    for s in &changed {
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(Some(line), sim.m2_item(s, "default").as_ref(), "{s}");
    }
    assert_same("after the full sync", &got, &sim.m2_items("default"));
}

#[test]
fn m2_counters_add_up() {
    let sim = Sim::start(3_000);
    let d = daemon("page_size = 200\nshop_concurrency = 4\n");
    let s = add(&d, &sim, "m2", P::M2, &[]);
    let r = &s["sync"]["last_run"];
    assert_eq!(
        (r["fetched"].as_u64(), r["created"].as_u64()),
        (Some(3_000), Some(3_000)),
        "{r:#}"
    );
    // A full sync, watched: its progress total is the catalog.
    sim.set_fault(Fault::Slow(Duration::from_millis(20)));
    let before = start_sync(&d, "m2", true);
    let mut totals = std::collections::BTreeSet::new();
    let t = std::time::Instant::now();
    loop {
        let s = d.shop("m2");
        if let Some(n) = s["sync"]["progress"]["total"].as_u64() {
            totals.insert(n);
            let done = s["sync"]["progress"]["done"].as_u64().unwrap_or(0);
            assert!(done <= 3_000, "progress counts {done}: {s:#}");
        }
        if run_id(&s) > before && s["sync"]["progress"].is_null() {
            break;
        }
        assert!(t.elapsed() < WAIT, "the full sync did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    sim.set_fault(Fault::None);
    assert!(
        totals.iter().all(|n| *n == 3_000),
        "progress totals {totals:?}"
    );
    let r = &runs(&d, "m2").into_iter().last().unwrap();
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(
        (r["fetched"].as_u64(), r["unchanged"].as_u64()),
        (Some(3_000), Some(3_000)),
        "{r:#}"
    );
    // One change, then none: the boundary second re-read is not a product.
    sim.touch(1);
    let r = run_any(&d, "m2", false);
    assert_eq!(
        (r["fetched"].as_u64(), r["updated"].as_u64()),
        (Some(1), Some(1)),
        "{r:#}"
    );
    let r = run_any(&d, "m2", false);
    assert_eq!(
        (r["fetched"].as_u64(), r["unchanged"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
}

#[test]
fn m2_id_zero_and_one_sku_on_many_ids() {
    let sim = Sim::start(100);
    let zero = sim.render_id_zero();
    let d = daemon("page_size = 20\n");
    add(&d, &sim, "m2", P::M2, &[]);
    assert_eq!(products(&d, "m2"), 100);
    for _ in 0..2 {
        let r = full_sync(&d, "m2");
        assert_eq!(r["deleted"], 0, "id 0 deleted: {r:#}");
        assert_eq!(products(&d, "m2"), 100);
    }
    let got = export(&d, "m2", None);
    let line = got.iter().find(|v| v["sku"] == zero.as_str()).unwrap();
    assert_eq!(line["id"], 0);
    let shared = sim.duplicate_sku(4);
    let r = run_any(&d, "m2", true);
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert!(message(&r).contains(&shared), "names {shared}: {r:#}");
    assert!(message(&r).contains("more than one product id"), "{r:#}");
}

/// SIGKILL in the middle of a concurrent first sync: `check-state` passes
/// on what was left (ranges included), the next start resumes every range,
/// and the resumed run fetches exactly what was not stored: nothing twice,
/// nothing skipped.
#[test]
fn m2_sigkill_mid_concurrent_walk_resumes_every_range() {
    const N: u64 = 6_000;
    let sim = Sim::start(N as usize);
    let mut d = daemon("page_size = 50\nshop_concurrency = 4\n");
    sim.set_fault(Fault::Slow(Duration::from_millis(10)));
    let out = d.add_shop("m2", "magento2", &sim.url(), &P::M2.creds(&sim), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_shop("m2", "first sync under way", |s| {
        s["sync"]["progress"]["done"].as_u64().unwrap_or(0) >= 1_500
    });
    d.kill9();
    let out = d.cli(&["check-state", "--json"]);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(
        out.status.success(),
        "check-state: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let m = report["mirrors"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["shop"] == "m2"))
        .cloned()
        .unwrap_or_default();
    let stored = m["products"].as_u64().unwrap();
    let ranges = m["id_ranges"].as_array().cloned().unwrap_or_default();
    assert_eq!(m["run_phase"], "walk", "{m:#}");
    assert!(ranges.len() >= 2, "a concurrent walk left {ranges:?}");
    assert!((1_500..N).contains(&stored), "{m:#}");
    assert!(
        sim.counters().max_in_flight >= 3,
        "requests in flight at once: {}",
        sim.counters().max_in_flight
    );
    d.restart();
    let s = wait_idle_after(&d, "m2", 0);
    let r = &s["sync"]["last_run"];
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(r["resumed"], true, "{r:#}");
    assert_eq!(r["fetched"].as_u64(), Some(N - stored), "{r:#}");
    assert_eq!(r["created"].as_u64(), Some(N - stored), "{r:#}");
    sim.set_fault(Fault::None);
    let got = export(&d, "m2", None);
    assert_eq!(got.len() as u64, N);
    assert_same("after the resumed walk", &got, &sim.m2_items("default"));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit();
    let out = d.cli(&["check-state"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}
