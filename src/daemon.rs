//! The shared state of a running daemon ([`Daemon`]): the configuration in
//! force, the store and the parts over it (queue, registry, health book),
//! the sync manager and the metrics, and the daemon's [`Phase`]. Its life
//! (start-up, signals, reload, drain) is [`crate::lifecycle`]'s.

use crate::config::{Config, ConfigChange};
use crate::probe::HealthBook;
use crate::queue::{JobKind, Queue, now_ms};
use crate::registry::Registry;
use crate::spread::{self, Recurring};
use crate::store::Store;
use crate::sync::SyncManager;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::watch;

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;
/// Exit status when the state directory cannot be written at start, or the
/// in-place restart failed (sysexits.h EX_TEMPFAIL): systemd's
/// `Restart=on-failure` tries again.
pub const EX_TEMPFAIL: u8 = 75;

/// Where the daemon is in its life; `/health` answers 200 only in `Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

/// Everything the tasks of a running daemon share.
pub struct Daemon {
    config: RwLock<Arc<Config>>,
    /// `--config` as given (reloads read the same path).
    pub config_arg: Option<PathBuf>,
    /// The file actually read, if any.
    pub config_path: RwLock<Option<PathBuf>>,
    pub started: Instant,
    pub store: Store,
    pub queue: Queue,
    pub registry: Registry,
    pub health: HealthBook,
    pub syncs: SyncManager,
    pub metrics: crate::metrics::Metrics,
    phase: watch::Sender<Phase>,
    /// Poked when something status shows changed (for `STATUS=`).
    pub changed: tokio::sync::Notify,
    /// Serialises registry changes (add, rotate, remove).
    pub admin: tokio::sync::Mutex<()>,
}

