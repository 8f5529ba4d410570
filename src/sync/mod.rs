//! Product synchronisation: runs sync jobs from the queue, one at a time
//! per shop and at most `sync.max_concurrent_syncs` in all; keeps progress
//! visible; records each run in the `runs` tree.
//!
//! The platform walks live in [`m2`] (an `entity_id` range walk, then keyset paging by `updated_at`,
//! `entity_id`) and [`m1`] (id ranges, `multiCall` details). Both write
//! through [`crate::mirror::Mirror::apply`] and flush a page with its
//! checkpoint before the next page is stored (the M2 catch-up fetches the
//! next page while the previous one is written), so a crash loses nothing
//! and a restart resumes from the checkpoint.

pub mod limiter;
pub mod m1;
pub mod m2;

use crate::config::Config;
use crate::magento::{FailureKind, ShopError};
use crate::mirror::{Applied, Mirror};
use crate::probe::rfc3339;
use crate::queue::{Job, JobKind, now_ms};
use crate::registry::{ShopClient, client_options};
use crate::shop::ShopRecord;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the sync engine uses of the daemon: a narrow handle (the store,
/// the queue, the registry, the health book, the sync manager, the
/// metrics, the configuration in force), so the engine does not depend on
/// the daemon and can be built from its parts.
#[derive(Clone)]
pub struct Env<'a> {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub queue: &'a crate::queue::Queue,
    pub registry: &'a crate::registry::Registry,
    pub health: &'a crate::probe::HealthBook,
    pub syncs: &'a SyncManager,
    pub metrics: &'a crate::metrics::Metrics,
    /// Poked when something status shows changed.
    pub changed: &'a tokio::sync::Notify,
}

impl Env<'_> {
    /// The configuration in force when the handle was taken.
    pub fn config(&self) -> Arc<Config> {
        self.cfg.clone()
    }
}

/// Attempts per request before a run fails.
const REQUEST_ATTEMPTS: u32 = 5;

/// The longest a run waits between attempts of a request. A shop that
/// asks (`Retry-After`) for longer ends the run instead: waiting would keep
/// the run (and its shop's lock) for nothing.
pub const MAX_WAIT_IN_RUN: Duration = Duration::from_secs(30);

/// The longest `Retry-After` honoured between runs: a shop that asks for
/// more (a broken proxy sending `999999999`) gets its next sync after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Shop(#[from] ShopError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("interrupted by shutdown; resumes at the next start")]
    Interrupted,
    #[error("cancelled: the shop was removed")]
    Cancelled,
    /// The deletion guard held the run: see [`delete_unseen`].
    #[error(
        "store view {store_code}: the shop's listing leaves out {gone} of the {products} mirrored products, more than sync.max_delete_share ({}%) allows; nothing was deleted",
        share_percent(*share)
    )]
    MassDelete {
        store_code: String,
        gone: u64,
        products: u64,
        share: f64,
    },
}

fn share_percent(share: f64) -> String {
    let p = (share * 1000.0).round() / 10.0;
    format!("{p}")
}

/// A run's visible progress (`sync.progress` in status).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub run_id: u64,
    pub kind: &'static str,
    pub store_code: String,
    pub phase: String,
    pub started_at: String,
    pub resumed: bool,
    /// Products processed in this run.
    pub done: u64,
    /// Products this run expects to process, when the shop says.
    pub total: Option<u64>,
    pub pages: u64,
    pub requests: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub item_errors: u64,
    pub rate_per_s: f64,
    pub eta_s: Option<u64>,
    pub percent: Option<f64>,
    /// Set while the run waits before retrying a request (its sync slot is
    /// released meanwhile): what it waits for and how long.
    pub waiting: Option<String>,
    /// The sync requests this run answers.
    pub sync_requests: Vec<u64>,
    #[serde(skip)]
    started: Option<Instant>,
}

/// A sync asked for through the control API (`POST /v1/shops/{name}/sync`).
#[derive(Debug, Clone, Serialize)]
pub struct SyncRequest {
    pub request_id: u64,
    /// `sync` or `full_sync`: what was asked for.
    pub kind: &'static str,
    pub requested_at: String,
}

impl SyncRequest {
    fn full(&self) -> bool {
        self.kind == "full_sync"
    }
}

/// Requests of one shop kept in memory: pending until a run claims them,
/// then the running run's, then answered (the run record lists them too, so
/// a request stays findable after a restart as long as its run is kept).
#[derive(Default)]
struct Requests {
    pending: Vec<SyncRequest>,
    running: Option<Running>,
    /// Newest last, at most [`ANSWERED_KEPT`].
    answered: std::collections::VecDeque<(SyncRequest, u64)>,
}

struct Running {
    run_id: u64,
    /// The shop's first sync (no store view had a checkpoint).
    first: bool,
    requests: Vec<SyncRequest>,
}

/// Pending requests per shop: all pending ones of a kind are answered by
/// the same run, so more only means a client asking in a loop.
pub const MAX_PENDING_REQUESTS: usize = 256;
/// Answered requests remembered per shop (older ones are found through the
/// run records).
const ANSWERED_KEPT: usize = 64;

/// Where a new request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Waits for the next run of its kind (or a full one): schedule it.
    Queued,
    /// An incremental request while the shop's first sync runs: that run
    /// reads the whole catalog and answers it; nothing to schedule.
    Running(u64),
}

/// A finished run, as kept in the `runs` tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: u64,
    pub shop: String,
    pub kind: String,
    pub started_at: String,
    pub ended_at: String,
    /// `ok`; `partial` (it ended, but some answers were inconsistent or some
    /// products unreadable: `error` says which); `held` (the deletion guard
    /// stopped it: `error` says what to run); `failed`, `interrupted`,
    /// `cancelled`.
    pub outcome: String,
    pub resumed: bool,
    pub duration_ms: u64,
    pub pages: u64,
    pub requests: u64,
    pub fetched: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub item_errors: u64,
    pub last_item_error: Option<String>,
    pub error: Option<Value>,
    /// The sync requests this run answers (`POST /v1/shops/{name}/sync`).
    #[serde(default)]
    pub sync_requests: Vec<u64>,
}

