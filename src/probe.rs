//! Liveness: probes a shop, turns the outcome into its health record
//! (state, problem, hint, backoff), persists it in the `health` tree and logs
//! state changes once, not once per retry.

use crate::config::ProbeConfig;
use crate::health::{self, HealthRecord, Problem, ShopState};
use crate::magento::{ProbeInfo, ShopError};
use crate::shop::ShopRecord;
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Keeps retry-delay history short: enough to see the backoff grow.
const DELAY_HISTORY: usize = 16;

/// RFC 3339 with seconds, UTC.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The `health` tree with an in-memory copy for status.
pub struct HealthBook {
    store: Store,
    cache: Mutex<HashMap<String, HealthRecord>>,
}

impl HealthBook {
    pub fn open(store: Store) -> Result<HealthBook, StoreError> {
        let mut cache = HashMap::new();
        for item in store.health().iter() {
            let (k, v) = item?;
            // A record from an older build that no longer parses is
            // replaced by the next probe, not fatal.
            if let Ok(rec) = serde_json::from_slice::<HealthRecord>(&v) {
                cache.insert(String::from_utf8_lossy(&k).into_owned(), rec);
            }
        }
        Ok(HealthBook {
            store,
            cache: Mutex::new(cache),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, HealthRecord>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of a shop (`unknown` when never probed).
    pub fn get(&self, shop: &str) -> HealthRecord {
        self.cache().get(shop).cloned().unwrap_or_default()
    }

    /// Stores a record, if the shop is registered: a probe that ends after
    /// its shop was removed leaves no health record behind (the check and
    /// the write are one transaction with the record's removal).
    /// Flushing is the caller's (batched) business.
    pub fn put(&self, shop: &str, rec: &HealthRecord) -> Result<(), StoreError> {
        use sled::transaction::{TransactionError, Transactional};
        let v = serde_json::to_vec(rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let r: Result<bool, TransactionError<()>> = (self.store.shops(), self.store.health())
            .transaction(|(s, h)| {
                if s.get(shop.as_bytes())?.is_none() {
                    return Ok(false);
                }
                h.insert(shop.as_bytes(), v.as_slice())?;
                Ok(true)
            });
        match r {
            Ok(true) => {
                self.cache().insert(shop.to_string(), rec.clone());
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => {
                Err(StoreError::Corrupt("health write aborted".into()))
            }
        }
    }

    /// Forgets a shop's record in memory (its stored record went with the
    /// shop's: [`crate::queue::Queue::unregister`]).
    pub fn forget(&self, shop: &str) {
        self.cache().remove(shop);
    }

    /// Counts of shops per state, for the systemd status line and metrics.
    pub fn count_states(&self, shops: &[String]) -> Vec<(ShopState, usize)> {
        let cache = self.cache();
        let mut counts: Vec<(ShopState, usize)> = Vec::new();
        for s in shops {
            let st = cache.get(s).map(|r| r.state).unwrap_or_default();
            match counts.iter_mut().find(|(k, _)| *k == st) {
                Some((_, n)) => *n += 1,
                None => counts.push((st, 1)),
            }
        }
        counts
    }
}

/// The outcome of one probe.
pub type Outcome = Result<(ProbeInfo, Duration), ShopError>;

/// Computes the next health record and the delay to the next probe. Pure:
/// the caller supplies `now`. A healthy shop's next probe falls on its own
/// phase of the interval (`spread`); a failing one backs off.
pub fn next_record(
    prev: &HealthRecord,
    shop: &ShopRecord,
    outcome: &Outcome,
    cfg: &ProbeConfig,
    now: DateTime<Utc>,
) -> (HealthRecord, Duration) {
    let now_s = rfc3339(now);
    let mut rec = prev.clone();
    rec.last_probe = Some(now_s.clone());
    let delay = match outcome {
        Ok((info, latency)) => {
            rec.last_ok = Some(now_s.clone());
            rec.last_latency_ms = Some(latency.as_millis() as u64);
            rec.consecutive_failures = 0;
            rec.problem = None;
            rec.retry_delays_ms.clear();
            if info.version.is_some() {
                rec.version.clone_from(&info.version);
            }
            if info.product_count.is_some() {
                rec.product_count = info.product_count;
            }
            if rec.state != ShopState::Healthy {
                rec.state = ShopState::Healthy;
                rec.state_since = Some(now_s.clone());
            }
            let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
            let due = crate::spread::next_due_ms(
                &shop.name,
                crate::spread::Recurring::Probe,
                now_ms,
                cfg.interval,
            );
            Duration::from_millis(due.saturating_sub(now_ms))
        }
        Err(err) => {
            rec.consecutive_failures = rec.consecutive_failures.saturating_add(1);
            let since = rec
                .problem
                .as_ref()
                .map(|p| p.since.clone())
                .unwrap_or_else(|| now_s.clone());
            let failing_for = DateTime::parse_from_rfc3339(&since)
                .map(|t| (now - t.with_timezone(&Utc)).to_std().unwrap_or_default())
                .unwrap_or_default();
            let state = health::state_for(err, failing_for, cfg.down_after);
            let delay = health::retry_delay(
                err,
                rec.consecutive_failures,
                cfg.backoff_initial,
                cfg.backoff_max,
            );
            rec.problem = Some(Problem {
                kind: err.kind,
                message: err.message.clone(),
                hint: health::hint_for(err.kind, shop),
                since,
                attempts: rec.consecutive_failures,
                next_try: Some(rfc3339(
                    now + chrono::Duration::from_std(delay).unwrap_or_default(),
                )),
                http_status: err.status,
            });
            if rec.state != state {
                rec.state = state;
                rec.state_since = Some(now_s.clone());
            }
            rec.retry_delays_ms.push_back(delay.as_millis() as u64);
            while rec.retry_delays_ms.len() > DELAY_HISTORY {
                rec.retry_delays_ms.pop_front();
            }
            delay
        }
    };
    rec.next_probe = Some(rfc3339(
        now + chrono::Duration::from_std(delay).unwrap_or_default(),
    ));
    (rec, delay)
}

/// Logs a transition once; repeated failures of the same kind stay quiet.
pub fn log_transition(shop: &str, prev: &HealthRecord, next: &HealthRecord) {
    let prev_kind = prev.problem.as_ref().map(|p| p.kind);
    let next_kind = next.problem.as_ref().map(|p| p.kind);
    if prev.state == next.state && prev_kind == next_kind {
        return;
    }
    match &next.problem {
        None => tracing::info!(
            shop,
            state = next.state.as_str(),
            previous = prev.state.as_str(),
            "shop is healthy"
        ),
        Some(p) => tracing::warn!(
            shop,
            state = next.state.as_str(),
            previous = prev.state.as_str(),
            kind = p.kind.as_str(),
            hint = %p.hint,
            next_try = p.next_try.as_deref().unwrap_or(""),
            "shop is {}: {}",
            next.state.as_str(),
            crate::logging::escape(&p.message)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::magento::FailureKind;
    use crate::shop::{AuthMode, Credentials, Platform};

    fn shop() -> ShopRecord {
        ShopRecord {
            name: "acme".into(),
            platform: Platform::Magento2,
            url: "http://x".into(),
            store_codes: vec!["default".into()],
            auth: AuthMode::Bearer,
            credentials: Credentials::M2Bearer {
                access_token: crate::secret::Secret::new("t"),
            },
            allow_insecure_http: true,
            tls_ca_file: None,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn degraded_then_down_then_healthy() {
        let cfg = ProbeConfig {
            down_after: Duration::from_secs(30),
            ..ProbeConfig::default()
        };
        let t0 = Utc::now();
        let err: Outcome = Err(ShopError::new(FailureKind::Connect, "refused"));
        let (r1, d1) = next_record(&HealthRecord::default(), &shop(), &err, &cfg, t0);
        assert_eq!(r1.state, ShopState::Degraded);
        assert_eq!(r1.problem.as_ref().unwrap().attempts, 1);
        let (r2, d2) = next_record(&r1, &shop(), &err, &cfg, t0 + chrono::Duration::seconds(40));
        assert_eq!(r2.state, ShopState::Down);
        assert_eq!(
            r2.problem.as_ref().unwrap().since,
            r1.problem.as_ref().unwrap().since
        );
        assert!(d2 > d1);
        let ok: Outcome = Ok((ProbeInfo::default(), Duration::from_millis(5)));
        let (r3, d3) = next_record(&r2, &shop(), &ok, &cfg, t0 + chrono::Duration::seconds(50));
        assert_eq!(r3.state, ShopState::Healthy);
        assert!(r3.problem.is_none());
        assert!(
            d3 >= cfg.interval / 2 && d3 < cfg.interval * 3 / 2,
            "{d3:?}"
        );
    }
}
