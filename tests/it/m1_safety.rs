//! The deletion rule and the Magento 1 answers that must not corrupt the
//! mirror: a product leaves the mirror only when a complete, consistent
//! listing says it is gone; a run that would delete more than
//! `sync.max_delete_share` deletes nothing until confirmed; per-item faults,
//! listings that ignore the id range and answers for the wrong product are
//! met with a named problem, never with deletions or an `ok`.

use crate::harness::*;
use crate::sync_util::*;
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
