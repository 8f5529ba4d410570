//! Prometheus metrics in the text exposition format, served at `/metrics`
//! on the control socket (and on `metrics.listen` when set). Every per-shop
//! series carries `shop="NAME"`; series of removed shops disappear.

use crate::daemon::Daemon;
use crate::health::ShopState;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const PROBE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const SYNC_BUCKETS: [f64; 10] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        for (i, b) in bounds.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Counters a sync run adds to.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCounts {
    pub fetched: u64,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
}

#[derive(Default)]
struct Inner {
    probe_latency: BTreeMap<String, Histogram>,
    sync_duration: BTreeMap<(String, &'static str), Histogram>,
    sync_counts: BTreeMap<String, SyncCounts>,
    last_success: BTreeMap<String, f64>,
    /// (shop, outcome) → requests; outcome is `ok` or a failure kind.
    requests: BTreeMap<(String, String), u64>,
    /// shop → answers that asked to slow down (429, 503, `Retry-After`).
    backpressure: BTreeMap<String, u64>,
}

/// The daemon's metric registry.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn observe_probe(&self, shop: &str, latency: Duration, ok: bool) {
        let mut i = self.inner();
        i.probe_latency
            .entry(shop.to_string())
            .or_default()
            .observe(&PROBE_BUCKETS, latency.as_secs_f64());
        *i.requests
            .entry((
                shop.to_string(),
                if ok { "ok" } else { "error" }.to_string(),
            ))
            .or_default() += 1;
    }

    /// Counts one shop request by outcome (`ok` or a failure kind).
    pub fn count_request(&self, shop: &str, outcome: &str) {
        *self
            .inner()
            .requests
            .entry((shop.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    /// Counts a shop answer that asked to slow down.
    pub fn count_backpressure(&self, shop: &str) {
        *self
            .inner()
            .backpressure
            .entry(shop.to_string())
            .or_default() += 1;
    }

    pub fn add_sync_counts(&self, shop: &str, c: SyncCounts) {
        let mut i = self.inner();
        let e = i.sync_counts.entry(shop.to_string()).or_default();
        e.fetched += c.fetched;
        e.created += c.created;
        e.updated += c.updated;
        e.deleted += c.deleted;
    }

    pub fn observe_sync(&self, shop: &str, kind: &'static str, took: Duration, ok: bool) {
        let mut i = self.inner();
        i.sync_duration
            .entry((shop.to_string(), kind))
            .or_default()
            .observe(&SYNC_BUCKETS, took.as_secs_f64());
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            i.last_success.insert(shop.to_string(), now);
        }
    }
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(d: &Daemon) -> String {
    let mut out = String::with_capacity(4096);
    let shops = d.registry.list();
    let _ = writeln!(
        out,
        "# HELP cobbyd_build_info Build information.\n# TYPE cobbyd_build_info gauge"
    );
    let _ = writeln!(
        out,
        "cobbyd_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP cobbyd_uptime_seconds Seconds since the daemon started.\n# TYPE cobbyd_uptime_seconds gauge"
    );
    let _ = writeln!(
        out,
        "cobbyd_uptime_seconds {}",
        d.started.elapsed().as_secs()
    );
    let _ = writeln!(
        out,
        "# HELP cobbyd_shops Registered shops.\n# TYPE cobbyd_shops gauge\ncobbyd_shops {}",
        shops.len()
    );

    let states = [
        ShopState::Unknown,
        ShopState::Healthy,
        ShopState::Degraded,
        ShopState::Down,
        ShopState::AuthFailed,
        ShopState::Misconfigured,
    ];
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_health_state 1 for the shop's current health state, 0 for the others.\n# TYPE cobbyd_shop_health_state gauge"
    );
    let mut failures = String::new();
    let mut healthy = String::new();
    let mut sync_failed = String::new();
    for s in &shops {
        let h = d.health.get(&s.name);
        let name = label(&s.name);
        let _ = writeln!(
            healthy,
            "cobbyd_shop_healthy{{shop=\"{name}\"}} {}",
            u8::from(crate::sync::shop_healthy(d, &s.name))
        );
        let _ = writeln!(
            sync_failed,
            "cobbyd_shop_last_sync_failed{{shop=\"{name}\"}} {}",
            u8::from(d.syncs.problem(&d.store, &s.name).is_some())
        );
        for st in states {
            let _ = writeln!(
                out,
                "cobbyd_shop_health_state{{shop=\"{name}\",state=\"{}\"}} {}",
                st.as_str(),
                u8::from(h.state == st)
            );
        }
        let _ = writeln!(
            failures,
            "cobbyd_shop_consecutive_failures{{shop=\"{name}\"}} {}",
            h.consecutive_failures
        );
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_consecutive_failures Failed probes in a row.\n# TYPE cobbyd_shop_consecutive_failures gauge"
    );
    out.push_str(&failures);
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_healthy 1 when the shop's last probe passed and its last sync did not fail (as `cobbyd status` judges it).\n# TYPE cobbyd_shop_healthy gauge"
    );
    out.push_str(&healthy);
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_last_sync_failed 1 when the shop's last sync run failed.\n# TYPE cobbyd_shop_last_sync_failed gauge"
    );
    out.push_str(&sync_failed);

    let _ = writeln!(
        out,
        "# HELP cobbyd_products_in_mirror Products in the local mirror.\n# TYPE cobbyd_products_in_mirror gauge"
    );
    for s in &shops {
        for code in &s.store_codes {
            let n = crate::mirror::Mirror::open(&d.store, &s.name, code)
                .and_then(|m| m.cursor())
                .map(|c| c.products)
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "cobbyd_products_in_mirror{{shop=\"{}\",store=\"{}\"}} {n}",
                label(&s.name),
                label(code)
            );
        }
    }

    let i = d.metrics.inner();
    let known = |shop: &str| shops.iter().any(|s| s.name == shop);
    let _ = writeln!(
        out,
        "# HELP cobbyd_probe_duration_seconds Probe latency.\n# TYPE cobbyd_probe_duration_seconds histogram"
    );
    for (shop, h) in i.probe_latency.iter().filter(|(s, _)| known(s)) {
        h.render(
            &mut out,
            "cobbyd_probe_duration_seconds",
            &format!("shop=\"{}\"", label(shop)),
            &PROBE_BUCKETS,
        );
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_sync_duration_seconds Duration of finished sync runs.\n# TYPE cobbyd_sync_duration_seconds histogram"
    );
    for ((shop, kind), h) in i.sync_duration.iter().filter(|((s, _), _)| known(s)) {
        h.render(
            &mut out,
            "cobbyd_sync_duration_seconds",
            &format!("shop=\"{}\",kind=\"{kind}\"", label(shop)),
            &SYNC_BUCKETS,
        );
    }
    for (metric, help, pick) in [
        (
            "cobbyd_products_fetched_total",
            "Products fetched from the shop.",
            0,
        ),
        (
            "cobbyd_products_created_total",
            "Products new to the mirror.",
            1,
        ),
        (
            "cobbyd_products_updated_total",
            "Products changed in the mirror.",
            2,
        ),
        (
            "cobbyd_products_deleted_total",
            "Products removed from the mirror.",
            3,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for s in &shops {
            let c = i.sync_counts.get(&s.name).copied().unwrap_or_default();
            let v = [c.fetched, c.created, c.updated, c.deleted][pick];
            let _ = writeln!(out, "{metric}{{shop=\"{}\"}} {v}", label(&s.name));
        }
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_last_successful_sync_timestamp_seconds End of the last successful sync (Unix time).\n# TYPE cobbyd_last_successful_sync_timestamp_seconds gauge"
    );
    for (shop, t) in i.last_success.iter().filter(|(s, _)| known(s)) {
        let _ = writeln!(
            out,
            "cobbyd_last_successful_sync_timestamp_seconds{{shop=\"{}\"}} {t}",
            label(shop)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_requests_total Requests to shops by outcome.\n# TYPE cobbyd_shop_requests_total counter"
    );
    for ((shop, outcome), n) in i.requests.iter().filter(|((s, _), _)| known(s)) {
        let _ = writeln!(
            out,
            "cobbyd_shop_requests_total{{shop=\"{}\",outcome=\"{}\"}} {n}",
            label(shop),
            label(outcome)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_backpressure_total Shop answers that asked to slow down (429, 503, Retry-After).\n# TYPE cobbyd_shop_backpressure_total counter"
    );
    for s in &shops {
        let n = i.backpressure.get(&s.name).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "cobbyd_shop_backpressure_total{{shop=\"{}\"}} {n}",
            label(&s.name)
        );
    }
    drop(i);
    let _ = writeln!(
        out,
        "# HELP cobbyd_shop_concurrency_limit Requests a sync may have in flight against the shop now (halved on backpressure, grows back by one).\n# TYPE cobbyd_shop_concurrency_limit gauge"
    );
    for s in &shops {
        let _ = writeln!(
            out,
            "cobbyd_shop_concurrency_limit{{shop=\"{}\"}} {}",
            label(&s.name),
            d.syncs.limiter_status(&s.name).limit
        );
    }
    let _ = writeln!(
        out,
        "# HELP cobbyd_queue_depth Jobs in the durable queue.\n# TYPE cobbyd_queue_depth gauge"
    );
    let _ = writeln!(out, "cobbyd_queue_depth {}", d.queue.depth());
    out
}