/// Per-shop sync state.
struct ShopSync {
    /// Held while a run of this shop is active: never two at once.
    lock: Arc<tokio::sync::Mutex<()>>,
    progress: Mutex<Option<Progress>>,
    queued: AtomicUsize,
    /// Cancelled when the shop is removed (a token of its own, not a
    /// child of the shutdown token: a removed shop's run ends `cancelled`
    /// and loses its job, a stopped daemon's ends `interrupted` and keeps it).
    cancel: CancellationToken,
    /// `--allow-mass-delete` was asked for: the next full run of this shop
    /// takes it (one run only).
    allow_mass_delete: std::sync::atomic::AtomicBool,
    /// The last finished run, as stored (`None` until first read): status
    /// shows it for every shop, and reading it back from sled each time
    /// dominated status with a thousand shops.
    last_run: Mutex<Option<Option<RunRecord>>>,
    /// Requests in flight against the shop (kept across runs: what the
    /// shop's backpressure taught still holds for the next run).
    limiter: limiter::ShopLimiter,
    requests: Mutex<Requests>,
}

/// Owns the concurrency limits and the visible state of all syncs.
pub struct SyncManager {
    permits: Arc<Semaphore>,
    limit: AtomicUsize,
    /// `sync.shop_concurrency`: each shop's limiter's ceiling.
    shop_concurrency: AtomicUsize,
    shops: Mutex<HashMap<String, Arc<ShopSync>>>,
}

impl SyncManager {
    pub fn new(cfg: &Config) -> SyncManager {
        SyncManager {
            permits: Arc::new(Semaphore::new(cfg.sync.max_concurrent_syncs)),
            limit: AtomicUsize::new(cfg.sync.max_concurrent_syncs),
            shop_concurrency: AtomicUsize::new(cfg.sync.shop_concurrency),
            shops: Mutex::new(HashMap::new()),
        }
    }

