//! Prometheus metrics in the text exposition format, served at `/metrics`
//! on the control socket (and on `metrics.listen` when set). Every per-shop
//! series carries `shop="NAME"`; series of removed shops disappear.
//!
//! [`Metrics`] holds the counters and histograms the daemon adds to;
//! [`Metrics::render`] writes them with a [`Snapshot`] of the rest (shops,
//! health, mirrors, queue), which the caller gathers: this module reads no
//! other part of the daemon.

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

/// What the exposition shows besides the counters, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub uptime: Duration,
    pub queue_depth: usize,
    /// Registered shops, by name.
    pub shops: Vec<ShopSnapshot>,
}

/// One registered shop, as the metrics show it.
#[derive(Debug, Clone, Default)]
pub struct ShopSnapshot {
    pub name: String,
    pub state: ShopState,
    pub consecutive_failures: u32,
    /// As `cobbyd status` judges it (`sync::shop_healthy`).
    pub healthy: bool,
    pub last_sync_failed: bool,
    /// (store code, products in its mirror).
    pub mirrors: Vec<(String, u64)>,
    /// Requests a sync may have in flight now.
    pub concurrency_limit: usize,
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `# HELP` and `# TYPE` of a metric.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A metric with one sample per shop.
fn per_shop<T: std::fmt::Display>(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    shops: &[ShopSnapshot],
    value: impl Fn(&ShopSnapshot) -> T,
) {
    header(out, name, kind, help);
    for s in shops {
        let _ = writeln!(out, "{name}{{shop=\"{}\"}} {}", label(&s.name), value(s));
    }
}

const HEALTH_STATES: [ShopState; 6] = [
    ShopState::Unknown,
    ShopState::Healthy,
    ShopState::Degraded,
    ShopState::Down,
    ShopState::AuthFailed,
    ShopState::Misconfigured,
];

impl Metrics {
    /// The whole exposition.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        render_daemon(&mut out, snap);
        render_shops(&mut out, &snap.shops);
        let i = self.inner();
        i.render_histograms(&mut out, &snap.shops);
        i.render_counters(&mut out, &snap.shops);
        drop(i);
        per_shop(
            &mut out,
            (
                "cobbyd_shop_concurrency_limit",
                "gauge",
                "Requests a sync may have in flight against the shop now (halved on backpressure, grows back by one).",
            ),
            &snap.shops,
            |s| s.concurrency_limit,
        );
        header(
            &mut out,
            "cobbyd_queue_depth",
            "gauge",
            "Jobs in the durable queue.",
        );
        let _ = writeln!(out, "cobbyd_queue_depth {}", snap.queue_depth);
        out
    }
}

