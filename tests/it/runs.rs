//! Sync requests and the runs that answer them, the first sync of a shop,
//! `sync --wait`, and the per-shop request limiter.

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::{Fault, SimConfig};
use std::time::{Duration, Instant};

/// The value of one series in `/metrics` (`None`: absent).
fn metric(d: &Daemon, series: &str) -> Option<f64> {
    let (code, text) = d.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A shop that answers 429 with `Retry-After` halves its request limit
/// (once per episode), which status and the metrics show, and the run
/// still ends `ok` once the shop accepts requests again.
#[test]
fn backpressure_halves_the_shops_request_limit() {
    let sim = Sim::start_with(SimConfig {
        products: 300,
        ..Default::default()
    });
    let d = daemon("shop_concurrency = 4\nm1_batch_size = 10\n");
    let first = add(&d, &sim, "acme", P::M1, &[]);
    assert_eq!(
        first["sync"]["concurrency"]["max"], 4,
        "{:#}",
        first["sync"]
    );
    assert_eq!(first["sync"]["concurrency"]["decreases_total"], 0);
    sim.set_fault(Fault::RateLimited { retry_after_s: 1 });
    let before = start_sync(&d, "acme", true);
    let t = Instant::now();
    while sim.counters().faults_injected == 0 {
        assert!(t.elapsed() < WAIT, "the sync never met the 429");
        std::thread::sleep(Duration::from_millis(10));
    }
    sim.set_fault(Fault::None);
    let s = wait_idle_after(&d, "acme", before);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{:#}", s["sync"]);
    let c = &s["sync"]["concurrency"];
    assert!(
        c["decreases_total"].as_u64().unwrap_or(0) >= 1
            && c["backpressure_total"].as_u64().unwrap_or(0) >= 1,
        "{c:#}"
    );
    assert!(c["limit"].as_u64().unwrap_or(0) >= 1);
    assert!(
        metric(&d, "cobbyd_shop_backpressure_total{shop=\"acme\"}").unwrap_or(0.0) >= 1.0,
        "no backpressure in the metrics"
    );
    let limit = metric(&d, "cobbyd_shop_concurrency_limit{shop=\"acme\"}");
    assert!(limit.is_some_and(|l| (1.0..=4.0).contains(&l)), "{limit:?}");
}
