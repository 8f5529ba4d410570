//! The deletion rule and the Magento 1 answers that must not corrupt the
//! mirror: a product leaves the mirror only when a complete, consistent
//! listing says it is gone; a run that would delete more than
//! `sync.max_delete_share` deletes nothing until confirmed; per-item faults,
//! listings that ignore the id range and answers for the wrong product are
//! met with a named problem, never with deletions or an `ok`.

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::Fault;
use serde_json::Value;

fn last_run(d: &Daemon, name: &str) -> Value {
    d.shop(name)["sync"]["last_run"].clone()
}

/// A full reconcile that would delete a third of the mirror deletes
/// nothing, ends `held` with a problem naming the confirmation command;
/// the confirmed run deletes them, for that run only.
#[test]
fn mass_deletion_is_held_until_confirmed() {
    let sim = Sim::start(300);
    let d = daemon("m1_id_range = 100\nm1_batch_size = 20\n");
    add(&d, &sim, "shop", P::M1, &[]);
    assert_eq!(d.shop("shop")["sync"]["products"], 300);

    // Within the share (10% of 300 = 30): deleted as before.
    sim.delete(30);
    let r = sync_wait(&d, "shop", true);
    assert_eq!(r["deleted"], 30, "{r:#}");
    assert_mirror(&d, &sim, "shop", P::M1, None);

    // A third of the mirror: held.
    let gone = sim.delete(90);
    let out = sync_wait_any(&d, "shop", true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("sync held"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("cobbyd sync shop --full --allow-mass-delete"),
        "{}",
        stderr(&out)
    );
    let r = last_run(&d, "shop");
    assert_eq!(r["outcome"], "held", "{r:#}");
    assert_eq!(r["deleted"], 0, "{r:#}");
    assert_eq!(r["error"]["kind"], "mass_delete", "{r:#}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("90 of the 270") && msg.contains("sync.max_delete_share (10%)"),
        "{msg}"
    );
    let s = d.shop("shop");
    assert_eq!(s["sync"]["products"], 270, "{s:#}");
    let skus = unique_skus(&export(&d, "shop", None));
    assert!(gone.iter().all(|g| skus.contains(g)), "a held run deleted");
    // The text status says it too.
    let text = stdout(&d.cli(&["status", "shop"]));
    assert!(text.contains("held"), "{text}");

    // The flag needs --full, on the CLI and in the API.
    let out = d.cli(&["sync", "shop", "--allow-mass-delete"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let (code, body) = d.http(
        "POST",
        "/v1/shops/shop/sync",
        Some(r#"{"allow_mass_delete":true}"#),
    );
    assert_eq!(code, 400, "{body}");

    // Confirmed: that run deletes them.
    let out = cli_bounded(
        &d,
        &["sync", "shop", "--full", "--allow-mass-delete", "--wait"],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let r = last_run(&d, "shop");
    assert_eq!(
        (r["outcome"].as_str(), r["deleted"].as_u64()),
        (Some("ok"), Some(90)),
        "{r:#}"
    );
    assert_mirror(&d, &sim, "shop", P::M1, None);

    // One run only: the next large deletion is held again.
    sim.delete(60);
    let out = sync_wait_any(&d, "shop", true);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(last_run(&d, "shop")["outcome"], "held");
    assert_eq!(d.shop("shop")["sync"]["products"], 180);
}

fn full(d: &Daemon, name: &str) -> Value {
    let _ = sync_wait_any(d, name, true);
    let r = last_run(d, name);
    assert_eq!(r["kind"], "full_sync", "{r:#}");
    r
}

fn message(r: &Value) -> String {
    r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `catalog_product.info` faults on products the listing names: fault 1
/// (transient) for some, then 101 for all. Nothing is deleted, the run is
/// `partial` naming the problem, the checkpoint stays; a shop added while
/// every product faults 101 gets no checkpoint over its empty mirror.
#[test]
fn m1_info_faults_never_delete() {
    let sim = Sim::start(300);
    let d = daemon("m1_id_range = 100\nm1_batch_size = 20\n");
    add(&d, &sim, "shop", P::M1, &[]);
    let catalog = sim.m1_items("default");
    let checkpoint = d.shop("shop")["sync"]["stores"]["default"]["cursor_updated_at"].clone();
    assert!(checkpoint.is_string(), "{checkpoint}");

    sim.set_fault(Fault::M1InfoFault { code: 1, every: 7 });
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert_eq!(r["error"]["kind"], "server_error", "{r:#}");
    assert!(message(&r).contains("could not be read"), "{r:#}");
    assert!(message(&r).contains("fault 1"), "{r:#}");
    assert_eq!(r["deleted"], 0, "{r:#}");
    assert_same("after fault 1", &export(&d, "shop", None), &catalog);

    sim.set_fault(Fault::M1InfoFault {
        code: 101,
        every: 1,
    });
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    assert!(
        message(&r).contains("lists 300 product(s) that catalog_product.info says do not exist"),
        "{r:#}"
    );
    assert_eq!(r["deleted"], 0, "{r:#}");
    let s = d.shop("shop");
    assert_eq!(s["sync"]["products"], 300, "{s:#}");
    assert_eq!(
        s["sync"]["stores"]["default"]["cursor_updated_at"], checkpoint,
        "{s:#}"
    );
    assert_same("after fault 101", &export(&d, "shop", None), &catalog);

    // A new shop whose every product faults 101: nothing stored, and no
    // checkpoint claims an empty mirror is the catalog.
    let out = d.add_shop("fresh", "magento1", &sim.url(), &P::M1.creds(&sim), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = wait_idle_after(&d, "fresh", 0);
    assert_eq!(s["sync"]["last_run"]["outcome"], "partial", "{s:#}");
    assert_eq!(s["sync"]["products"], 0, "{s:#}");
    assert!(
        s["sync"]["stores"]["default"]["cursor_updated_at"].is_null(),
        "{s:#}"
    );

    // Once the shop answers again, a full sync is ok and changes nothing.
    sim.set_fault(Fault::None);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(
        (r["deleted"].as_u64(), r["created"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
    assert_mirror(&d, &sim, "shop", P::M1, None);
}

/// A listing that ignores the id range stops the walk at once as
/// `protocol`, naming what the shop does wrong, instead of re-reading the
/// same products for every range.
#[test]
fn m1_listing_that_ignores_the_range_stops() {
    let sim = Sim::start(300);
    let d = daemon("m1_id_range = 100\n");
    add(&d, &sim, "shop", P::M1, &[]);
    sim.set_fault(Fault::M1ListIgnoresRange);
    sim.reset_counters();
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "failed", "{r:#}");
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    assert!(
        message(&r).contains("outside that range: the shop ignores the product_id filter"),
        "{r:#}"
    );
    assert_eq!(r["deleted"], 0, "{r:#}");
    let c = sim.counters();
    assert_eq!(c.m1_multicalls, 0, "details were fetched: {c:?}");
    assert!(r["requests"].as_u64().unwrap_or(99) <= 3, "{r:#}");
    assert_eq!(d.shop("shop")["sync"]["products"], 300);
    sim.set_fault(Fault::None);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_mirror(&d, &sim, "shop", P::M1, None);
}

/// An info answer for another `product_id` than asked is refused, named;
/// the product keeps its mirrored copy.
#[test]
fn m1_info_for_another_product_is_refused() {
    let sim = Sim::start(200);
    let d = daemon("m1_id_range = 100\nm1_batch_size = 20\n");
    add(&d, &sim, "shop", P::M1, &[]);
    sim.touch(200);
    let before = export(&d, "shop", None);
    sim.set_fault(Fault::M1InfoWrongId { every: 5 });
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    let m = message(&r);
    assert!(
        m.contains("catalog_product.info for product ") && m.contains(" answered product "),
        "{m}"
    );
    assert_eq!(r["deleted"], 0, "{r:#}");
    // Exactly the products answered rightly were updated; the others are
    // as they were, none stored under another product's SKU.
    let got = export(&d, "shop", None);
    let now = sim.m1_items("default");
    assert_eq!(got.len(), 200);
    for g in &got {
        let id: u64 = g["product_id"].as_str().unwrap().parse().unwrap();
        let want = if id % 5 == 0 { &before } else { &now };
        assert_eq!(
            Some(g),
            want.iter().find(|w| w["sku"] == g["sku"]),
            "product {id}"
        );
    }
    sim.set_fault(Fault::None);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_mirror(&d, &sim, "shop", P::M1, None);
}

/// A 50 MB session id is refused at login with a clear error.
#[test]
fn m1_huge_session_id_is_refused() {
    let sim = Sim::start(20);
    let d = daemon("");
    add(&d, &sim, "shop", P::M1, &[]);
    sim.set_fault(Fault::M1HugeSession {
        bytes: 50 * 1024 * 1024,
    });
    let out = d.cli(&["shop", "test", "shop"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("login answered a session id of 52428800 bytes"),
        "{text}"
    );
    sim.set_fault(Fault::None);
    let out = d.cli(&["shop", "test", "shop"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

/// Counters add up: a full sync fetches exactly the catalog, and while it
/// fetches its progress total is the catalog.
#[test]
fn m1_full_sync_counts_the_catalog() {
    const N: u64 = 2_000;
    let sim = Sim::start(N as usize);
    let d = daemon("m1_id_range = 300\nm1_batch_size = 20\nshop_concurrency = 1\n");
    let s = add(&d, &sim, "shop", P::M1, &[]);
    assert_eq!(s["sync"]["last_run"]["fetched"], N, "{s:#}");
    sim.set_fault(Fault::Slow(std::time::Duration::from_millis(20)));
    let before = run_id(&d.shop("shop"));
    start_sync(&d, "shop", true);
    let s = d.wait_shop("shop", "the fetch phase", |s| {
        s["sync"]["progress"]["phase"] == "fetch" || run_id(s) > before
    });
    assert_eq!(s["sync"]["progress"]["total"], N, "{s:#}");
    sim.set_fault(Fault::None);
    let s = wait_idle_after(&d, "shop", before);
    let r = &s["sync"]["last_run"];
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(r["fetched"], N, "{r:#}");
    assert_eq!(r["unchanged"], N, "{r:#}");
}

/// A byte that is not UTF-8 (a Latin-1 `é`) in some product names no
/// longer fails every sync: each such product is stored with U+FFFD in its
/// place and named (SKU and id) in a warning; every other product lands as
/// the shop has it.
#[test]
fn m1_latin1_byte_is_kept_and_named() {
    let sim = Sim::start(100);
    let d = daemon("m1_id_range = 100\nm1_batch_size = 20\n");
    add(&d, &sim, "shop", P::M1, &[]);
    sim.touch(100);
    let catalog = sim.m1_items("default");
    sim.set_fault(Fault::Latin1);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(r["deleted"], 0, "{r:#}");
    assert_eq!(d.shop("shop")["sync"]["products"], 100);
    let got = export(&d, "shop", None);
    assert_eq!(got.len(), 100);
    let log = d.log();
    let mut repaired = 0;
    for g in &got {
        let want = catalog
            .iter()
            .find(|w| w["sku"] == g["sku"])
            .unwrap_or_else(|| panic!("not in the catalog: {g}"));
        let name = g["name"].as_str().unwrap_or_default();
        match name.strip_prefix('\u{FFFD}') {
            None => assert_eq!(g, want, "an untouched product differs"),
            Some(rest) => {
                repaired += 1;
                assert_eq!(Some(rest), want["name"].as_str(), "{g}");
                let sku = sku(g);
                assert!(
                    log.lines().any(|l| l.contains("that are not UTF-8")
                        && l.contains("multiCall")
                        && l.split_whitespace().any(|w| w == format!("sku={sku}"))),
                    "no warning names {sku}:\n{}",
                    tail(&d, 20)
                );
            }
        }
    }
    // The simulator spoils the first name of each answer: one product of
    // each multiCall batch.
    assert!(repaired >= 1, "no product was repaired");
    assert!(repaired < 100, "every product was repaired");
    sim.set_fault(Fault::None);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_mirror(&d, &sim, "shop", P::M1, None);
}

/// The same SKU answered on several product ids: the run is `partial`,
/// naming the SKU and its ids; the mirror holds that SKU once and deletes
/// nothing because of it (the SKUs the other ids had before stay), also
/// for a first sync; once the shop's SKUs are right again, all is ok.
#[test]
fn m1_one_sku_on_many_ids_is_reported_and_deletes_nothing() {
    let sim = Sim::start(100);
    let d = daemon("m1_id_range = 100\nm1_batch_size = 20\n");
    add(&d, &sim, "shop", P::M1, &[]);
    let before = unique_skus(&export(&d, "shop", None));
    let shared = sim.duplicate_sku(4);
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert_eq!(r["error"]["kind"], "protocol", "{r:#}");
    let m = message(&r);
    assert!(
        m.contains(&shared) && m.contains("more than one product id") && m.contains("(ids "),
        "{m}"
    );
    assert_eq!(r["deleted"], 0, "{r:#}");
    let got = export(&d, "shop", None);
    assert_eq!(got.len(), 100);
    assert_eq!(unique_skus(&got), before, "one row per SKU, none lost");

    // A first sync of the same shop: one row for the SKU, reported.
    let out = d.add_shop("fresh", "magento1", &sim.url(), &P::M1.creds(&sim), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = wait_idle_after(&d, "fresh", 0);
    let r = &s["sync"]["last_run"];
    assert_eq!(r["outcome"], "partial", "{r:#}");
    assert!(message(r).contains(&shared), "{r:#}");
    let got = export(&d, "fresh", None);
    assert_eq!(got.len(), 96);
    assert_eq!(unique_skus(&got).len(), 96, "two rows for one SKU");

    sim.clear_quirks();
    let r = full(&d, "shop");
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_mirror(&d, &sim, "shop", P::M1, None);
}
