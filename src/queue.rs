//! The durable work queue (`queue` tree): jobs with a due time, leased while
//! running. A lease left by a crash is requeued at start-up.
//!
//! Keys: `p` + due (ms since epoch, BE) + seq (BE) for pending jobs, so a
//! range scan yields them in due order; `l` + seq for leased ones. Moving a
//! job between the two is one atomic sled batch. At most one pending job per
//! (shop, kind) exists: scheduling again moves it instead of adding one.

pub use crate::layout::Slot;
use crate::layout::{self, PENDING_RANGE, lease_key, pending_key};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Liveness probe.
    Probe,
    /// Incremental sync.
    Sync,
    /// Full reconcile.
    FullSync,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Probe => "probe",
            JobKind::Sync => "sync",
            JobKind::FullSync => "full_sync",
        }
    }
}

/// A unit of work for one shop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub seq: u64,
    pub shop: String,
    pub kind: JobKind,
    /// Milliseconds since the Unix epoch.
    pub due_ms: u64,
}

impl Job {
    fn pending_key(&self) -> [u8; 17] {
        pending_key(self.due_ms, self.seq)
    }
}

/// One raw entry of the `queue` tree, decoded as far as it goes (for
/// `cobbyd check-state`).
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub key: Vec<u8>,
    /// `None`: a key of no known shape.
    pub slot: Option<Slot>,
    /// The job, or why the value does not parse.
    pub job: Result<Job, String>,
}

/// Every entry of the `queue` tree, in key order, without interpreting
/// them (the checker does).
pub fn raw_entries(store: &Store) -> Result<Vec<RawEntry>, StoreError> {
    let mut out = Vec::new();
    for item in store.queue().iter() {
        let (k, v) = item?;
        let slot = Slot::decode(&k);
        out.push(RawEntry {
            key: k.to_vec(),
            slot,
            job: serde_json::from_slice(&v).map_err(|e| e.to_string()),
        });
    }
    Ok(out)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    to_ms(SystemTime::now())
}

pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The queue over the `queue` tree.
pub struct Queue {
    store: Store,
    seq: AtomicU64,
    /// (shop, kind) → pending job; mirrors the tree, rebuilt at open.
    index: Mutex<HashMap<(String, JobKind), Job>>,
    wake: tokio::sync::Notify,
}

