//! Product synchronisation end to end: the real daemon mirrors simulated
//! Magento 1 and Magento 2 shops over real HTTP, and the mirror is compared
//! with the simulator's catalog field by field.

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::Fault;
use std::time::Duration;

#[test]
fn m2_full_sync_mirrors_two_store_views() {
    let sim = Sim::start(10_000);
    let d = daemon("page_size = 200\n");
    let s = add(
        &d,
        &sim,
        "m2",
        P::M2,
        &["--store-code", "default", "--store-code", "fr"],
    );
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{s:#}");
    assert_eq!(s["sync"]["products"], 20_000, "{s:#}");
    assert_eq!(s["sync"]["stores"]["fr"]["products"], 10_000, "{s:#}");
    assert_mirror(&d, &sim, "m2", P::M2, None);
    assert_mirror(&d, &sim, "m2", P::M2, Some("default"));
    assert_mirror(&d, &sim, "m2", P::M2, Some("fr"));
    // The views differ (French names), so each came from its own view.
    let (en, fr) = (export(&d, "m2", None), export(&d, "m2", Some("fr")));
    assert_ne!(en[0]["name"], fr[0]["name"]);
    // A full reconcile of an unchanged catalog changes nothing.
    let r = sync_wait(&d, "m2", true);
    assert_eq!(
        (
            r["created"].as_u64(),
            r["updated"].as_u64(),
            r["deleted"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r:#}"
    );
    assert_mirror(&d, &sim, "m2", P::M2, Some("fr"));
}

#[test]
fn m1_full_sync_mirrors_the_catalog() {
    let sim = Sim::start(10_000);
    let d = daemon("");
    let s = add(&d, &sim, "m1", P::M1, &[]);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{s:#}");
    assert_eq!(s["sync"]["products"], 10_000, "{s:#}");
    assert_mirror(&d, &sim, "m1", P::M1, None);
}

#[test]
fn m2_incremental_sync_asks_for_the_changes_only() {
    let sim = Sim::start(10_000);
    let d = daemon("page_size = 20\n");
    add(&d, &sim, "m2", P::M2, &[]);
    let full_pages = sim.counters().m2_product_pages;
    assert!(
        full_pages >= 500,
        "the first sync read {full_pages} pages of 20 for 10,000 products"
    );
    let k = 37u64;
    let touched = sim.touch(k as usize);
    let before = sim.counters().m2_product_pages;
    let r = sync_wait(&d, "m2", false);
    let pages = sim.counters().m2_product_pages - before;
    eprintln!(
        "m2 incremental: {pages} product pages for {k} changes (page size 20; full sync: {full_pages})"
    );
    assert!(
        pages >= k.div_ceil(20),
        "{pages} pages cannot hold {k} products"
    );
    assert!(
        pages <= k.div_ceil(20) + 2,
        "incremental sync of {k} changes asked for {pages} pages\n{r:#}"
    );
    assert!(
        pages * 20 < full_pages,
        "{pages} pages vs {full_pages} for the whole catalog"
    );
    assert_eq!(r["updated"], k, "{r:#}");
    assert_eq!(r["created"], 0, "{r:#}");
    let got = export(&d, "m2", None);
    for s in &touched {
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(Some(line), sim.m2_item(s, "default").as_ref(), "{s}");
    }
    assert_same("after the incremental sync", &got, &sim.m2_items("default"));
    // Nothing changed since: one page, empty.
    let before = sim.counters().m2_product_pages;
    let r = sync_wait(&d, "m2", false);
    let pages = sim.counters().m2_product_pages - before;
    eprintln!("m2 incremental without changes: {pages} product pages");
    assert!(pages <= 2, "{pages} pages for no change\n{r:#}");
    assert_eq!(
        (r["updated"].as_u64(), r["created"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
}

#[test]
fn m1_incremental_sync_fetches_the_changes_only() {
    let sim = Sim::start(10_000);
    let d = daemon("");
    add(&d, &sim, "m1", P::M1, &[]);
    let full_items = sim.counters().m1_multicall_items;
    assert!(
        full_items >= 10_000,
        "first sync fetched {full_items} products"
    );
    // The incremental re-reads the checkpoint's second: the products that
    // share the newest `updated_at` of the catalog.
    let items = sim.m1_items("default");
    let newest = items
        .iter()
        .filter_map(|v| v["updated_at"].as_str())
        .max()
        .unwrap()
        .to_string();
    let boundary: Vec<String> = items
        .iter()
        .filter(|v| v["updated_at"] == newest.as_str())
        .map(sku)
        .collect();
    let k = 37u64;
    let touched = sim.touch(k as usize);
    let before = sim.counters();
    let r = sync_wait(&d, "m1", false);
    let after = sim.counters();
    let fetched = after.m1_multicall_items - before.m1_multicall_items;
    let lists = after
        .by_route
        .get("xmlrpc call catalog_product.list")
        .copied()
        .unwrap_or(0)
        - before
            .by_route
            .get("xmlrpc call catalog_product.list")
            .copied()
            .unwrap_or(0);
    let boundary_left = boundary.iter().filter(|s| !touched.contains(s)).count() as u64;
    eprintln!(
        "m1 incremental: {fetched} products fetched in {} multiCalls, {lists} lists, for {k} changes (+{boundary_left} at the boundary second; full sync: {full_items})",
        after.m1_multicalls - before.m1_multicalls
    );
    assert!(
        fetched >= k && fetched <= k + boundary_left,
        "fetched {fetched} for {k} changes + {boundary_left}\n{r:#}"
    );
    assert!(fetched * 10 < full_items);
    assert_eq!(r["updated"], k, "{r:#}");
    assert_same(
        "after the incremental sync",
        &export(&d, "m1", None),
        &sim.m1_items("default"),
    );
    // Unchanged since: only the boundary second (the touched ones) again.
    let before = sim.counters().m1_multicall_items;
    let r = sync_wait(&d, "m1", false);
    let fetched = sim.counters().m1_multicall_items - before;
    assert!(
        fetched <= k,
        "fetched {fetched} with nothing changed\n{r:#}"
    );
    assert_eq!(
        (r["updated"].as_u64(), r["created"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
}

/// Deletions are invisible to `updated_at`: an incremental sync keeps the
/// deleted products and picks up the created ones; a full reconcile removes
/// the deleted ones.
fn deletes_and_creates(p: P) {
    let sim = Sim::start(3_000);
    let d = daemon("page_size = 100\nm1_id_range = 500\n");
    let name = "shop";
    add(&d, &sim, name, p, &[]);
    assert_mirror(&d, &sim, name, p, None);
    let old = p.items(&sim, "default");
    let deleted = sim.delete(25);
    let created = sim.create(30);
    assert_eq!(sim.product_count(), 3_005);
    let r = sync_wait(&d, name, false);
    assert_eq!(r["created"], 30, "{r:#}");
    assert_eq!(r["deleted"], 0, "{r:#}");
    let got = export(&d, name, None);
    let skus = unique_skus(&got);
    assert_eq!(
        got.len(),
        3_000 + 30,
        "incremental: deleted products stay, created ones arrive"
    );
    for s in &deleted {
        assert!(
            skus.contains(s),
            "{s} left the mirror without a full reconcile"
        );
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(
            Some(line),
            old.iter().find(|v| v["sku"] == s.as_str()),
            "{s}"
        );
    }
    let now = p.items(&sim, "default");
    for s in &created {
        assert!(
            skus.contains(s),
            "created {s} missing after the incremental sync"
        );
        let line = got.iter().find(|v| v["sku"] == s.as_str()).unwrap();
        assert_eq!(
            Some(line),
            now.iter().find(|v| v["sku"] == s.as_str()),
            "{s}"
        );
    }
    assert_eq!(d.shop(name)["sync"]["products"], 3_030);
    let r = sync_wait(&d, name, true);
    assert_eq!(r["deleted"], 25, "{r:#}");
    assert_eq!(r["created"], 0, "{r:#}");
    assert_mirror(&d, &sim, name, p, None);
    let s = d.shop(name);
    assert_eq!(s["sync"]["products"], 3_005, "{s:#}");
    assert_eq!(s["sync"]["stores"]["default"]["resumable"], false, "{s:#}");
}

#[test]
fn m2_deletes_need_a_full_reconcile_creates_do_not() {
    deletes_and_creates(P::M2);
}

#[test]
fn m1_deletes_need_a_full_reconcile_creates_do_not() {
    deletes_and_creates(P::M1);
}

/// Hundreds of products sharing one `updated_at` second across page
/// boundaries: none lost, none doubled.
fn shared_second(p: P) {
    let sim = Sim::start(5_000);
    let d = daemon("page_size = 200\n");
    add(&d, &sim, "shop", p, &[]);
    let skus: Vec<String> = sim.skus().into_iter().step_by(11).take(450).collect();
    assert_eq!(skus.len(), 450);
    let ts = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    sim.set_updated_at(&skus, &ts);
    let before = sim.counters();
    let r = sync_wait(&d, "shop", false);
    let after = sim.counters();
    eprintln!(
        "{p:?} shared second: {} product pages, {} products fetched over multiCall, run {r}",
        after.m2_product_pages - before.m2_product_pages,
        after.m1_multicall_items - before.m1_multicall_items
    );
    assert_eq!(r["updated"], 450, "{r:#}");
    let got = export(&d, "shop", None);
    assert_eq!(got.len(), sim.product_count());
    unique_skus(&got);
    assert_same(
        "after the shared-second sync",
        &got,
        &p.items(&sim, "default"),
    );
    // Again, with the checkpoint inside that second: nothing new, nothing lost.
    let more: Vec<String> = sim
        .skus()
        .into_iter()
        .skip(3)
        .step_by(13)
        .take(300)
        .collect();
    sim.set_updated_at(&more, &ts);
    let r = sync_wait(&d, "shop", false);
    let changed = more.iter().filter(|s| !skus.contains(s)).count();
    assert!(r["updated"].as_u64().unwrap() >= changed as u64, "{r:#}");
    assert_same(
        "after the second shared-second sync",
        &export(&d, "shop", None),
        &p.items(&sim, "default"),
    );
}

#[test]
fn m2_products_sharing_a_second_across_pages() {
    shared_second(P::M2);
}

#[test]
fn m1_products_sharing_a_second() {
    shared_second(P::M1);
}

/// A fault that starts in the middle of a sync fails the run cleanly: the
/// daemon stays up, status says why, the mirror holds whole products only,
/// and the next sync (fault gone) completes the mirror.
fn fault_mid_sync(p: P, fault: Fault, kinds: &[&str]) {
    let sim = Sim::start(3_000);
    let d = daemon(
        "page_size = 50\nm1_batch_size = 20\nshop_concurrency = 1\nrequest_timeout = \"5s\"\n",
    );
    add(&d, &sim, "shop", p, &[]);
    let old = p.items(&sim, "default");
    sim.touch(2_000);
    let new = p.items(&sim, "default");
    sim.set_fault(Fault::Slow(Duration::from_millis(30)));
    let before = start_sync(&d, "shop", false);
    d.wait_shop("shop", "sync half way", |s| {
        s["sync"]["progress"]["done"].as_u64().unwrap_or(0) >= 300
    });
    sim.set_fault(fault.clone());
    let s = wait_idle_after(&d, "shop", before);
    let last = &s["sync"]["last_run"];
    assert_eq!(
        last["outcome"],
        "failed",
        "{fault:?}: {s:#}\nlog tail:\n{}",
        tail(&d, 40)
    );
    let kind = last["error"]["kind"].as_str().unwrap_or_default();
    assert!(
        kinds.contains(&kind),
        "{fault:?}: error kind {kind:?}, expected one of {kinds:?}: {s:#}"
    );
    assert!(
        !last["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{s:#}"
    );
    assert_eq!(s["sync"]["last_error"]["kind"], kind, "{s:#}");
    assert_eq!(
        d.http("GET", "/health", None).0,
        200,
        "the daemon went away:\n{}",
        tail(&d, 40)
    );
    assert!(sim.counters().faults_injected > 0);
    // Whole products only, and the pages stored before the fault are kept.
    let got = export(&d, "shop", None);
    assert_eq!(got.len(), 3_000);
    let fresh = assert_old_or_new(&format!("{fault:?}"), &got, &old, &new);
    assert!(
        fresh >= 300 && fresh < 2_000,
        "{fresh} products new after a run that failed half way"
    );
    assert_eq!(s["sync"]["stores"]["default"]["resumable"], true, "{s:#}");
    // The text status tells the reason too.
    let text = stdout(&d.cli(&["status"]));
    assert!(text.contains("failed"), "{text}");
    sim.set_fault(Fault::None);
    let r = sync_wait(&d, "shop", false);
    assert_eq!(r["resumed"], true, "{r:#}");
    assert_same(
        &format!("after {fault:?} cleared"),
        &export(&d, "shop", None),
        &new,
    );
}

#[test]
fn m2_truncated_answers_mid_sync_fail_cleanly_and_resume() {
    fault_mid_sync(P::M2, Fault::Truncated, &["protocol", "connect"]);
}
