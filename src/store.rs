//! The one owner of sled. Opens the database in `daemon.state_dir` behind an
//! exclusive lock file, names the trees, checks the schema version, bounds
//! the cache, and is the only place that flushes.
//!
//! sled 0.34 flushes on its own every 500 ms unless told not to, and its
//! `flush_async` is not cancellation-safe; both are contained here: the
//! background flusher is off, and every durability point goes through
//! [`Store::flush`], which hands the request to a single flusher task that
//! batches concurrent requests into one `Db::flush` on a blocking thread
//! (group commit).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// The layout this build writes. Bump with a migration in [`Store::open`].
/// 2: mirrors split into a SKU index and a data tree
/// ([`crate::mirror::migrate_layout1`] upgrades schema 1).
pub const SCHEMA_VERSION: u32 = 2;
use crate::layout::{self, SCHEMA_KEY};
/// Pending flush requests; more wait for room (callers are async).
const FLUSH_QUEUE: usize = 1024;

/// Keys deleted per sled batch when a removal empties a tree.
const PURGE_BATCH: usize = 1000;
/// Batches between flushes when a removal empties a tree: bounds the
/// unflushed deletions held in memory.
const PURGE_BATCHES_PER_FLUSH: usize = 20;

/// A flush request: the flusher answers on the sender.
type FlushRequest = oneshot::Sender<Result<(), String>>;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state directory {dir} is in use by another cobbyd (pid {pid}); stop it, or give this one another daemon.state_dir"
    )]
    Locked { dir: PathBuf, pid: String },
    #[error(
        "state directory {dir} was written by a newer cobbyd (schema {found}, this build knows {supported}); upgrade cobbyd or use another daemon.state_dir"
    )]
    NewerSchema {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state directory {dir}: permission denied for this user: set daemon.state_dir in a config file of your own (cobbyd run --config FILE) to a directory you may write, or run cobbyd as root or as the user that owns {dir}"
    )]
    Denied { dir: PathBuf },
    #[error("state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("database: {0}")]
    Corrupt(String),
    #[error("the store's flusher has stopped (the daemon is shutting down)")]
    FlusherGone,
    #[error("{} ({})", .0.message, .0.hint)]
    Unwritable(StorageProblem),
}

impl StoreError {
    /// The storage trouble behind this error (disk full, read-only, I/O),
    /// if that is what it is.
    pub fn storage_problem(&self, dir: &Path) -> Option<StorageProblem> {
        match self {
            StoreError::Io { source, .. } => StorageProblem::from_io(dir, source),
            StoreError::Sled(e) => StorageProblem::from_sled(dir, e),
            StoreError::Unwritable(p) => Some(p.clone()),
            _ => None,
        }
    }
}

/// The state directory cannot be written: `storage` in status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StorageProblem {
    /// `disk_full`, `read_only` or `io`.
    pub kind: &'static str,
    pub message: String,
    pub hint: String,
    /// When it was first seen (RFC 3339).
    pub since: String,
    pub state_dir: String,
}

impl StorageProblem {
    /// Classifies an I/O error of the state directory; `None` when it is
    /// not about the disk (a lock held elsewhere, say).
    pub fn from_io(dir: &Path, e: &std::io::Error) -> Option<StorageProblem> {
        use std::io::ErrorKind as K;
        let text = e.to_string();
        let kind = match (e.kind(), e.raw_os_error()) {
            (K::StorageFull | K::QuotaExceeded, _)
            | (_, Some(libc_enospc::ENOSPC | libc_enospc::EDQUOT)) => "disk_full",
            (K::ReadOnlyFilesystem, _) | (_, Some(libc_enospc::EROFS)) => "read_only",
            _ if text.contains("No space left") || text.contains("Disk quota") => "disk_full",
            _ if text.contains("Read-only file system") => "read_only",
            (K::PermissionDenied | K::WouldBlock | K::AlreadyExists | K::NotFound, _) => {
                return None;
            }
            _ if text.contains("could not acquire lock") => return None,
            _ => "io",
        };
        let d = dir.display();
        let (message, hint) = match kind {
            "disk_full" => (
                format!(
                    "cannot write to the state directory {d}: no space left on its file system"
                ),
                format!(
                    "free space on the file system holding {d} (or grow it); cobbyd notices within seconds, reopens its database and resumes syncing"
                ),
            ),
            "read_only" => (
                format!("cannot write to the state directory {d}: its file system is read-only"),
                format!(
                    "remount the file system holding {d} read-write (`mount -o remount,rw MOUNTPOINT`; check `journalctl -k` for the disk errors that made the kernel remount it); cobbyd resumes by itself"
                ),
            ),
            _ => (
                format!("cannot write to the state directory {d}: {text}"),
                format!(
                    "check the disk holding {d} and the kernel log (`journalctl -k`); cobbyd resumes once it can write again"
                ),
            ),
        };
        Some(StorageProblem {
            kind,
            message,
            hint,
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            state_dir: dir.display().to_string(),
        })
    }