    /// Applies a changed `max_concurrent_syncs`.
    pub fn reconfigure(&self, cfg: &Config) {
        self.shop_concurrency
            .store(cfg.sync.shop_concurrency, Ordering::Relaxed);
        for s in self
            .shops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.limiter.set_max(cfg.sync.shop_concurrency);
        }
        let new = cfg.sync.max_concurrent_syncs;
        let old = self.limit.swap(new, Ordering::Relaxed);
        if new > old {
            self.permits.add_permits(new - old);
        } else if new < old {
            // Permits in use are taken back as their runs end.
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many((old - new) as u32).await {
                    p.forget();
                }
            });
        }
    }

    fn shop(&self, name: &str) -> Arc<ShopSync> {
        self.shops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ShopSync {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    progress: Mutex::new(None),
                    queued: AtomicUsize::new(0),
                    cancel: CancellationToken::new(),
                    allow_mass_delete: std::sync::atomic::AtomicBool::new(false),
                    last_run: Mutex::new(None),
                    limiter: limiter::ShopLimiter::new(
                        self.shop_concurrency.load(Ordering::Relaxed),
                    ),
                    requests: Mutex::new(Requests::default()),
                })
            })
            .clone()
    }

    /// Lets the next full reconcile of `name` delete more than
    /// `sync.max_delete_share` of a mirror (`--allow-mass-delete`); only
    /// that run.
    pub fn allow_mass_delete(&self, name: &str) {
        self.shop(name)
            .allow_mass_delete
            .store(true, Ordering::Relaxed);
    }

    /// Stops a shop's sync (shop removed): the request in flight is
    /// dropped (its connection closed), a retry wait ends, a page being
    /// stored completes; then waits (bounded) until the run has ended, so
    /// nothing talks to the shop or writes to its trees once this returns.
    /// The shop's entry stays, cancelled, so that a job leased before the
    /// removal and reaching [`run_job`] after it finds it cancelled too;
    /// [`SyncManager::registered`] replaces it when the name is added again.
    pub async fn cancel(&self, name: &str, wait: Duration) {
        let s = self.shop(name);
        s.cancel.cancel();
        if tokio::time::timeout(wait, s.lock.clone().lock_owned())
            .await
            .is_err()
        {
            tracing::warn!(shop = name, "the running sync did not stop in time");
        }
    }

    /// A shop was (re-)registered: forgets a cancelled entry of a removed
    /// shop of that name.
    pub fn registered(&self, name: &str) {
        let mut shops = self.shops.lock().unwrap_or_else(|e| e.into_inner());
        if shops.get(name).is_some_and(|s| s.cancel.is_cancelled()) {
            shops.remove(name);
        }
    }

    /// Becomes true when the shop is removed (probes in flight end on it).
    pub fn removal(&self, name: &str) -> CancellationToken {
        self.shop(name).cancel.clone()
    }

    /// The shop's last finished run (cached; see `ShopSync::last_run`).
    fn last_run(&self, store: &Store, name: &str) -> Option<RunRecord> {
        let s = self.shop(name);
        let mut cached = s.last_run.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(run) = &*cached {
            return run.clone();
        }
        let run = recent_runs(store, name, 1).ok().and_then(|mut v| v.pop());
        *cached = Some(run.clone());
        run
    }

    fn set_last_run(&self, run: &RunRecord) {
        let s = self.shop(&run.shop);
        *s.last_run.lock().unwrap_or_else(|e| e.into_inner()) = Some(Some(run.clone()));
    }

    fn progress(&self, name: &str) -> Option<Progress> {
        let s = self
            .shops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()?;
        s.progress.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a sync request. A full request waits for the next full run;
    /// an incremental one for the next run of either kind, or is answered
    /// by the shop's first sync if that is running (it reads everything).
    /// `None`: too many pending already.
    pub fn add_request(&self, name: &str, req: SyncRequest) -> Option<Placed> {
        let s = self.shop(name);
        let mut r = s.requests.lock().unwrap_or_else(|e| e.into_inner());
        if !req.full()
            && let Some(run) = r.running.as_mut()
            && run.first
        {
            let id = run.run_id;
            run.requests.push(req.clone());
            drop(r);
            if let Some(p) = s
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                p.sync_requests.push(req.request_id);
            }
            return Some(Placed::Running(id));
        }
        if r.pending.len() >= MAX_PENDING_REQUESTS {
            return None;
        }
        r.pending.push(req);
        Some(Placed::Queued)
    }

    /// Where a request stands: `queued`, `running` (with the run's
    /// progress) or `done` (with its run record). `None`: unknown here.
    pub fn request_json(&self, store: &Store, name: &str, id: u64) -> Option<Value> {
        let s = self.shop(name);
        let r = s.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = r.pending.iter().find(|q| q.request_id == id) {
            return Some(json!({
                "request_id": id, "shop": name, "kind": q.kind, "requested_at": q.requested_at,
                "state": "queued", "run_id": null, "run": null, "progress": null,
            }));
        }
        if let Some(run) = &r.running
            && let Some(q) = run.requests.iter().find(|q| q.request_id == id)
        {
            let (q, run_id) = (q.clone(), run.run_id);
            drop(r);
            let progress = s.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Some(json!({
                "request_id": id, "shop": name, "kind": q.kind, "requested_at": q.requested_at,
                "state": "running", "run_id": run_id, "run": null, "progress": progress,
            }));
        }
        let answered = r
            .answered
            .iter()
            .rev()
            .find(|(q, _)| q.request_id == id)
            .cloned();
        drop(r);
        let (kind, requested_at, run) = match answered {
            Some((q, run_id)) => (
                Some(q.kind),
                Some(q.requested_at),
                run_record(store, name, run_id),
            ),
            None => (None, None, find_run_of_request(store, name, id)),
        };
        let run = run?;
        Some(json!({
            "request_id": id, "shop": name, "kind": kind, "requested_at": requested_at,
            "state": "done", "run_id": run.run_id, "outcome": run.outcome, "run": run, "progress": null,
        }))
    }

    /// The running run with its progress, if any.
    pub fn running_json(&self, name: &str) -> Option<Value> {
        let p = self.progress(name)?;
        Some(json!({"run_id": p.run_id, "state": "running", "progress": p}))
    }

    /// A run by id: the running one (`state: running`, its progress) or a
    /// recorded one (`state: done`).
    pub fn run_json(&self, store: &Store, name: &str, run_id: u64) -> Option<Value> {
        if let Some(p) = self.progress(name).filter(|p| p.run_id == run_id) {
            return Some(json!({"run_id": run_id, "state": "running", "progress": p, "run": null}));
        }
        let run = run_record(store, name, run_id)?;
        Some(
            json!({"run_id": run_id, "state": "done", "outcome": run.outcome, "run": run, "progress": null}),
        )
    }

    /// Moves the pending requests a starting run answers to it: a full run
    /// answers every pending request, an incremental run the incremental
    /// ones.
    fn claim(&self, shop: &ShopSync, run_id: u64, full: bool, first: bool) -> Vec<u64> {
        let mut r = shop.requests.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, rest): (Vec<SyncRequest>, Vec<SyncRequest>) = std::mem::take(&mut r.pending)
            .into_iter()
            .partition(|q| full || !q.full());
        r.pending = rest;
        let ids = mine.iter().map(|q| q.request_id).collect();
        r.running = Some(Running {
            run_id,
            first,
            requests: mine,
        });
        ids
    }

    /// The ended run's requests are answered; returns their ids.
    fn answer(&self, shop: &ShopSync, run_id: u64) -> Vec<u64> {
        let mut r = shop.requests.lock().unwrap_or_else(|e| e.into_inner());
        let Some(run) = r.running.take().filter(|run| run.run_id == run_id) else {
            return Vec::new();
        };
        let ids = run.requests.iter().map(|q| q.request_id).collect();
        for q in run.requests {
            if r.answered.len() >= ANSWERED_KEPT {
                r.answered.pop_front();
            }
            r.answered.push_back((q, run_id));
        }
        ids
    }

    /// The shop's request limiter (status, metrics).
    pub fn limiter_status(&self, name: &str) -> limiter::LimiterStatus {
        self.shop(name).limiter.status()
    }

    fn queued(&self, name: &str) -> bool {
        self.shops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|s| s.queued.load(Ordering::Relaxed) > 0)
    }

    /// "acme 40%" for each running sync.
    pub fn running_summary(&self) -> Vec<String> {
        let shops: Vec<(String, Arc<ShopSync>)> = self
            .shops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, s) in shops {
            if let Some(p) = s
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                match p.percent {
                    Some(pc) => out.push(format!("{name} {pc:.0}%")),
                    None => out.push(format!("{name} {} products", p.done)),
                }
            }
        }
        out.sort();
        out
    }

    /// The last run failed: what status shows as the shop's sync problem
    /// (`sync.problem`), `None` when the last run did not fail.
    pub fn problem(&self, store: &Store, name: &str) -> Option<Value> {
        let run = self.last_run(store, name)?;
        if run.outcome != "failed" {
            return None;
        }
        let e = run.error.unwrap_or_else(|| json!({}));
        Some(json!({
            "kind": e.get("kind").cloned().unwrap_or(Value::Null),
            "message": e.get("message").cloned().unwrap_or(Value::Null),
            "hint": e.get("hint").cloned().unwrap_or(Value::Null),
            "since": run.ended_at,
            "run_id": run.run_id,
        }))
    }

    /// The `sync` object of a shop's status.
    pub fn status_json(&self, d: &Env<'_>, rec: &ShopRecord) -> Value {
        let progress = self.progress(&rec.name);
        let state = if progress.is_some() {
            "running"
        } else if self.queued(&rec.name) {
            "queued"
        } else {
            "idle"
        };
        let mut products = 0u64;
        let mut stores = serde_json::Map::new();
        for code in &rec.store_codes {
            let c = crate::mirror::read_cursor(&d.store, &rec.name, code).unwrap_or_default();
            products += c.products;
            stores.insert(
                code.clone(),
                json!({"products": c.products, "cursor_updated_at": c.updated_at, "resumable": c.run.is_some()}),
            );
        }
        let last_run = self.last_run(&d.store, &rec.name);
        let last_error = last_run.as_ref().and_then(|r| r.error.clone());
        let next = |k| {
            d.queue
                .pending(&rec.name, k)
                .and_then(|j| chrono::DateTime::from_timestamp_millis(j.due_ms as i64))
                .map(rfc3339)
        };
        let problem = self.problem(&d.store, &rec.name);
        let mut v = json!({
            "state": state,
            "problem": problem,
            "progress": progress,
            "last_run": last_run,
            "last_error": last_error,
            "products": products,
            "next_sync": next(JobKind::Sync),
            "next_full_sync": next(JobKind::FullSync),
            "concurrency": self.limiter_status(&rec.name),
        });
        v["stores"] = Value::Object(stores);
        v
    }
}