impl Daemon {
    /// The shared state over an opened store, in [`Phase::Starting`]:
    /// queue (requeuing leases left by a crash), registry, health book.
    pub(crate) fn build(
        cfg: Arc<Config>,
        config_arg: Option<PathBuf>,
        config_path: Option<PathBuf>,
        store: Store,
    ) -> Result<Arc<Daemon>, crate::store::StoreError> {
        let (queue, recovered) = Queue::open(store.clone())?;
        if recovered > 0 {
            tracing::warn!(recovered, "requeued jobs left running by an earlier crash");
        }
        let registry = Registry::open(store.clone())?;
        let health = HealthBook::open(store.clone())?;
        let syncs = SyncManager::new(&cfg);
        Ok(Arc::new(Daemon {
            config: RwLock::new(cfg),
            config_arg,
            config_path: RwLock::new(config_path),
            started: Instant::now(),
            store,
            queue,
            registry,
            health,
            syncs,
            metrics: crate::metrics::Metrics::default(),
            phase: watch::channel(Phase::Starting).0,
            changed: tokio::sync::Notify::new(),
            admin: tokio::sync::Mutex::new(()),
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// True once shutdown began: no new work is taken.
    pub fn stopping(&self) -> bool {
        self.phase() == Phase::Stopping
    }

    /// One line for `systemctl status`:
    /// "3 shops: 2 healthy, 1 down; syncing acme 40%".
    pub fn status_line(&self) -> String {
        let names = self.registry.names();
        let mut line = format!(
            "{} shop{}",
            names.len(),
            if names.len() == 1 { "" } else { "s" }
        );
        let counts = self.health.count_states(&names);
        if !counts.is_empty() {
            let parts: Vec<String> = counts
                .iter()
                .map(|(s, n)| format!("{n} {}", s.as_str()))
                .collect();
            line.push_str(": ");
            line.push_str(&parts.join(", "));
        }
        let running = self.syncs.running_summary();
        if !running.is_empty() {
            line.push_str("; syncing ");
            line.push_str(&running.join(", "));
        }
        if let Some(p) = self.store.problem() {
            line.push_str(&format!("; state directory unwritable ({})", p.kind));
        }
        if self.stopping() {
            line.push_str("; stopping");
        }
        line
    }

    /// The narrow handle the sync engine works with.
    pub fn sync_env(&self) -> crate::sync::Env<'_> {
        crate::sync::Env {
            cfg: self.config(),
            store: self.store.clone(),
            queue: &self.queue,
            registry: &self.registry,
            health: &self.health,
            syncs: &self.syncs,
            metrics: &self.metrics,
            changed: &self.changed,
        }
    }

    /// What `/metrics` shows besides the counters.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let shops = self
            .registry
            .list()
            .into_iter()
            .map(|s| {
                let h = self.health.get(&s.name);
                let mirrors = s
                    .store_codes
                    .iter()
                    .map(|code| {
                        let n = crate::mirror::Mirror::open(&self.store, &s.name, code)
                            .and_then(|m| m.cursor())
                            .map(|c| c.products)
                            .unwrap_or(0);
                        (code.clone(), n)
                    })
                    .collect();
                crate::metrics::ShopSnapshot {
                    state: h.state,
                    consecutive_failures: h.consecutive_failures,
                    healthy: crate::sync::shop_healthy(&self.sync_env(), &s.name),
                    last_sync_failed: self.syncs.problem(&self.store, &s.name).is_some(),
                    mirrors,
                    concurrency_limit: self.syncs.limiter_status(&s.name).limit,
                    name: s.name,
                }
            })
            .collect();
        crate::metrics::Snapshot {
            uptime: self.started.elapsed(),
            queue_depth: self.queue.depth(),
            shops,
        }
    }

    /// A shop's recurring jobs with their first due times: probe, sync, full
    /// sync (in this order). A shop never probed (new, or added with
    /// --no-verify) is probed now; otherwise each job gets the shop's slot
    /// in the coming interval (`spread`). The first full reconcile comes
    /// after about a full interval: the first sync reads the whole catalog.
    pub fn first_jobs(&self, shop: &str) -> [(JobKind, u64); 3] {
        let cfg = self.config();
        let now = now_ms();
        let probe = if self.health.get(shop).last_probe.is_none() {
            now
        } else {
            spread::first_due_ms(shop, Recurring::Probe, now, cfg.probe.interval)
        };
        let full_ms = u64::try_from(cfg.sync.full_interval.as_millis()).unwrap_or(u64::MAX);
        [
            (JobKind::Probe, probe),
            (
                JobKind::Sync,
                spread::first_due_ms(shop, Recurring::Sync, now, cfg.sync.interval),
            ),
            (
                JobKind::FullSync,
                spread::next_due_ms(
                    shop,
                    Recurring::FullSync,
                    now.saturating_add(full_ms / 2),
                    cfg.sync.full_interval,
                ),
            ),
        ]
    }

    /// Applies a reload: the new configuration, its file, the sync limits;
    /// every shop client is built again (timeouts and CA files are read
    /// when a client is built).
    pub fn apply(&self, change: &ConfigChange, path: Option<PathBuf>) {
        self.syncs.reconfigure(&change.new);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = change.new.clone();
        *self.config_path.write().unwrap_or_else(|e| e.into_inner()) = path;
        self.registry.forget_clients();
    }

    /// Warns at start about shops that use plain http.
    pub fn warn_insecure_shops(&self) {
        for rec in self.registry.list() {
            if rec.grandfathered_http() {
                tracing::warn!(
                    shop = %rec.name,
                    "uses plain http (registered before --allow-insecure-http was required; still used): credentials cross the network unencrypted: register the shop's https:// URL when it has one"
                );
            } else if rec.insecure_http() {
                tracing::warn!(shop = %rec.name, "{}", crate::shop::INSECURE_HTTP_NOTE);
            }
        }
    }

    /// Makes sure every shop has its recurring jobs pending (at start-up;
    /// `shop add` stores them with the record). Existing pending jobs keep
    /// their time (a shop waiting out a backoff keeps waiting).
    pub fn ensure_jobs(&self, shop: &str) -> Result<(), crate::store::StoreError> {
        for (kind, due) in self.first_jobs(shop) {
            if self.queue.pending(shop, kind).is_none() {
                self.queue.schedule_at(shop, kind, due, true)?;
            }
        }
        Ok(())
    }
}