    /// Classifies a sled error (sled reports I/O failures as `Io`).
    pub fn from_sled(dir: &Path, e: &sled::Error) -> Option<StorageProblem> {
        match e {
            sled::Error::Io(io) => StorageProblem::from_io(dir, io),
            _ => None,
        }
    }
}

/// errno values (Linux) for errors sled re-wraps without their code.
mod libc_enospc {
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EDQUOT: i32 = 122;
}

/// Whether `dir` takes writes again: enough free space for sled to roll a
/// segment, and a test file written and synced. Blocking.
pub fn check_writable(dir: &Path) -> Result<(), std::io::Error> {
    const NEED: u64 = 4 * 1024 * 1024;
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(std::io::Error::from_raw_os_error(libc_enospc::EROFS));
    }
    // The widths of these libc types differ between platforms.
    #[allow(clippy::useless_conversion)]
    let avail = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    if avail < NEED {
        return Err(std::io::Error::from_raw_os_error(libc_enospc::ENOSPC));
    }
    let probe = dir.join(".cobbyd-write-check");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)?;
        f.write_all(&vec![0u8; 1024 * 1024])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result
}

/// The database and its named trees. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    shops: sled::Tree,
    queue: sled::Tree,
    health: sled::Tree,
    cursor: sled::Tree,
    runs: sled::Tree,
    meta: sled::Tree,
    flush_tx: mpsc::Sender<FlushRequest>,
    flush_rx: std::sync::Mutex<Option<mpsc::Receiver<FlushRequest>>>,
    /// Set at the first write failure of the disk; sled latches such an
    /// error, so the database stays unwritable until it is reopened.
    problem: Arc<watch::Sender<Option<StorageProblem>>>,
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`. Fails at once,
    /// naming the directory, when another process holds it.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Store, StoreError> {
        Self::open_with(dir, cache_mb, true)
    }

    /// Opens an existing state directory as it is, for `cobbyd
    /// check-state`: the same lock (so never while a daemon runs), but no
    /// directory created, no schema written, no migration.
    pub fn open_existing(dir: &Path, cache_mb: u64) -> Result<Store, StoreError> {
        if !dir.join("db").is_dir() {
            return Err(StoreError::Io {
                dir: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no cobbyd database here (is daemon.state_dir right?)",
                ),
            });
        }
        Self::open_with(dir, cache_mb, false)
    }

    fn open_with(dir: &Path, cache_mb: u64, upgrade: bool) -> Result<Store, StoreError> {
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                StoreError::Denied {
                    dir: dir.to_path_buf(),
                }
            } else {
                StoreError::Io {
                    dir: dir.to_path_buf(),
                    source,
                }
            }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let lock_path = dir.join("cobbyd.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        let mut lock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let pid = crate::bounded::read_text(&lock_path, 64)
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default();
                    return Err(StoreError::Locked {
                        dir: dir.to_path_buf(),
                        pid: if pid.is_empty() {
                            "unknown".into()
                        } else {
                            pid
                        },
                    });
                }
                Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
            };
        lock.set_len(0).map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        let db_path = dir.join("db");
        let db = sled::Config::new()
            .path(&db_path)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            .flush_every_ms(None)
            .open()?;
        // sled creates its files with the process umask; the state holds
        // credentials, so make the directory private whatever the umask.
        let _ = std::fs::set_permissions(&db_path, std::fs::Permissions::from_mode(0o700));
        let meta = db.open_tree(layout::META)?;
        let found = match meta.get(SCHEMA_KEY)? {
            None => None,
            Some(v) => Some(
                <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| {
                        StoreError::Corrupt("meta.schema_version is not 4 bytes".into())
                    })?,
            ),
        };
        if let Some(found) = found
            && found > SCHEMA_VERSION
        {
            return Err(StoreError::NewerSchema {
                dir: dir.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let (flush_tx, flush_rx) = mpsc::channel(FLUSH_QUEUE);
        let store = Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                shops: db.open_tree(layout::SHOPS)?,
                queue: db.open_tree(layout::QUEUE)?,
                health: db.open_tree(layout::HEALTH)?,
                cursor: db.open_tree("cursor")?,
                runs: db.open_tree(layout::RUNS)?,
                meta,
                db,
                flush_tx,
                flush_rx: std::sync::Mutex::new(Some(flush_rx)),
                problem: Arc::new(watch::channel(None).0),
                _lock: lock,
            }),
        };
        match found {
            _ if !upgrade => {}
            Some(SCHEMA_VERSION) => {}
            None => {
                store
                    .meta()
                    .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(old) => {
                // Schema 1 → 2: the mirrors' layout. The version is written
                // only once every mirror is migrated (and, sled recovering
                // writes in order, durable only if they are).
                tracing::info!(
                    from = old,
                    to = SCHEMA_VERSION,
                    "migrating the state directory"
                );
                let n = crate::mirror::migrate_layout1(&store)?;
                store
                    .meta()
                    .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                store.flush_blocking()?;
                tracing::info!(products = n, "state directory migrated");
            }
        }
        Ok(store)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The schema version recorded in `meta` (`None`: none recorded).
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        match self.inner.meta.get(SCHEMA_KEY)? {
            None => Ok(None),
            Some(v) => <[u8; 4]>::try_from(v.as_ref())
                .map(|b| Some(u32::from_be_bytes(b)))
                .map_err(|_| StoreError::Corrupt("meta.schema_version is not 4 bytes".into())),
        }
    }

    /// The names of every tree of the database (sled's default tree
    /// included), for `cobbyd check-state`.
    pub fn tree_names(&self) -> Vec<String> {
        self.inner
            .db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    /// Opens a tree by name without creating it: `None` if it does not
    /// exist (for `cobbyd check-state`, which must not add trees).
    pub fn existing_tree(&self, name: &str) -> Result<Option<sled::Tree>, StoreError> {
        if self
            .inner
            .db
            .tree_names()
            .iter()
            .any(|n| n == name.as_bytes())
        {
            Ok(Some(self.inner.db.open_tree(name)?))
        } else {
            Ok(None)
        }
    }

    /// Shops whose removal was recorded (one transaction with the record)
    /// but whose trees may not all be dropped yet: (name, purge).
    pub fn pending_removals(&self) -> Result<Vec<(String, bool)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inner.meta.scan_prefix(layout::REMOVING_PREFIX) {
            let (k, v) = kv?;
            out.extend(layout::decode_removing(&k, &v));
        }
        Ok(out)
    }

    /// The trees a removal drops: the scratch trees and, with `purge`, the
    /// mirror trees of the shop.
    fn removal_trees(&self, shop: &str, purge: bool) -> Vec<sled::IVec> {
        let mut prefixes = vec![
            format!("scratch:seen:{shop}:"),
            format!("scratch:refetch:{shop}:"),
        ];
        if purge {
            prefixes.push(format!("products:{shop}:"));
            prefixes.push(format!("docs:{shop}:"));
        }
        self.inner
            .db
            .tree_names()
            .into_iter()
            .filter(|name| prefixes.iter().any(|p| name.starts_with(p.as_bytes())))
            .collect()
    }

    /// Deletes up to `PURGE_BATCH` × `batches` keys of a tree, in batches,
    /// starting after `after`. Returns the last key deleted (`None`: the
    /// tree is empty from `after` on).
    fn purge_some(
        &self,
        name: &[u8],
        after: Option<sled::IVec>,
        batches: usize,
    ) -> Result<Option<sled::IVec>, StoreError> {
        let tree = self.inner.db.open_tree(name)?;
        let mut after = after;
        for _ in 0..batches {
            let range = match &after {
                None => tree.range::<&[u8], _>(..),
                Some(k) => tree.range::<&[u8], _>((
                    std::ops::Bound::Excluded(k.as_ref()),
                    std::ops::Bound::Unbounded,
                )),
            };
            let mut batch = sled::Batch::default();
            let mut last = None;
            for k in range.keys().take(PURGE_BATCH) {
                let k = k?;
                batch.remove(k.clone());
                last = Some(k);
            }
            let Some(k) = last else {
                return Ok(after);
            };
            tree.apply_batch(batch)?;
            after = Some(k);
        }
        Ok(after)
    }

    /// Finishes the removal of a shop: empties its scratch trees and, with
    /// `purge`, its mirror trees, in bounded batches with a flush after
    /// every `PURGE_BATCHES_PER_FLUSH` of them, drops the emptied trees,
    /// then clears the removal marker. `Db::drop_tree` of a big tree held it
    /// all in memory at once (a 1.29 M-product mirror took the daemon from
    /// 373 MB to 1.43 GB), and deletions nobody flushes stay in memory too
    /// (sled's own flusher is off). Idempotent and crash-safe: the marker
    /// stays until the end, and the next start finishes what a crash
    /// interrupted ([`Store::finish_removals`]). Runs after the removal
    /// transaction, and at start-up.
    pub async fn finish_removal(&self, shop: &str, purge: bool) -> Result<(), StoreError> {
        for name in self.removal_trees(shop, purge) {
            let mut after = None;
            loop {
                let store = self.clone();
                let n = name.clone();
                let from = after.clone();
                let last = tokio::task::spawn_blocking(move || {
                    store.purge_some(&n, from, PURGE_BATCHES_PER_FLUSH)
                })
                .await
                .map_err(|e| StoreError::Corrupt(format!("purge task: {e}")))??;
                self.flush().await?;
                if last == after {
                    break;
                }
                after = last;
            }
            self.inner.db.drop_tree(&name)?;
        }
        self.inner.meta.remove(layout::removing_key(shop))?;
        Ok(())
    }

    /// [`Store::finish_removal`] without the flusher, for tests and the
    /// fuzzing entry points (small stores; nothing is flushed).
    pub fn finish_removal_blocking(&self, shop: &str, purge: bool) -> Result<(), StoreError> {
        for name in self.removal_trees(shop, purge) {
            let mut after = None;
            loop {
                let last = self.purge_some(&name, after.clone(), PURGE_BATCHES_PER_FLUSH)?;
                if last == after {
                    break;
                }
                after = last;
            }
            self.inner.db.drop_tree(&name)?;
        }
        self.inner.meta.remove(layout::removing_key(shop))?;
        Ok(())
    }

    /// Finishes every removal a crash interrupted (at start-up, before any
    /// shop can be added again). Returns the shops concerned.
    pub async fn finish_removals(&self) -> Result<Vec<String>, StoreError> {
        let pending = self.pending_removals()?;
        for (shop, purge) in &pending {
            self.finish_removal(shop, *purge).await?;
        }
        Ok(pending.into_iter().map(|(s, _)| s).collect())
    }

    /// The control trees, for the transactions of [`crate::layout`].
    pub fn control_trees(&self) -> layout::ControlTrees<'_> {
        let i = &self.inner;
        layout::ControlTrees {
            shops: &i.shops,
            queue: &i.queue,
            health: &i.health,
            runs: &i.runs,
            cursor: &i.cursor,
            meta: &i.meta,
        }
    }

    /// name → shop record.
    pub fn shops(&self) -> &sled::Tree {
        &self.inner.shops
    }

    /// (due, seq) → job.
    pub fn queue(&self) -> &sled::Tree {
        &self.inner.queue
    }

    /// name → last probe result.
    pub fn health(&self) -> &sled::Tree {
        &self.inner.health
    }

    /// shop/store → sync checkpoint.
    pub fn cursor(&self) -> &sled::Tree {
        &self.inner.cursor
    }

    /// shop/run → sync run record.
    pub fn runs(&self) -> &sled::Tree {
        &self.inner.runs
    }

    /// Schema version and other small facts.
    pub fn meta(&self) -> &sled::Tree {
        &self.inner.meta
    }

    /// The two trees of one store view's mirror: the SKU index
    /// (`products:{shop}:{store}`) and the data (`docs:{shop}:{store}`).
    /// Their layout is [`crate::mirror`]'s.
    pub fn mirror_trees(
        &self,
        shop: &str,
        store_code: &str,
    ) -> Result<(sled::Tree, sled::Tree), StoreError> {
        Ok((
            self.inner
                .db
                .open_tree(products_tree_name(shop, store_code))?,
            self.inner.db.open_tree(docs_tree_name(shop, store_code))?,
        ))
    }

    /// (shop, store code) of every mirror (from the index trees' names).
    pub fn mirror_views(&self) -> Vec<(String, String)> {
        self.inner
            .db
            .tree_names()
            .iter()
            .filter_map(|n| {
                let rest = n.strip_prefix(b"products:")?;
                let rest = std::str::from_utf8(rest).ok()?;
                let (shop, code) = rest.split_once(':')?;
                Some((shop.to_string(), code.to_string()))
            })
            .collect()
    }

    /// A scratch tree (e.g. the SKUs seen by a full reconcile), dropped by
    /// [`Store::drop_tree`] when done.
    pub fn scratch(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.inner.db.open_tree(format!("scratch:{name}"))?)
    }

    /// Drops a scratch tree.
    pub fn drop_scratch(&self, name: &str) -> Result<(), StoreError> {
        self.inner.db.drop_tree(format!("scratch:{name}"))?;
        Ok(())
    }

    /// Drops every mirror tree of a shop, index and data
    /// (`shop remove --purge`).
    pub fn drop_products(&self, shop: &str) -> Result<(), StoreError> {
        let prefixes = [format!("products:{shop}:"), format!("docs:{shop}:")];
        for name in self.inner.db.tree_names() {
            if prefixes.iter().any(|p| name.starts_with(p.as_bytes())) {
                self.inner.db.drop_tree(&name)?;
            }
        }
        Ok(())
    }

    /// The next run id: 1, 2, 3, ... (`meta.run_seq`). sled's own
    /// `generate_id` reserves a million ids per restart, which makes ids in
    /// status jump after every crash. An increment lost in a crash is only
    /// reused if nothing that recorded it reached the disk either (sled
    /// recovers writes in order).
    pub fn next_run_id(&self) -> Result<u64, StoreError> {
        self.next_seq(layout::RUN_SEQ)
    }

    /// The next sync request id (`meta.request_seq`), like
    /// [`Store::next_run_id`]: never reused, so a client's id cannot name
    /// someone else's request after a restart.
    pub fn next_request_id(&self) -> Result<u64, StoreError> {
        self.next_seq(layout::REQUEST_SEQ)
    }

    fn next_seq(&self, key: &[u8]) -> Result<u64, StoreError> {
        let next = self.inner.meta.update_and_fetch(key, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some(n.saturating_add(1).to_be_bytes().to_vec())
        })?;
        next.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "meta.{} is not 8 bytes",
                    String::from_utf8_lossy(key)
                ))
            })
    }

    /// The disk trouble that stopped writes, if any.
    pub fn problem(&self) -> Option<StorageProblem> {
        self.inner.problem.borrow().clone()
    }

    /// Wakes when a disk problem is recorded.
    pub fn subscribe_problem(&self) -> watch::Receiver<Option<StorageProblem>> {
        self.inner.problem.subscribe()
    }

    /// Records `e` as the store's disk problem if it is one (the first one
    /// stays). Returns whether a problem is now recorded.
    pub fn note(&self, e: &StoreError) -> bool {
        if let Some(p) = e.storage_problem(&self.inner.dir) {
            record_problem(&self.inner.problem, p);
        }
        self.inner.problem.borrow().is_some()
    }

    /// Makes every write so far durable. Concurrent callers share one
    /// `fsync`. Needs [`Store::spawn_flusher`] to have run. Once the disk
    /// failed, fails at once with [`StoreError::Unwritable`].
    pub async fn flush(&self) -> Result<(), StoreError> {
        if let Some(p) = self.problem() {
            return Err(StoreError::Unwritable(p));
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .flush_tx
            .send(tx)
            .await
            .map_err(|_| StoreError::FlusherGone)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match self.problem() {
                Some(p) => StoreError::Unwritable(p),
                None => StoreError::Corrupt(format!("flush failed: {e}")),
            }),
            Err(_) => Err(StoreError::FlusherGone),
        }
    }

    /// Starts the single flusher task. Call once, inside the runtime.
    pub fn spawn_flusher(&self) -> tokio::task::JoinHandle<()> {
        let rx = self
            .inner
            .flush_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let db = self.inner.db.clone();
        let problem = self.inner.problem.clone();
        let dir = self.inner.dir.clone();
        tokio::spawn(async move {
            let Some(mut rx) = rx else {
                tracing::error!("store flusher started twice; the second is a no-op");
                return;
            };
            let mut waiting = Vec::new();
            while let Some(first) = rx.recv().await {
                waiting.push(first);
                while let Ok(more) = rx.try_recv() {
                    waiting.push(more);
                }
                let db = db.clone();
                let result = match tokio::task::spawn_blocking(move || db.flush()).await {
                    Err(e) => Err(e.to_string()),
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => {
                        if let Some(p) = StorageProblem::from_sled(&dir, &e) {
                            record_problem(&problem, p);
                        }
                        Err(e.to_string())
                    }
                };
                for w in waiting.drain(..) {
                    let _ = w.send(result.clone());
                }
            }
        })
    }

    /// The last flush at shutdown, after every writer has stopped.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        Ok(())
    }
}