/// The one rule status, `/health` and the metrics share: a shop is healthy
/// when its last probe passed and its last sync run did not fail.
pub fn shop_healthy(d: &Env<'_>, name: &str) -> bool {
    d.health.get(name).state == crate::health::ShopState::Healthy
        && d.syncs.problem(&d.store, name).is_none()
}

/// Runs one leased sync job and schedules the next.
pub async fn run_job(d: &Env<'_>, job: Job, stop: CancellationToken) {
    let cfg = d.config();
    let Some(rec) = d.registry.get(&job.shop) else {
        let _ = d.queue.complete(&job, None);
        return;
    };
    let full = job.kind == JobKind::FullSync;
    let interval = if full {
        cfg.sync.full_interval
    } else {
        cfg.sync.interval
    };
    let health = d.health.get(&rec.name).state;
    if !health.may_sync() {
        tracing::debug!(shop = %rec.name, state = health.as_str(), "sync skipped: shop not reachable");
        let retry = interval.min(cfg.probe.interval.max(Duration::from_secs(60)));
        let _ = d
            .queue
            .complete(&job, Some(now_ms() + retry.as_millis() as u64));
        return;
    }

    let shop = d.syncs.shop(&rec.name);
    shop.queued.fetch_add(1, Ordering::Relaxed);
    let stop_wait = stop.clone();
    let lock = shop.lock.clone();
    let permits = d.syncs.permits.clone();
    let acquire = async move {
        let g = lock.lock_owned().await;
        let p = permits.acquire_owned().await;
        (g, p)
    };
    let acquired = tokio::select! {
        g = acquire => Some(g),
        () = stop_wait.cancelled() => None,
    };
    shop.queued.fetch_sub(1, Ordering::Relaxed);
    let Some((_guard, Ok(permit))) = acquired else {
        // Shutting down before it started: it runs at the next start.
        let _ = d.queue.complete(&job, Some(now_ms()));
        return;
    };
    if shop.cancel.is_cancelled() {
        // Removed while this job waited: nothing of it may be written.
        let _ = d.queue.complete(&job, None);
        return;
    }

    let slot = Mutex::new(Some(permit));
    let outcome = run(d, &rec, &shop, &slot, full, stop).await;
    drop(slot);
    let next = match &outcome {
        Ok(()) => {
            let what = if full {
                crate::spread::Recurring::FullSync
            } else {
                crate::spread::Recurring::Sync
            };
            crate::spread::next_due_ms(&rec.name, what, now_ms(), interval)
        }
        Err(SyncError::Interrupted) => now_ms(),
        Err(SyncError::Cancelled) => 0,
        // Asking again soon would list the whole catalog to be held again:
        // the operator confirms, or the next scheduled run looks again.
        Err(SyncError::MassDelete { .. }) => {
            let what = if full {
                crate::spread::Recurring::FullSync
            } else {
                crate::spread::Recurring::Sync
            };
            crate::spread::next_due_ms(&rec.name, what, now_ms(), interval)
        }
        // The shop asked to wait: honoured up to `MAX_RETRY_AFTER`.
        Err(SyncError::Shop(e)) if e.retry_after.is_some() => {
            let asked = e.retry_after.unwrap_or_default();
            now_ms() + asked.clamp(MAX_WAIT_IN_RUN, MAX_RETRY_AFTER).as_millis() as u64
        }
        // Failed: try again soon (the probe decides whether the shop is up).
        Err(_) => now_ms() + interval.min(Duration::from_secs(120)).as_millis() as u64,
    };
    let next = if matches!(outcome, Err(SyncError::Cancelled)) {
        None
    } else {
        Some(next)
    };
    if let Err(e) = d.queue.complete(&job, next) {
        tracing::error!(shop = %rec.name, "queue: {e}");
    }
    if let Err(e) = d.store.flush().await {
        tracing::error!("flush: {e}");
    }
    d.changed.notify_one();
}

/// Context of one run, shared by the platform walks.
pub struct RunCtx<'a> {
    pub d: &'a Env<'a>,
    pub rec: &'a ShopRecord,
    pub cfg: Arc<Config>,
    pub run_id: u64,
    pub full: bool,
    shop: &'a ShopSync,
    /// The run's global sync slot: given back while the run waits to retry.
    slot: &'a Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    stop: CancellationToken,
    cancel: CancellationToken,
    pub last_item_error: Option<String>,
    /// This run may delete more than `sync.max_delete_share`
    /// (`--allow-mass-delete`).
    pub allow_mass_delete: bool,
    /// Set when the run met answers it could not trust or products it could
    /// not read: it ends `partial` with this problem, never `ok`.
    pub problem: Option<ShopError>,
    /// Inconsistent or suspicious answers met by this run: the run ends
    /// `partial` with them as its problem (bounded: see [`RunCtx::inconsistent`]).
    problems: Mutex<Problems>,
}

/// The problems of a run, kept bounded: the first few in full, then a count.
#[derive(Debug, Default)]
struct Problems {
    shown: Vec<String>,
    more: u64,
}

/// Problems a run keeps word for word; later ones are counted.
const MAX_PROBLEMS: usize = 5;

