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
        (300..2_000).contains(&fresh),
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

#[test]
fn m2_garbage_answers_mid_sync_fail_cleanly_and_resume() {
    fault_mid_sync(P::M2, Fault::Garbage, &["protocol", "not_api"]);
}

#[test]
fn m1_garbage_answers_mid_sync_fail_cleanly_and_resume() {
    fault_mid_sync(P::M1, Fault::Garbage, &["protocol", "not_api"]);
}

#[test]
fn m1_truncated_answers_mid_sync_fail_cleanly_and_resume() {
    fault_mid_sync(P::M1, Fault::Truncated, &["protocol", "connect"]);
}

/// Flaky answers (every third request a 500) are retried: the syncs
/// complete, incremental and full, and the mirror equals the catalog.
fn flaky(p: P) {
    // Small: every failed request costs a backoff of half a second or more.
    let sim = Sim::start(1_500);
    let d = daemon("page_size = 100\nm1_batch_size = 50\nm1_id_range = 500\n");
    add(&d, &sim, "shop", p, &[]);
    sim.touch(300);
    sim.create(20);
    sim.reset_counters();
    sim.set_fault(Fault::Flaky { every: 3 });
    let r = sync_wait(&d, "shop", false);
    assert!(sim.counters().faults_injected > 0, "no fault was injected");
    assert!(
        r["requests"].as_u64() > r["pages"].as_u64(),
        "no retry counted: {r:#}"
    );
    assert_same(
        "flaky incremental",
        &export(&d, "shop", None),
        &p.items(&sim, "default"),
    );
    sim.delete(15);
    sim.touch(100);
    let r = full_sync(&d, "shop");
    assert_eq!(r["deleted"], 15, "{r:#}");
    sim.set_fault(Fault::None);
    assert_mirror(&d, &sim, "shop", p, None);
    assert_eq!(
        d.shop("shop")["sync"]["last_error"],
        serde_json::Value::Null
    );
}

#[test]
fn m2_flaky_answers_are_retried() {
    flaky(P::M2);
}

#[test]
fn m1_flaky_answers_are_retried() {
    flaky(P::M1);
}

/// Requests that outlast `request_timeout` fail the run with kind
/// `timeout` after the retries; with the shop fast again the next sync
/// completes.
#[test]
fn m2_slow_answers_time_out_cleanly() {
    let sim = Sim::start(1_000);
    let d = daemon("page_size = 100\nrequest_timeout = \"1s\"\n");
    add(&d, &sim, "shop", P::M2, &[]);
    sim.touch(300);
    // Slow but within the timeout: fine.
    sim.set_fault(Fault::Slow(Duration::from_millis(200)));
    sync_wait(&d, "shop", false);
    assert_mirror(&d, &sim, "shop", P::M2, None);
    sim.touch(300);
    let want = sim.m2_items("default");
    sim.set_fault(Fault::Slow(Duration::from_millis(2_500)));
    let out = sync_wait_any(&d, "shop", false);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("timeout"), "{}", stderr(&out));
    let s = d.shop("shop");
    assert_eq!(s["sync"]["last_run"]["outcome"], "failed", "{s:#}");
    assert_eq!(s["sync"]["last_error"]["kind"], "timeout", "{s:#}");
    assert_eq!(d.http("GET", "/health", None).0, 200);
    sim.set_fault(Fault::None);
    sync_wait(&d, "shop", false);
    assert_same("after the timeouts", &export(&d, "shop", None), &want);
}