/// Build, uptime, shop count.
fn render_daemon(out: &mut String, snap: &Snapshot) {
    header(out, "cobbyd_build_info", "gauge", "Build information.");
    let _ = writeln!(
        out,
        "cobbyd_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    header(
        out,
        "cobbyd_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(out, "cobbyd_uptime_seconds {}", snap.uptime.as_secs());
    header(out, "cobbyd_shops", "gauge", "Registered shops.");
    let _ = writeln!(out, "cobbyd_shops {}", snap.shops.len());
}

/// Health, failures, the shared health rule, mirrors.
fn render_shops(out: &mut String, shops: &[ShopSnapshot]) {
    header(
        out,
        "cobbyd_shop_health_state",
        "gauge",
        "1 for the shop's current health state, 0 for the others.",
    );
    for s in shops {
        for st in HEALTH_STATES {
            let _ = writeln!(
                out,
                "cobbyd_shop_health_state{{shop=\"{}\",state=\"{}\"}} {}",
                label(&s.name),
                st.as_str(),
                u8::from(s.state == st)
            );
        }
    }
    per_shop(
        out,
        (
            "cobbyd_shop_consecutive_failures",
            "gauge",
            "Failed probes in a row.",
        ),
        shops,
        |s| s.consecutive_failures,
    );
    per_shop(
        out,
        (
            "cobbyd_shop_healthy",
            "gauge",
            "1 when the shop's last probe passed and its last sync did not fail (as `cobbyd status` judges it).",
        ),
        shops,
        |s| u8::from(s.healthy),
    );
    per_shop(
        out,
        (
            "cobbyd_shop_last_sync_failed",
            "gauge",
            "1 when the shop's last sync run failed.",
        ),
        shops,
        |s| u8::from(s.last_sync_failed),
    );
    header(
        out,
        "cobbyd_products_in_mirror",
        "gauge",
        "Products in the local mirror.",
    );
    for s in shops {
        for (code, n) in &s.mirrors {
            let _ = writeln!(
                out,
                "cobbyd_products_in_mirror{{shop=\"{}\",store=\"{}\"}} {n}",
                label(&s.name),
                label(code)
            );
        }
    }
}

impl Inner {
    /// Probe latency and sync duration, for registered shops only.
    fn render_histograms(&self, out: &mut String, shops: &[ShopSnapshot]) {
        let known = |shop: &str| shops.iter().any(|s| s.name == shop);
        header(
            out,
            "cobbyd_probe_duration_seconds",
            "histogram",
            "Probe latency.",
        );
        for (shop, h) in self.probe_latency.iter().filter(|(s, _)| known(s)) {
            let labels = format!("shop=\"{}\"", label(shop));
            h.render(
                out,
                "cobbyd_probe_duration_seconds",
                &labels,
                &PROBE_BUCKETS,
            );
        }
        header(
            out,
            "cobbyd_sync_duration_seconds",
            "histogram",
            "Duration of finished sync runs.",
        );
        for ((shop, kind), h) in self.sync_duration.iter().filter(|((s, _), _)| known(s)) {
            let labels = format!("shop=\"{}\",kind=\"{kind}\"", label(shop));
            h.render(out, "cobbyd_sync_duration_seconds", &labels, &SYNC_BUCKETS);
        }
    }

    /// Product, request and backpressure counters, the last success.
    fn render_counters(&self, out: &mut String, shops: &[ShopSnapshot]) {
        let known = |shop: &str| shops.iter().any(|s| s.name == shop);
        let counts = |s: &ShopSnapshot| self.sync_counts.get(&s.name).copied().unwrap_or_default();
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
            per_shop(out, (metric, "counter", help), shops, |s| {
                let c = counts(s);
                [c.fetched, c.created, c.updated, c.deleted][pick]
            });
        }
        header(
            out,
            "cobbyd_last_successful_sync_timestamp_seconds",
            "gauge",
            "End of the last successful sync (Unix time).",
        );
        for (shop, t) in self.last_success.iter().filter(|(s, _)| known(s)) {
            let _ = writeln!(
                out,
                "cobbyd_last_successful_sync_timestamp_seconds{{shop=\"{}\"}} {t}",
                label(shop)
            );
        }
        header(
            out,
            "cobbyd_shop_requests_total",
            "counter",
            "Requests to shops by outcome.",
        );
        for ((shop, outcome), n) in self.requests.iter().filter(|((s, _), _)| known(s)) {
            let _ = writeln!(
                out,
                "cobbyd_shop_requests_total{{shop=\"{}\",outcome=\"{}\"}} {n}",
                label(shop),
                label(outcome)
            );
        }
        per_shop(
            out,
            (
                "cobbyd_shop_backpressure_total",
                "counter",
                "Shop answers that asked to slow down (429, 503, Retry-After).",
            ),
            shops,
            |s| self.backpressure.get(&s.name).copied().unwrap_or(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_of_registered_shops_only() {
        let m = Metrics::default();
        m.observe_probe("a", Duration::from_millis(20), true);
        m.observe_probe("gone", Duration::from_millis(20), true);
        m.count_backpressure("a");
        m.add_sync_counts(
            "a",
            SyncCounts {
                fetched: 5,
                created: 4,
                updated: 1,
                deleted: 0,
            },
        );
        let snap = Snapshot {
            uptime: Duration::from_secs(7),
            queue_depth: 3,
            shops: vec![ShopSnapshot {
                name: "a".into(),
                state: ShopState::Healthy,
                consecutive_failures: 0,
                healthy: true,
                last_sync_failed: false,
                mirrors: vec![("default".into(), 4)],
                concurrency_limit: 2,
            }],
        };
        let text = m.render(&snap);
        for line in [
            "cobbyd_uptime_seconds 7",
            "cobbyd_shops 1",
            "cobbyd_shop_health_state{shop=\"a\",state=\"healthy\"} 1",
            "cobbyd_shop_health_state{shop=\"a\",state=\"down\"} 0",
            "cobbyd_shop_healthy{shop=\"a\"} 1",
            "cobbyd_products_in_mirror{shop=\"a\",store=\"default\"} 4",
            "cobbyd_products_created_total{shop=\"a\"} 4",
            "cobbyd_shop_requests_total{shop=\"a\",outcome=\"ok\"} 1",
            "cobbyd_shop_backpressure_total{shop=\"a\"} 1",
            "cobbyd_probe_duration_seconds_count{shop=\"a\"} 1",
            "cobbyd_shop_concurrency_limit{shop=\"a\"} 2",
            "cobbyd_queue_depth 3",
            "# TYPE cobbyd_products_fetched_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        assert!(
            !text.contains("gone"),
            "a removed shop's series stay:\n{text}"
        );
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