impl RunCtx<'_> {
    /// Records an inconsistent answer (or bad data) the run met and went on
    /// from: the run ends `partial`, never `ok`, with the problem named. A
    /// problem already recorded is not repeated.
    pub fn inconsistent(&self, message: impl Into<String>) {
        let message = message.into();
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.shown.contains(&message) {
            return;
        }
        tracing::warn!(shop = %self.rec.name, run = self.run_id, "{message}");
        if p.shown.len() < MAX_PROBLEMS {
            p.shown.push(message);
        } else {
            p.more += 1;
        }
    }

    /// The problems recorded so far, as one message (`None`: none).
    fn problems_message(&self) -> Option<String> {
        let p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.shown.is_empty() {
            return None;
        }
        let mut m = p.shown.join("; ");
        if p.more > 0 {
            m.push_str(&format!("; and {} more", p.more));
        }
        Some(m)
    }

    /// Notes what makes this run `partial` (the first problem is kept, and
    /// the count of such problems).
    pub fn partial(&mut self, e: ShopError) {
        tracing::warn!(shop = %self.rec.name, run = self.run_id, kind = e.kind.as_str(), "{}", e.message);
        if self.problem.is_none() {
            self.problem = Some(e);
        }
    }

    /// Checked between pages: a page in flight always completes.
    pub fn check(&self) -> Result<(), SyncError> {
        if self.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        if self.stop.is_cancelled() {
            return Err(SyncError::Interrupted);
        }
        Ok(())
    }

    /// The shop's request limiter: [`RunCtx::request`] takes a permit per
    /// attempt; a walk reads [`limiter::ShopLimiter::limit`] to decide how
    /// many workers are worth running.
    pub fn limiter(&self) -> &limiter::ShopLimiter {
        &self.shop.limiter
    }

    /// Updates the visible progress.
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut g = self.shop.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = g.as_mut() {
            f(p);
            if let Some(started) = p.started {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                p.rate_per_s = (p.done as f64 / secs * 10.0).round() / 10.0;
                if let Some(total) = p.total {
                    let total = total.max(p.done);
                    p.percent = Some(if total == 0 {
                        100.0
                    } else {
                        (p.done as f64 * 1000.0 / total as f64).round() / 10.0
                    });
                    p.eta_s = (p.rate_per_s > 0.0)
                        .then(|| ((total - p.done) as f64 / p.rate_per_s) as u64);
                }
            }
        }
    }

    /// Counts a page's effect.
    pub fn applied(&self, fetched: u64, a: Applied) {
        self.update(|p| {
            p.done += fetched;
            p.pages += 1;
            p.created += a.created;
            p.updated += a.updated;
            p.unchanged += a.unchanged;
            p.deleted += a.deleted;
        });
        self.d.metrics.add_sync_counts(
            &self.rec.name,
            crate::metrics::SyncCounts {
                fetched,
                created: a.created,
                updated: a.updated,
                deleted: a.deleted,
            },
        );
    }

    /// Runs a shop request with retries: transient failures are retried
    /// with backoff (honouring `Retry-After`), credential failures are not.
    /// Each attempt holds a permit of the shop's limiter (so concurrent
    /// callers stay within its limit) and tells it how the shop answered;
    /// the wait before a retry holds none. Callers must not hold a permit
    /// of their own meanwhile.
    pub async fn request<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, SyncError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ShopError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let permit = {
                let stop = self.stop.clone();
                let cancel = self.cancel.clone();
                tokio::select! {
                    p = self.shop.limiter.acquire() => p,
                    () = stop.cancelled() => return Err(SyncError::Interrupted),
                    () = cancel.cancelled() => return Err(SyncError::Cancelled),
                }
            };
            self.update(|p| p.requests += 1);
            let timeout = self.cfg.sync.request_timeout;
            // A removal drops the request in flight (closing its
            // connection): nothing more reaches a removed shop.
            let cancel = self.cancel.clone();
            let result = tokio::select! {
                r = tokio::time::timeout(timeout + Duration::from_secs(1), f()) => match r {
                    Ok(r) => r,
                    Err(_) => Err(ShopError::new(
                        FailureKind::Timeout,
                        format!(
                            "{what}: no answer within {}",
                            humantime::format_duration(timeout)
                        ),
                    )),
                },
                () = cancel.cancelled() => return Err(SyncError::Cancelled),
            };
            match &result {
                Ok(_) => permit.success(),
                Err(e) => {
                    if limiter::is_backpressure(e) {
                        self.d.metrics.count_backpressure(&self.rec.name);
                    }
                    permit.failed(e)
                }
            }
            match result {
                Ok(v) => {
                    self.d.metrics.count_request(&self.rec.name, "ok");
                    return Ok(v);
                }
                Err(e) => {
                    self.d
                        .metrics
                        .count_request(&self.rec.name, e.kind.as_str());
                    // A redirect cobbyd does not follow, a 4xx other than
                    // 408, or an answer over the size limit answers the
                    // same when asked again.
                    let permanent_status = e.kind == FailureKind::HttpStatus
                        && e.status
                            .is_some_and(|s| (300..500).contains(&s) && s != 408);
                    let retriable = !e.kind.is_auth()
                        && !permanent_status
                        && !matches!(
                            e.kind,
                            FailureKind::NotApi | FailureKind::Dns | FailureKind::TooLarge
                        );
                    if !retriable || attempt >= REQUEST_ATTEMPTS {
                        return Err(SyncError::Shop(e));
                    }
                    if let Some(asked) = e.retry_after.filter(|d| *d > MAX_WAIT_IN_RUN) {
                        return Err(SyncError::Shop(too_long_to_wait(e, asked)));
                    }
                    let delay = crate::health::retry_delay(
                        &e,
                        attempt,
                        Duration::from_millis(500),
                        MAX_WAIT_IN_RUN,
                    );
                    let shown = crate::logging::escape(&e.message);
                    tracing::debug!(shop = %self.rec.name, attempt, kind = e.kind.as_str(), delay_ms = delay.as_millis() as u64, "{what} failed, retrying: {shown}");
                    self.wait(
                        delay,
                        &format!("{}: retrying in {}", e.kind.as_str(), span(delay)),
                    )
                    .await?;
                }
            }
        }
    }

    /// Waits before a retry with the run's sync slot given back, so that a
    /// shop that makes its syncs wait does not hold back other shops'; takes
    /// a slot again after.
    async fn wait(&self, delay: Duration, why: &str) -> Result<(), SyncError> {
        let released = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let had_slot = released.is_some();
        drop(released);
        self.update(|p| p.waiting = Some(why.to_string()));
        let stop = self.stop.clone();
        let cancel = self.cancel.clone();
        let result = async {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return Err(SyncError::Interrupted),
                () = cancel.cancelled() => return Err(SyncError::Cancelled),
            }
            if had_slot {
                let permits = self.d.syncs.permits.clone();
                let permit = tokio::select! {
                    p = permits.acquire_owned() => p.map_err(|_| SyncError::Interrupted)?,
                    () = stop.cancelled() => return Err(SyncError::Interrupted),
                    () = cancel.cancelled() => return Err(SyncError::Cancelled),
                };
                *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
            }
            Ok(())
        }
        .await;
        self.update(|p| p.waiting = None);
        result
    }

    /// Flushes the store: the durability point between pages.
    pub async fn flush(&self) -> Result<(), SyncError> {
        self.d.store.flush().await?;
        Ok(())
    }

    /// Name of the scratch tree of a full reconcile.
    pub fn scratch(&self, store_code: &str, what: &str) -> String {
        format!("{what}:{}:{store_code}", self.rec.name)
    }
}