impl Queue {
    /// Loads the index and requeues leases left by a crash (due now).
    /// Returns the queue and how many leases were recovered.
    pub fn open(store: Store) -> Result<(Queue, usize), StoreError> {
        let tree = store.queue();
        let mut max_seq = 0;
        let mut leased = Vec::new();
        let mut index = HashMap::new();
        let mut stale = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let job: Job = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("queue entry: {e}")))?;
            max_seq = max_seq.max(job.seq);
            match k.first() {
                Some(b'l') => leased.push(job),
                Some(b'p') => {
                    // Two pending jobs of one (shop, kind) cannot exist by
                    // construction, but keep the earlier if they do.
                    let key = (job.shop.clone(), job.kind);
                    if let Some(prev) = index.get(&key) {
                        let prev: &Job = prev;
                        if prev.due_ms <= job.due_ms {
                            stale.push(job.pending_key().to_vec());
                            continue;
                        }
                        stale.push(prev.pending_key().to_vec());
                    }
                    index.insert(key, job);
                }
                _ => stale.push(k.to_vec()),
            }
        }
        for k in stale {
            tree.remove(k)?;
        }
        let q = Queue {
            store,
            seq: AtomicU64::new(max_seq + 1),
            index: Mutex::new(index),
            wake: tokio::sync::Notify::new(),
        };
        let recovered = leased.len();
        for job in leased {
            let mut batch = sled::Batch::default();
            batch.remove(&lease_key(job.seq));
            q.store.queue().apply_batch(batch)?;
            q.schedule(&job.shop, job.kind, now_ms())?;
        }
        Ok((q, recovered))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<(String, JobKind), Job>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A job with the next sequence number, and its stored form.
    fn new_job(
        &self,
        shop: &str,
        kind: JobKind,
        due_ms: u64,
    ) -> Result<(Job, Vec<u8>), StoreError> {
        let job = Job {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            shop: shop.to_string(),
            kind,
            due_ms,
        };
        let value = serde_json::to_vec(&job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((job, value))
    }

    /// Makes sure a (shop, kind) job is pending at `due_ms`. An existing
    /// pending job is moved to the earlier of the two times when
    /// `earlier_only`, or to `due_ms` otherwise.
    pub fn schedule_at(
        &self,
        shop: &str,
        kind: JobKind,
        due_ms: u64,
        earlier_only: bool,
    ) -> Result<Job, StoreError> {
        let mut index = self.index();
        let key = (shop.to_string(), kind);
        let mut batch = sled::Batch::default();
        if let Some(existing) = index.get(&key) {
            if earlier_only && existing.due_ms <= due_ms {
                return Ok(existing.clone());
            }
            batch.remove(&existing.pending_key());
        }
        let (job, value) = self.new_job(shop, kind, due_ms)?;
        batch.insert(&job.pending_key(), value);
        self.store.queue().apply_batch(batch)?;
        index.insert(key, job.clone());
        drop(index);
        self.wake.notify_one();
        Ok(job)
    }

    /// Moves the pending (shop, kind) job to `due_ms` if it is due later.
    /// Never creates a job: a shop being removed (its jobs gone, under the
    /// same lock) gets none back. Returns whether it moved.
    pub fn advance(&self, shop: &str, kind: JobKind, due_ms: u64) -> Result<bool, StoreError> {
        let mut index = self.index();
        let key = (shop.to_string(), kind);
        let Some(existing) = index.get(&key) else {
            return Ok(false);
        };
        if existing.due_ms <= due_ms {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        batch.remove(&existing.pending_key());
        let (job, value) = self.new_job(shop, kind, due_ms)?;
        batch.insert(&job.pending_key(), value);
        self.store.queue().apply_batch(batch)?;
        index.insert(key, job);
        drop(index);
        self.wake.notify_one();
        Ok(true)
    }

    /// [`Queue::schedule_at`], replacing any pending time.
    pub fn schedule(&self, shop: &str, kind: JobKind, due_ms: u64) -> Result<Job, StoreError> {
        self.schedule_at(shop, kind, due_ms, false)
    }

    /// Leases the earliest job that is due, if any.
    pub fn lease_due(&self, now_ms: u64) -> Result<Option<Job>, StoreError> {
        let mut index = self.index();
        let Some(first) = self.store.queue().range(PENDING_RANGE).next() else {
            return Ok(None);
        };
        let (k, v) = first?;
        let job: Job = serde_json::from_slice(&v)
            .map_err(|e| StoreError::Corrupt(format!("queue entry: {e}")))?;
        if job.due_ms > now_ms {
            return Ok(None);
        }
        let mut batch = sled::Batch::default();
        batch.remove(k);
        batch.insert(&lease_key(job.seq), v);
        self.store.queue().apply_batch(batch)?;
        index.remove(&(job.shop.clone(), job.kind));
        Ok(Some(job))
    }

    /// Finishes a leased job and, atomically with that, schedules the next
    /// occurrence of its kind. `None`: the shop is gone (or going): the
    /// lease is dropped, unless the shop's record is still stored: then a
    /// removal is in progress and deletes the lease with the record, in one
    /// transaction (a crash before it requeues the job, so a shop that
    /// stays registered keeps every job).
    pub fn complete(&self, job: &Job, next_due_ms: Option<u64>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(&lease_key(job.seq));
        let mut index = self.index();
        let shop_known = self.store.shops().contains_key(job.shop.as_bytes())?;
        if next_due_ms.is_none() && shop_known {
            return Ok(());
        }
        let key = (job.shop.clone(), job.kind);
        let mut next_job = None;
        if let (Some(due), true) = (next_due_ms, shop_known) {
            // An on-demand job scheduled while this one ran is kept if earlier.
            match index.get(&key) {
                Some(existing) if existing.due_ms <= due => {}
                existing => {
                    if let Some(e) = existing {
                        batch.remove(&e.pending_key());
                    }
                    let (next, value) = self.new_job(&job.shop, job.kind, due)?;
                    batch.insert(&next.pending_key(), value);
                    next_job = Some(next);
                }
            }
        }
        self.store.queue().apply_batch(batch)?;
        if let Some(next) = next_job {
            index.insert(key, next);
        }
        drop(index);
        self.wake.notify_one();
        Ok(())
    }

    /// Registers a shop: its record (`shops` tree, `record` as the registry
    /// encodes it) and its first jobs, in one transaction, so that a
    /// registered shop always has its jobs and no job outlives its shop.
    pub fn register(
        &self,
        shop: &str,
        record: &[u8],
        jobs: &[(JobKind, u64)],
    ) -> Result<(), StoreError> {
        let mut index = self.index();
        let mut removes = Vec::new();
        let mut new = Vec::new();
        for &(kind, due_ms) in jobs {
            if let Some(existing) = index.get(&(shop.to_string(), kind)) {
                removes.push(existing.pending_key());
            }
            new.push(self.new_job(shop, kind, due_ms)?);
        }
        let add: Vec<(Vec<u8>, Vec<u8>)> = new
            .iter()
            .map(|(job, value)| (job.pending_key().to_vec(), value.clone()))
            .collect();
        let removes: Vec<Vec<u8>> = removes.iter().map(|k| k.to_vec()).collect();
        layout::register(&self.store.control_trees(), shop, record, &removes, &add)?;
        for (job, _) in new {
            index.insert((shop.to_string(), job.kind), job);
        }
        drop(index);
        self.wake.notify_one();
        Ok(())
    }

    /// Unregisters a shop in one transaction ([`layout::unregister`]):
    /// its record, every job of it (pending and leased), its health record
    /// and runs and, with `purge`, its checkpoints, plus a marker for what a
    /// transaction cannot do (dropping its scratch and, with `purge`, mirror
    /// trees: [`Store::finish_removal`], also run at start-up after a
    /// crash). So a crash leaves the shop registered with everything, or
    /// gone.
    /// Returns the number of jobs removed.
    pub fn unregister(&self, shop: &str, purge: bool) -> Result<usize, StoreError> {
        let mut index = self.index();
        let mut jobs = Vec::new();
        for item in self.store.queue().iter() {
            let (k, v) = item?;
            if serde_json::from_slice::<Job>(&v).is_ok_and(|j| j.shop == shop) {
                jobs.push(k);
            }
        }
        layout::unregister(&self.store.control_trees(), shop, purge, &jobs)?;
        index.retain(|(s, _), _| s != shop);
        Ok(jobs.len())
    }

    /// Removes every job of a shop (pending and leased). Only the tests
    /// use it: `shop remove` goes through [`Queue::unregister`].
    #[cfg(test)]
    pub fn remove_shop(&self, shop: &str) -> Result<usize, StoreError> {
        let mut index = self.index();
        index.retain(|(s, _), _| s != shop);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.store.queue().iter() {
            let (k, v) = item?;
            if let Ok(job) = serde_json::from_slice::<Job>(&v)
                && job.shop == shop
            {
                batch.remove(k);
                n += 1;
            }
        }
        self.store.queue().apply_batch(batch)?;
        Ok(n)
    }

    /// When the earliest pending job is due.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.index().values().map(|j| j.due_ms).min()
    }

    /// The pending job of a (shop, kind).
    pub fn pending(&self, shop: &str, kind: JobKind) -> Option<Job> {
        self.index().get(&(shop.to_string(), kind)).cloned()
    }

    /// Jobs in the tree (pending and leased).
    pub fn depth(&self) -> usize {
        self.store.queue().len()
    }

    /// Resolves when a job was scheduled or completed, or after `max`.
    pub async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 4).unwrap();
        s.shops().insert("a", "{}").unwrap();
        (dir, s)
    }

    #[test]
    fn due_order_dedupe_and_lease_recovery() {
        let (_d, s) = store();
        let (q, _) = Queue::open(s.clone()).unwrap();
        q.schedule("a", JobKind::Probe, 2000).unwrap();
        q.schedule("a", JobKind::Sync, 1000).unwrap();
        q.schedule("a", JobKind::Probe, 3000).unwrap();
        assert_eq!(q.depth(), 2, "rescheduling moves, never duplicates");
        q.schedule_at("a", JobKind::Probe, 5000, true).unwrap();
        assert_eq!(q.pending("a", JobKind::Probe).unwrap().due_ms, 3000);
        assert!(
            !q.advance("a", JobKind::Probe, 4000).unwrap(),
            "only earlier"
        );
        assert!(q.advance("a", JobKind::Probe, 2500).unwrap());
        assert_eq!(q.pending("a", JobKind::Probe).unwrap().due_ms, 2500);
        assert!(
            !q.advance("a", JobKind::FullSync, 0).unwrap(),
            "never creates"
        );
        assert!(q.pending("a", JobKind::FullSync).is_none());
        assert!(q.lease_due(500).unwrap().is_none());
        let j = q.lease_due(10_000).unwrap().unwrap();
        assert_eq!(j.kind, JobKind::Sync);
        drop(q);
        // The lease of `j` was never completed: a crash. Reopen recovers it.
        let (q, recovered) = Queue::open(s.clone()).unwrap();
        assert_eq!(recovered, 1);
        assert!(q.pending("a", JobKind::Sync).is_some());
        assert_eq!(q.depth(), 2);
        let j = q.lease_due(u64::MAX).unwrap().unwrap();
        q.complete(&j, Some(99_999)).unwrap();
        assert_eq!(q.depth(), 2);
        assert_eq!(q.remove_shop("a").unwrap(), 2);
        assert_eq!(q.depth(), 0);
        assert!(q.next_due_ms().is_none());
    }
}