/// 429 with `Retry-After`: the sync waits as asked (not sooner) and
/// completes once the shop lets it.
#[test]
fn m2_rate_limit_honours_retry_after() {
    let sim = Sim::start(2_000);
    let d = daemon("page_size = 100\n");
    add(&d, &sim, "shop", P::M2, &[]);
    sim.touch(400);
    sim.reset_counters();
    sim.set_fault(Fault::RateLimited { retry_after_s: 4 });
    let before = start_sync(&d, "shop", false);
    let t = std::time::Instant::now();
    while sim.counters().faults_injected == 0 {
        assert!(t.elapsed() < WAIT, "the sync never asked\n{}", tail(&d, 40));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Far less than Retry-After, more than the first backoff steps: a
    // client that ignores Retry-After asks again within this window.
    std::thread::sleep(Duration::from_millis(1_800));
    let limited = sim.counters().faults_injected;
    let s = d.shop("shop");
    sim.set_fault(Fault::None);
    assert_eq!(
        limited,
        1,
        "asked again before Retry-After elapsed\n{}",
        tail(&d, 40)
    );
    assert_eq!(s["sync"]["state"], "running", "{s:#}");
    let s = wait_idle_after(&d, "shop", before);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{s:#}");
    assert_mirror(&d, &sim, "shop", P::M2, None);
}

/// Magento 1 sessions that expire while a sync runs are renewed: the sync
/// completes and the shop saw extra logins.
#[test]
fn m1_session_expiry_mid_sync_relogs_in() {
    let sim = Sim::start(3_000);
    let d = daemon("m1_batch_size = 20\nm1_id_range = 200\nshop_concurrency = 1\n");
    add(&d, &sim, "shop", P::M1, &[]);
    sim.touch(1_500);
    sim.delete(10);
    sim.set_fault(Fault::Slow(Duration::from_millis(20)));
    let logins = sim.counters().m1_logins;
    let before = start_sync(&d, "shop", true);
    d.wait_shop("shop", "full sync under way", |s| {
        s["sync"]["progress"]["done"].as_u64().unwrap_or(0) >= 300
    });
    sim.expire_sessions();
    d.wait_shop("shop", "full sync further", |s| {
        s["sync"]["progress"]["done"].as_u64().unwrap_or(0) >= 1_200
    });
    sim.expire_sessions();
    // And once more with logins themselves failing now and then.
    let (logins_now, faults_now) = (sim.counters().m1_logins, sim.counters().faults_injected);
    sim.set_fault(Fault::Flaky { every: 2 });
    sim.expire_sessions();
    let t = std::time::Instant::now();
    while sim.counters().m1_logins == logins_now || sim.counters().faults_injected < faults_now + 2
    {
        assert!(
            t.elapsed() < WAIT,
            "no login after the sessions expired\n{}",
            tail(&d, 40)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sim.set_fault(Fault::None);
    let s = wait_idle_after(&d, "shop", before);
    let last = &s["sync"]["last_run"];
    assert_eq!(last["outcome"], "ok", "{s:#}\nlog tail:\n{}", tail(&d, 60));
    assert_eq!(last["kind"], "full_sync", "{s:#}");
    let extra = sim.counters().m1_logins - logins;
    assert!(
        extra >= 2,
        "{extra} logins during a sync whose sessions expired three times"
    );
    assert_mirror(&d, &sim, "shop", P::M1, None);
}

/// The value of a product field as the CSV shows it.
fn csv_text(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The CSV export parses with a strict reader, has the documented header,
/// one row per product, and keeps awkward text intact.
fn csv_export(p: P) {
    let sim = Sim::start(2_000);
    let d = daemon("");
    add(&d, &sim, "shop", p, &[]);
    let text = export_csv(&d, "shop", None);
    let mut r = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    let fixed = [
        "sku",
        "id",
        "type",
        "name",
        "status",
        "visibility",
        "price",
        "updated_at",
    ];
    assert_eq!(&header[..8], &fixed, "{header:?}");
    let custom = &header[8..];
    let mut sorted = custom.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(custom, &sorted[..], "custom columns not sorted or repeated");
    assert!(
        custom.iter().all(|c| !fixed.contains(&c.as_str())),
        "{custom:?}"
    );
    assert!(custom.iter().any(|c| c == "description"), "{custom:?}");
    let items = p.items(&sim, "default");
    if p == P::M2 {
        let mut want: Vec<String> = items
            .iter()
            .flat_map(|v| {
                v["custom_attributes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|a| a["attribute_code"].as_str().map(str::to_string))
            .collect();
        want.sort();
        want.dedup();
        assert_eq!(custom, &want[..]);
    }
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let by_sku: std::collections::HashMap<String, &serde_json::Value> =
        items.iter().map(|v| (sku(v), v)).collect();
    let mut rows = 0;
    let mut seen = std::collections::HashSet::new();
    let (mut quoted, mut multiline, mut unicode, mut html) = (0, 0, 0, 0);
    for rec in r.records() {
        let rec = rec.unwrap_or_else(|e| panic!("row {}: {e}", rows + 2));
        rows += 1;
        assert_eq!(rec.len(), header.len());
        let s = rec[0].to_string();
        assert!(seen.insert(s.clone()), "{s} twice");
        let item = by_sku
            .get(&s)
            .unwrap_or_else(|| panic!("CSV sku {s:?} is not in the shop"));
        let id_field = if p == P::M1 { "product_id" } else { "id" };
        assert_eq!(rec[col("id")], csv_text(item.get(id_field)), "{s}");
        assert_eq!(rec[col("name")], csv_text(item.get("name")), "{s}");
        assert_eq!(rec[col("price")], csv_text(item.get("price")), "{s}");
        assert_eq!(
            rec[col("updated_at")],
            csv_text(item.get("updated_at")),
            "{s}"
        );
        let description = match p {
            P::M1 => csv_text(item.get("description")),
            P::M2 => item["custom_attributes"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["attribute_code"] == "description"))
                .map(|x| csv_text(x.get("value")))
                .unwrap_or_default(),
        };
        assert_eq!(rec[col("description")], description, "{s}");
        let name = &rec[col("name")];
        quoted += usize::from(name.contains('"') || s.contains('"'));
        multiline += usize::from(name.contains('\n'));
        unicode += usize::from(!name.is_ascii() || !s.is_ascii());
        html += usize::from(name.contains('<') || description.contains("<p>"));
    }
    assert_eq!(rows, sim.product_count());
    // The catalog holds the awkward cases, so the checks above covered them.
    assert!(
        quoted > 0 && multiline > 0 && unicode > 0 && html > 0,
        "{quoted} {multiline} {unicode} {html}"
    );
}

#[test]
fn m2_csv_export_parses_and_matches() {
    csv_export(P::M2);
}

#[test]
fn m1_csv_export_parses_and_matches() {
    csv_export(P::M1);
}

/// A running sync shows its progress in status (JSON and text).
#[test]
fn status_shows_progress_while_syncing() {
    let sim = Sim::start(2_000);
    let d = daemon("page_size = 50\n");
    sim.set_fault(Fault::Slow(Duration::from_millis(60)));
    let out = d.add_shop(
        "shop",
        "magento2",
        &sim.url(),
        &sim.credentials().m2_oauth_toml(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_shop("shop", "progress with done and total", |s| {
        let p = &s["sync"]["progress"];
        s["sync"]["state"] == "running"
            && p["done"].as_u64().unwrap_or(0) > 0
            && p["total"].as_u64().unwrap_or(0) > 0
    });
    let p = &s["sync"]["progress"];
    assert_eq!(p["total"], 2_000, "{s:#}");
    assert_eq!(p["kind"], "sync", "{s:#}");
    assert_eq!(p["store_code"], "default", "{s:#}");
    assert!(p["run_id"].as_u64().unwrap() > 0, "{s:#}");
    assert!(
        p["requests"].as_u64().unwrap() >= p["pages"].as_u64().unwrap(),
        "{s:#}"
    );
    assert!(
        p["percent"].as_f64().is_some_and(|x| x > 0.0 && x < 100.0),
        "{s:#}"
    );
    // The table says so too, while it runs.
    let t = std::time::Instant::now();
    loop {
        let out = d.cli(&["status"]);
        let text = stdout(&out);
        let line = text
            .lines()
            .find(|l| l.starts_with("shop "))
            .unwrap_or_default()
            .to_string();
        if line.contains("sync catch_up") && line.contains('%') && line.contains("/2,000)") {
            break;
        }
        assert!(
            d.shop("shop")["sync"]["state"] == "running" && t.elapsed() < WAIT,
            "status never showed the progress while running; last:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sim.set_fault(Fault::None);
    let s = wait_idle_after(&d, "shop", 0);
    assert_eq!(s["sync"]["progress"], serde_json::Value::Null);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok");
    assert_mirror(&d, &sim, "shop", P::M2, None);
}

/// SIGKILL at random moments of syncs (incremental and full, the first
/// one included) while the catalog changes between rounds: after every
/// restart the interrupted run resumes, and in the end the mirror is the
/// catalog exactly (nothing lost, nothing doubled).
fn kill_rounds(p: P) {
    const ROUNDS: usize = 10;
    let seed = seed(&format!("{p:?} kill rounds"));
    let mut rng = Rng::new(seed);
    let sim = Sim::start(10_000);
    let mut d = daemon("page_size = 50\nm1_id_range = 200\nm1_batch_size = 25\nkeep_runs = 1000\n");
    // Every answer a little late, so that a sync spans many moments.
    sim.set_fault(Fault::Slow(Duration::from_millis(3)));
    let out = d.add_shop("shop", p.platform(), &sim.url(), &p.creds(&sim), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut log = Vec::new();
    let mut killed_running = 0;
    for round in 0..ROUNDS {
        let mut what = String::new();
        let before = run_id(&d.shop("shop"));
        if round > 0 {
            match rng.range(0, 4) {
                0 => what += &format!("touch {}", sim.touch(rng.range(1, 400) as usize).len()),
                1 => what += &format!("create {}", sim.create(rng.range(1, 60) as usize).len()),
                2 => what += &format!("delete {}", sim.delete(rng.range(1, 30) as usize).len()),
                _ => {
                    let (a, b) = (
                        sim.touch(rng.range(1, 200) as usize).len(),
                        sim.create(rng.range(1, 20) as usize).len(),
                    );
                    what += &format!("touch {a}, create {b}");
                }
            }
            let full = round == 1 || rng.range(0, 4) == 0;
            what += if full { ", full sync" } else { ", sync" };
            start_sync(&d, "shop", full);
        } else {
            what += "first sync";
        }
        // Kill either blind after a random delay, or once the run is seen
        // going plus a random delay.
        let gated = round <= 1 || rng.range(0, 2) == 0;
        let delay = Duration::from_millis(rng.range(0, if gated { 400 } else { 1_500 }));
        let mut running = if gated {
            wait_running(&d, "shop", before)
        } else {
            false
        };
        if round == 0 {
            // The first sync is killed well into its work, so that its
            // resumption has something to skip.
            d.wait_shop("shop", "first sync under way", |s| {
                s["sync"]["progress"]["done"].as_u64().unwrap_or(0) >= 500
            });
        }
        std::thread::sleep(delay);
        let at_kill = d.shop("shop");
        running |= !at_kill["sync"]["progress"].is_null();
        // Stored before the kill: progress counts a page once it is flushed.
        let done_at_kill = at_kill["sync"]["progress"]["done"].as_u64().unwrap_or(0);
        d.kill9();
        d.restart();
        let mut again = "";
        // Sometimes kill the resumed run as well.
        if rng.range(0, 3) == 0 {
            std::thread::sleep(Duration::from_millis(rng.range(0, 600)));
            d.kill9();
            d.restart();
            again = ", killed again after the restart";
        }
        killed_running += usize::from(running);
        let s = wait_settled(&d, "shop");
        if round == 0 && done_at_kill > 0 {
            // The first sync resumed where it stood: no attempt after the
            // kill fetched what was stored before it.
            let after: Vec<serde_json::Value> = runs(&d, "shop")
                .into_iter()
                .filter(|r| r["resumed"] == true)
                .collect();
            assert!(
                !after.is_empty(),
                "the first sync, killed at {done_at_kill} products, did not resume"
            );
            for r in &after {
                let fetched = r["fetched"].as_u64().unwrap_or(0);
                assert!(
                    fetched + done_at_kill <= 10_000,
                    "a resumed first sync fetched {fetched} products after {done_at_kill} were stored: {r:#}"
                );
            }
        }
        // Whatever happened, no product is ever doubled.
        let got = export(&d, "shop", None);
        unique_skus(&got);
        assert_eq!(
            got.len() as u64,
            s["sync"]["products"].as_u64().unwrap(),
            "round {round}: count vs export"
        );
        log.push(format!(
            "round {round}: {what}; killed {delay:?} {}{again}",
            if running {
                "into the run"
            } else {
                "later (run maybe over)"
            }
        ));
    }
    let all = runs(&d, "shop");
    let resumed: Vec<&serde_json::Value> = all.iter().filter(|r| r["resumed"] == true).collect();
    eprintln!(
        "{p:?}: {}\n{killed_running} kills hit a running sync; {} runs resumed:",
        log.join("\n"),
        resumed.len()
    );
    for r in &resumed {
        eprintln!(
            "  run {} {} {}: {} requests, {} fetched",
            r["run_id"], r["kind"], r["outcome"], r["requests"], r["fetched"]
        );
    }
    assert!(killed_running >= 1, "no kill hit a running sync");
    assert!(!resumed.is_empty(), "no run resumed after a kill: {all:#?}");
    assert!(
        all.iter().all(|r| r["outcome"] == "ok"),
        "a run failed: {all:#?}\nlog tail:\n{}",
        tail(&d, 60)
    );
    // Catch up (new products), then reconcile (deletions): the catalog exactly.
    sim.set_fault(Fault::None);
    sync_wait(&d, "shop", false);
    full_sync(&d, "shop");
    let got = export(&d, "shop", None);
    assert_eq!(got.len(), sim.product_count(), "export lines vs products");
    unique_skus(&got);
    assert_same(
        &format!("{p:?} after {ROUNDS} kill rounds (seed {seed})"),
        &got,
        &p.items(&sim, "default"),
    );
    assert_eq!(
        d.shop("shop")["sync"]["products"].as_u64(),
        Some(sim.product_count() as u64)
    );
}

#[test]
fn m2_sigkill_during_syncs_loses_nothing() {
    kill_rounds(P::M2);
}

#[test]
fn m1_sigkill_during_syncs_loses_nothing() {
    kill_rounds(P::M1);
}