/// The error of a run that stops because the shop asked to wait longer
/// than a run waits: says what the daemon does instead.
fn too_long_to_wait(mut e: ShopError, asked: Duration) -> ShopError {
    let next = asked.clamp(MAX_WAIT_IN_RUN, MAX_RETRY_AFTER);
    let capped = if asked > MAX_RETRY_AFTER {
        format!(" (cobbyd waits at most {})", span(MAX_RETRY_AFTER))
    } else {
        String::new()
    };
    e.message = format!(
        "{}; the shop asked to retry after {}; the run stops and the next sync tries in {}{capped}",
        e.message,
        span(asked),
        span(next)
    );
    e.retry_after = Some(next);
    e
}

/// A duration for people, in its largest unit: "30s", "10m", "31 years".
/// " and N more" after a list shown in part (empty when nothing was left out).
pub(crate) fn and_more(more: u64) -> String {
    if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    }
}

pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        172_800..=63_071_999 => format!("{} days", s / 86_400),
        _ => format!("{} years", s / 31_536_000),
    }
}

async fn run(
    d: &Env<'_>,
    rec: &ShopRecord,
    shop: &ShopSync,
    slot: &Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    full: bool,
    stop: CancellationToken,
) -> Result<(), SyncError> {
    let cfg = d.config();
    let kind = if full { "full_sync" } else { "sync" };
    // Ids start at 1: 0 means "no run" to clients. Every attempt gets a new
    // id, so that a failed or interrupted attempt keeps its record and
    // clients waiting for "a run newer than N" see the resumed one end.
    let run_id = d.store.next_run_id()?;
    // A run interrupted earlier (shutdown, crash, failure) is resumed from
    // its checkpoint: its run cursors are handed to this run.
    // Store views run in order and a finished view clears its run cursor,
    // so the views before the first unfinished one were completed by the
    // interrupted run and are not redone.
    let mut resumed_id = None;
    let mut first_view = 0;
    // The shop's first sync: no store view has a checkpoint yet.
    let mut first = true;
    for (i, code) in rec.store_codes.iter().enumerate() {
        let mirror = Mirror::open(&d.store, &rec.name, code)?;
        let mut cursor = mirror.cursor()?;
        first &= cursor.updated_at.is_none() && cursor.products == 0;
        if let Some(r) = cursor.run.as_mut()
            && r.full == full
        {
            if resumed_id.is_none() {
                first_view = i;
            }
            resumed_id = Some(r.run_id);
            r.run_id = run_id;
            mirror.save_cursor(&cursor)?;
        }
    }
    let started_at = rfc3339(chrono::Utc::now());
    let started = Instant::now();
    let requests = d.syncs.claim(shop, run_id, full, first);
    *shop.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(Progress {
        run_id,
        kind,
        sync_requests: requests,
        started_at: started_at.clone(),
        resumed: resumed_id.is_some(),
        phase: "starting".into(),
        started: Some(started),
        ..Default::default()
    });
    tracing::info!(shop = %rec.name, run = run_id, kind, resumed = resumed_id.is_some(), resumed_from = resumed_id.unwrap_or(0), "sync started");
    d.changed.notify_one();

    let mut ctx = RunCtx {
        d,
        rec,
        cfg: cfg.clone(),
        run_id,
        full,
        shop,
        slot,
        stop,
        cancel: shop.cancel.clone(),
        last_item_error: None,
        allow_mass_delete: full && shop.allow_mass_delete.swap(false, Ordering::Relaxed),
        problem: None,
        problems: Mutex::new(Problems::default()),
    };
    let result = async {
        let client = d
            .registry
            .client(rec, &client_options(&cfg))
            .map_err(SyncError::Shop)?;
        for code in &rec.store_codes[first_view..] {
            ctx.check()?;
            ctx.update(|p| p.store_code = code.clone());
            match &client {
                ShopClient::M2(c) => m2::sync_store(&mut ctx, c, code).await?,
                ShopClient::M1(c) => m1::sync_store(&mut ctx, c, code).await?,
            }
        }
        Ok::<(), SyncError>(())
    }
    .await;
    // A write that failed because of the disk: say so (and stop the
    // daemon's other writers) rather than report a bare database error.
    let result = match result {
        Err(SyncError::Store(e)) if d.store.note(&e) => Err(SyncError::Store(
            d.store.problem().map_or(e, StoreError::Unwritable),
        )),
        r => r,
    };

    let p = shop
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let took = started.elapsed();
    // The inconsistencies noted by concurrent workers join the problem
    // that makes the run `partial`.
    if let Some(m) = ctx.problems_message() {
        match ctx.problem.as_mut() {
            Some(e) => {
                e.message.push_str("; ");
                e.message.push_str(&m);
            }
            None => ctx.problem = Some(ShopError::new(FailureKind::Protocol, m)),
        }
    }
    let requests = d.syncs.answer(shop, run_id);
    let outcome = match &result {
        Ok(()) if ctx.problem.is_some() => "partial",
        Ok(()) => "ok",
        Err(SyncError::MassDelete { .. }) => "held",
        Err(SyncError::Interrupted) => "interrupted",
        Err(SyncError::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    let error = match &result {
        Ok(()) => ctx.problem.as_ref().map(|e| {
            json!({
                "kind": e.kind, "message": e.message, "hint": crate::health::hint_for(e.kind, rec),
            })
        }),
        Err(e @ SyncError::MassDelete { .. }) => Some(json!({
            "kind": "mass_delete",
            "message": e.to_string(),
            "hint": format!(
                "if the shop really removed these products, confirm once with `cobbyd sync {} --full --allow-mass-delete`; otherwise check the shop's catalog, the store code and the API user's role (the mirror is unchanged)",
                rec.name
            ),
        })),
        Err(SyncError::Shop(e)) => Some(json!({
            "kind": e.kind, "message": e.message, "hint": crate::health::hint_for(e.kind, rec),
        })),
        Err(SyncError::Store(StoreError::Unwritable(p))) => Some(json!({
            "kind": "storage", "message": p.message, "hint": p.hint,
        })),
        Err(e @ SyncError::Store(_)) => Some(json!({"kind": "store", "message": e.to_string()})),
        _ => None,
    };
    let record = RunRecord {
        run_id,
        shop: rec.name.clone(),
        kind: kind.into(),
        started_at,
        ended_at: rfc3339(chrono::Utc::now()),
        outcome: outcome.into(),
        resumed: p.resumed,
        duration_ms: took.as_millis() as u64,
        pages: p.pages,
        requests: p.requests,
        fetched: p.done,
        created: p.created,
        updated: p.updated,
        unchanged: p.unchanged,
        deleted: p.deleted,
        item_errors: p.item_errors,
        last_item_error: ctx.last_item_error.clone(),
        error: error.clone(),
        sync_requests: requests,
    };
    if outcome != "cancelled"
        && let Err(e) = save_run(&d.store, &record, cfg.sync.keep_runs)
    {
        // Still log the run below; a disk problem is in status already.
        d.store.note(&e);
        tracing::error!(shop = %rec.name, run = run_id, "cannot record the sync run: {e}");
        if result.is_ok() {
            return Err(SyncError::Store(e));
        }
    } else if outcome != "cancelled" {
        d.syncs.set_last_run(&record);
    }
    d.metrics
        .observe_sync(&rec.name, kind, took, result.is_ok());
    let msg = format!(
        "sync {outcome}: {} fetched, {} created, {} updated, {} unchanged, {} deleted, {} requests in {:.1}s",
        p.done,
        p.created,
        p.updated,
        p.unchanged,
        p.deleted,
        p.requests,
        took.as_secs_f64()
    );
    match &result {
        Ok(()) if ctx.problem.is_some() => {
            let e = ctx
                .problem
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or("");
            tracing::warn!(shop = %rec.name, run = run_id, kind, outcome, "{msg}: {e}")
        }
        Ok(()) | Err(SyncError::Interrupted | SyncError::Cancelled) => {
            tracing::info!(shop = %rec.name, run = run_id, kind, outcome, fetched = p.done, created = p.created, updated = p.updated, deleted = p.deleted, "{msg}")
        }
        Err(e) => {
            let e = crate::logging::escape(&e.to_string()).into_owned();
            tracing::warn!(shop = %rec.name, run = run_id, kind, outcome, "{msg}: {e}")
        }
    }
    result
}

fn save_run(store: &Store, r: &RunRecord, keep: usize) -> Result<(), StoreError> {
    let v = serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store
        .runs()
        .insert(crate::layout::run_key(&r.shop, r.run_id), v)?;
    let keys: Vec<sled::IVec> = store
        .runs()
        .scan_prefix(crate::layout::runs_prefix(&r.shop))
        .keys()
        .filter_map(Result::ok)
        .collect();
    if keys.len() > keep {
        for k in &keys[..keys.len() - keep] {
            store.runs().remove(k)?;
        }
    }
    Ok(())
}

/// No run of the shop was ever recorded and no store view has a
/// checkpoint or products: its first sync is still to come.
pub fn never_synced(d: &Env<'_>, rec: &ShopRecord) -> bool {
    if d.store
        .runs()
        .scan_prefix(crate::layout::runs_prefix(&rec.name))
        .next()
        .is_some()
    {
        return false;
    }
    rec.store_codes.iter().all(|code| {
        crate::mirror::read_cursor(&d.store, &rec.name, code)
            .is_ok_and(|c| c.updated_at.is_none() && c.products == 0 && c.run.is_none())
    })
}

/// One recorded run of a shop.
pub fn run_record(store: &Store, shop: &str, run_id: u64) -> Option<RunRecord> {
    let v = store
        .runs()
        .get(crate::layout::run_key(shop, run_id))
        .ok()??;
    serde_json::from_slice(&v).ok()
}

/// The newest recorded run that answers request `id`.
fn find_run_of_request(store: &Store, shop: &str, id: u64) -> Option<RunRecord> {
    store
        .runs()
        .scan_prefix(crate::layout::runs_prefix(shop))
        .rev()
        .filter_map(|r| r.ok())
        .filter_map(|(_, v)| serde_json::from_slice::<RunRecord>(&v).ok())
        .find(|r| r.sync_requests.contains(&id))
}

/// The last `n` runs of a shop, oldest first.
pub fn recent_runs(store: &Store, shop: &str, n: usize) -> Result<Vec<RunRecord>, StoreError> {
    let mut out: Vec<RunRecord> = store
        .runs()
        .scan_prefix(crate::layout::runs_prefix(shop))
        .rev()
        .take(n)
        .filter_map(|r| r.ok())
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect();
    out.reverse();
    Ok(out)
}

/// Full reconcile, last phase: removes every mirrored product whose SKU the
/// listing did not see. Idempotent, so a resumed run simply walks again.
///
/// The deletion rule: the caller passes `seen` only after a complete,
/// consistent listing (every product the shop listed, and those it could
/// not vouch for, are in it). Then, before anything is deleted, the unseen
/// products are counted: an empty listing over a non-empty mirror, or more
/// than `sync.max_delete_share` of the mirror, deletes nothing and ends the
/// run (`held`, naming `--allow-mass-delete`) unless this run was allowed
/// to. A held run forgets its run cursor, so the next full run lists the
/// shop again rather than acting on this listing later.
pub async fn delete_unseen(
    ctx: &RunCtx<'_>,
    mirror: &Mirror,
    cursor: &mut crate::mirror::Cursor,
    seen: &sled::Tree,
) -> Result<(), SyncError> {
    const BATCH: usize = 500;
    ctx.update(|p| p.phase = "delete".into());
    let allowed = ctx.allow_mass_delete || cursor.run.as_ref().is_some_and(|r| r.allow_mass_delete);
    let mut gone = 0u64;
    let mut products = 0u64;
    for k in mirror.index().iter().keys() {
        let k = k.map_err(StoreError::from)?;
        products += 1;
        if !seen.contains_key(&k).map_err(StoreError::from)? {
            gone += 1;
        }
    }
    let share = ctx.cfg.sync.max_delete_share;
    let store_code = store_code_of(ctx);
    if gone > 0 && !allowed {
        let refused = if seen.is_empty() {
            Some(SyncError::Shop(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "the shop listed no products at all while the mirror has {products}; refusing to delete everything (check the store code and the API user's permissions; if the shop really has no products any more: cobbyd sync {} --full --allow-mass-delete)",
                    ctx.rec.name
                ),
            )))
        } else if gone as f64 > share * products as f64 {
            Some(SyncError::MassDelete {
                store_code,
                gone,
                products,
                share,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            cursor.run = None;
            mirror.save_cursor(cursor)?;
            ctx.flush().await?;
            return Err(e);
        }
    }
    if gone == 0 {
        return Ok(());
    }
    if allowed && let Some(r) = cursor.run.as_mut() {
        // A resumed run goes on with the permission it was given.
        r.allow_mass_delete = true;
        mirror.save_cursor(cursor)?;
    }
    let mut from: Option<sled::IVec> = None;
    loop {
        ctx.check()?;
        let mut gone = Vec::new();
        let mut last = None;
        let iter = match &from {
            None => mirror.index().range::<&[u8], _>(..),
            Some(k) => mirror.index().range::<&[u8], _>((
                std::ops::Bound::Excluded(k.as_ref()),
                std::ops::Bound::Unbounded,
            )),
        };
        let mut scanned = 0;
        for k in iter.keys() {
            let k = k.map_err(StoreError::from)?;
            scanned += 1;
            if !seen.contains_key(&k).map_err(StoreError::from)? {
                gone.push(String::from_utf8_lossy(&k).into_owned());
            }
            last = Some(k);
            if scanned >= BATCH * 10 || gone.len() >= BATCH {
                break;
            }
        }
        if !gone.is_empty() {
            let a = mirror.apply(&[], &gone, cursor)?;
            ctx.flush().await?;
            ctx.applied(0, a);
        }
        match last {
            Some(k) => from = Some(k),
            None => return Ok(()),
        }
    }
}

/// The store view a run is on (for messages).
fn store_code_of(ctx: &RunCtx<'_>) -> String {
    ctx.shop
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|p| p.store_code.clone())
        .unwrap_or_default()
}

/// Starts or resumes the run cursor of a store view.
pub fn begin(ctx: &RunCtx<'_>, cursor: &mut crate::mirror::Cursor, first_phase: &str) -> bool {
    match &cursor.run {
        Some(r) if r.run_id == ctx.run_id => true,
        _ => {
            cursor.run = Some(crate::mirror::RunCursor {
                run_id: ctx.run_id,
                full: ctx.full,
                phase: first_phase.into(),
                ..Default::default()
            });
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, full: bool) -> SyncRequest {
        SyncRequest {
            request_id: id,
            kind: if full { "full_sync" } else { "sync" },
            requested_at: String::new(),
        }
    }

    #[test]
    fn a_full_run_answers_pending_incremental_requests_not_the_reverse() {
        let m = SyncManager::new(&Config::default());
        assert_eq!(m.add_request("a", req(1, false)), Some(Placed::Queued));
        assert_eq!(m.add_request("a", req(2, true)), Some(Placed::Queued));
        let shop = m.shop("a");
        // An incremental run takes only the incremental request.
        assert_eq!(m.claim(&shop, 10, false, false), vec![1]);
        assert_eq!(m.answer(&shop, 10), vec![1]);
        assert_eq!(m.add_request("a", req(3, false)), Some(Placed::Queued));
        // A full run takes the full and the incremental one.
        assert_eq!(m.claim(&shop, 11, true, false), vec![2, 3]);
        // A request made while it runs waits for the next run...
        assert_eq!(m.add_request("a", req(4, false)), Some(Placed::Queued));
        assert_eq!(m.answer(&shop, 11), vec![2, 3]);
        assert_eq!(m.claim(&shop, 12, false, false), vec![4]);
        m.answer(&shop, 12);
        // ...unless the running run is the shop's first sync.
        m.claim(&shop, 13, false, true);
        assert_eq!(m.add_request("a", req(5, false)), Some(Placed::Running(13)));
        assert_eq!(m.add_request("a", req(6, true)), Some(Placed::Queued));
        assert_eq!(m.answer(&shop, 13), vec![5]);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let m = SyncManager::new(&Config::default());
        for i in 0..MAX_PENDING_REQUESTS as u64 {
            assert!(m.add_request("a", req(i, false)).is_some());
        }
        assert_eq!(m.add_request("a", req(9999, false)), None);
    }
}
