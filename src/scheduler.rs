//! The scheduler: leases due jobs from the durable queue and runs them on
//! bounded worker pools (probes; syncs through the sync manager), then
//! schedules each job's next occurrence. On shutdown it stops leasing and
//! waits for running jobs.

use crate::daemon::Daemon;
use crate::queue::{Job, JobKind, now_ms};
use crate::registry::client_options;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Probes running at once across all shops.
const PROBE_WORKERS: usize = 16;
/// Longest sleep between looks at the queue (a safety net; wake-ups are
/// event-driven).
const MAX_IDLE: Duration = Duration::from_secs(60);

/// Runs until `stop` is cancelled and every running job has finished
/// (a sync stops at its next page boundary).
pub async fn run(daemon: Arc<Daemon>, stop: CancellationToken) {
    let probes = Arc::new(Semaphore::new(PROBE_WORKERS));
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        if stop.is_cancelled() {
            break;
        }
        loop {
            // Reap finished jobs so the set stays small.
            while running.try_join_next().is_some() {}
            // The state directory cannot be written: no job could record
            // anything; wait for the daemon to reopen the store.
            if daemon.store.problem().is_some() {
                break;
            }
            let job = match daemon.queue.lease_due(now_ms()) {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("queue: {e}");
                    daemon.store.note(&e);
                    break;
                }
            };
            match job.kind {
                JobKind::Probe => {
                    let Ok(permit) = probes.clone().acquire_owned().await else {
                        break;
                    };
                    let d = daemon.clone();
                    let span = tracing::info_span!("probe", shop = %job.shop, job = job.seq);
                    running.spawn(
                        async move {
                            run_probe(&d, &job).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                JobKind::Sync | JobKind::FullSync => {
                    let d = daemon.clone();
                    let stop = stop.clone();
                    let span = tracing::info_span!("sync", shop = %job.shop, job = job.seq);
                    running.spawn(
                        async move { crate::sync::run_job(&d.sync_env(), job, stop).await }
                            .instrument(span),
                    );
                }
            }
        }
        let wait = if daemon.store.problem().is_some() {
            MAX_IDLE
        } else {
            daemon
                .queue
                .next_due_ms()
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(MAX_IDLE)
                .min(MAX_IDLE)
        };
        tokio::select! {
            _ = daemon.queue.wait(wait) => {}
            () = stop.cancelled() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    while running.join_next().await.is_some() {}
}

/// Probes one shop, records the result, schedules the next probe.
pub async fn run_probe(daemon: &Daemon, job: &Job) {
    let Some(rec) = daemon.registry.get(&job.shop) else {
        // Removed meanwhile: drop the job.
        let _ = daemon.queue.complete(job, None);
        return;
    };
    // A removal ends the probe in flight: nothing reaches a removed shop
    // once `shop remove` has answered.
    let removed = daemon.syncs.removal(&rec.name);
    let delay = tokio::select! {
        d = probe_now(daemon, &rec) => d,
        () = removed.cancelled() => {
            let _ = daemon.queue.complete(job, None);
            return;
        }
    };
    first_sync_when_healthy(daemon, &rec);
    let next = now_ms() + delay.as_millis() as u64;
    if let Err(e) = daemon.queue.complete(job, Some(next)) {
        tracing::error!(shop = %job.shop, "queue: {e}");
    }
    if let Err(e) = daemon.store.flush().await {
        tracing::error!("flush: {e}");
    }
}

/// A shop that was never synced (added with `--no-verify`, or unreachable
/// when it was added, also across restarts) gets its first sync as soon as
/// a probe finds it healthy, not at its slot of `sync.interval` (a shop
/// that merely answers some requests waits: a first sync that fails
/// would only be retried).
fn first_sync_when_healthy(daemon: &Daemon, rec: &crate::shop::ShopRecord) {
    if daemon.health.get(&rec.name).state != crate::health::ShopState::Healthy
        || !crate::sync::never_synced(&daemon.sync_env(), rec)
    {
        return;
    }
    match daemon.queue.advance(&rec.name, JobKind::Sync, now_ms()) {
        Ok(true) => {
            tracing::info!(shop = %rec.name, "the shop answers and was never synced: its first sync starts now")
        }
        Ok(false) => {}
        Err(e) => tracing::error!(shop = %rec.name, "queue: {e}"),
    }
}

/// Probes a shop now and records the outcome (used by the scheduler,
/// `shop test`, `shop add` and `shop rotate`). Returns the delay until the
/// next probe.
pub async fn probe_now(daemon: &Daemon, rec: &crate::shop::ShopRecord) -> Duration {
    let cfg = daemon.config();
    let outcome = probe_once(daemon, rec).await;
    record_outcome(daemon, rec, &outcome, &cfg.probe)
}

/// Runs a probe without recording it.
pub async fn probe_once(daemon: &Daemon, rec: &crate::shop::ShopRecord) -> crate::probe::Outcome {
    let client = daemon
        .registry
        .client(rec, &client_options(&daemon.config()))?;
    probe_with(daemon, &client, rec).await
}

/// Probes with a given client (the shared one, or a fresh one for a
/// candidate record), timing it for the metrics.
pub async fn probe_with(
    daemon: &Daemon,
    client: &crate::registry::ShopClient,
    rec: &crate::shop::ShopRecord,
) -> crate::probe::Outcome {
    let started = Instant::now();
    let result = client.probe(rec, daemon.config().probe.timeout).await;
    let latency = started.elapsed();
    daemon
        .metrics
        .observe_probe(&rec.name, latency, result.is_ok());
    result.map(|info| (info, latency))
}

/// Stores a probe outcome in the health book; returns the next delay.
pub fn record_outcome(
    daemon: &Daemon,
    rec: &crate::shop::ShopRecord,
    outcome: &crate::probe::Outcome,
    cfg: &crate::config::ProbeConfig,
) -> Duration {
    let prev = daemon.health.get(&rec.name);
    let (next, delay) = crate::probe::next_record(&prev, rec, outcome, cfg, chrono::Utc::now());
    crate::probe::log_transition(&rec.name, &prev, &next);
    if let Err(e) = daemon.health.put(&rec.name, &next) {
        tracing::error!(shop = %rec.name, "health: {e}");
    }
    daemon.changed.notify_one();
    delay
}