/// Records the first disk problem and logs it once.
fn record_problem(slot: &watch::Sender<Option<StorageProblem>>, p: StorageProblem) {
    slot.send_if_modified(|cur| {
        if cur.is_some() {
            return false;
        }
        tracing::error!(
            kind = p.kind,
            state_dir = %p.state_dir,
            "{}; writes stop until it is fixed: {}",
            p.message,
            p.hint
        );
        *cur = Some(p);
        true
    });
}

/// `products:{shop}:{store}` (the SKU index); names and codes cannot
/// contain ':'.
pub fn products_tree_name(shop: &str, store_code: &str) -> String {
    format!("products:{shop}:{store_code}")
}

/// `docs:{shop}:{store}` (the product JSON).
pub fn docs_tree_name(shop: &str, store_code: &str) -> String {
    format!("docs:{shop}:{store_code}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_fails_naming_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path(), 4).unwrap();
        let err = Store::open(dir.path(), 4).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 4).unwrap();
            s.meta()
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            s.flush_blocking().unwrap();
        }
        let err = Store::open(dir.path(), 4).err().unwrap();
        assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
    }

    #[test]
    fn drop_products_drops_index_and_data_of_that_shop_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 4).unwrap();
        for (shop, code) in [("a", "default"), ("a", "fr"), ("ab", "default")] {
            let (index, docs) = s.mirror_trees(shop, code).unwrap();
            index.insert("sku", "entry").unwrap();
            docs.insert(1u64.to_be_bytes(), "{}").unwrap();
        }
        let mut views = s.mirror_views();
        views.sort();
        assert_eq!(
            views,
            [("a", "default"), ("a", "fr"), ("ab", "default")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        s.drop_products("a").unwrap();
        let names: Vec<String> = s
            .inner
            .db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| n.contains(':'))
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["docs:ab:default", "products:ab:default"]);
    }

    #[tokio::test]
    async fn flush_is_shared_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 4).unwrap();
        let flusher = s.spawn_flusher();
        s.shops().insert("a", "1").unwrap();
        let (a, b) = tokio::join!(s.flush(), s.flush());
        a.unwrap();
        b.unwrap();
        // The flusher ends when the last handle is gone, releasing sled.
        drop(s);
        flusher.await.unwrap();
        let s = Store::open(dir.path(), 4).unwrap();
        assert_eq!(s.shops().get("a").unwrap().unwrap().as_ref(), b"1");
    }
}
