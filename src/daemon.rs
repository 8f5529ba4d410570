//! `cobbyd run`: builds the daemon (config → store → queue → registry →
//! scheduler → control server → `READY=1`), then handles signals: SIGHUP
//! reloads, SIGTERM/SIGINT drain and stop, a second SIGTERM exits at once.

use crate::config::{self, Config};
use crate::logging::{self, LogHandle};
use crate::notify;
use crate::probe::HealthBook;
use crate::queue::{JobKind, Queue, now_ms};
use crate::registry::Registry;
use crate::spread::{self, Recurring};
use crate::store::Store;
use crate::sync::SyncManager;
use crate::{scheduler, server};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;
/// Exit status when the state directory cannot be written at start, or the
/// in-place restart failed (sysexits.h EX_TEMPFAIL): systemd's
/// `Restart=on-failure` tries again.
pub const EX_TEMPFAIL: u8 = 75;
/// How often a daemon whose disk failed looks whether it takes writes again.
const STORAGE_RECHECK: Duration = Duration::from_secs(2);

/// How `async_main` ended.
enum Exit {
    Code(u8),
    /// The state directory takes writes again after a failure: replace the
    /// process image (same pid) so that sled starts afresh.
    Reexec,
}

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

/// A stable per-shop number for jitter (FNV-1a).
pub fn shop_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// Runs the daemon until it is told to stop. Returns the process exit code.
pub fn run(config_arg: Option<PathBuf>) -> u8 {
    let loaded = match config::load(config_arg.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cobbyd: {e}");
            return EX_CONFIG;
        }
    };
    let log = logging::init_daemon(&loaded.config.daemon.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cobbyd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return 1;
        }
    };
    let exit = runtime.block_on(async_main(config_arg, loaded, log));
    // Blocking threads (a stuck DNS lookup, say) must not hold up exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match exit {
        Exit::Code(code) => code,
        Exit::Reexec => reexec(),
    }
}

/// Starts this program again in the same process (same pid, so systemd
/// and the harness keep their handle; the new image sends `READY=1`).
/// Every descriptor is close-on-exec, so the locks go with the old image.
/// Falls back to exit 75 for the supervisor to restart it.
fn reexec() -> u8 {
    use std::os::unix::process::CommandExt;
    match std::env::current_exe() {
        Ok(exe) => {
            let err = std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .exec();
            eprintln!(
                "cobbyd: cannot restart in place ({}: {err}); exiting {EX_TEMPFAIL} for the supervisor to restart it",
                exe.display()
            );
        }
        Err(e) => eprintln!(
            "cobbyd: cannot restart in place ({e}); exiting {EX_TEMPFAIL} for the supervisor to restart it"
        ),
    }
    EX_TEMPFAIL
}

/// The exit for a store error at start: 75 with the fix when the disk is
/// the trouble (full, read-only), 1 otherwise.
fn store_failure(what: &str, e: &crate::store::StoreError, dir: &std::path::Path) -> Exit {
    match e.storage_problem(dir) {
        Some(p) => {
            eprintln!("cobbyd: {what}: {}\nhint: {}", p.message, p.hint);
            Exit::Code(EX_TEMPFAIL)
        }
        None => {
            eprintln!("cobbyd: {what}: {e}");
            Exit::Code(1)
        }
    }
}

/// Resolves once the store recorded a disk problem and the state directory
/// takes writes again.
async fn storage_recovered(store: Store) {
    let mut rx = store.subscribe_problem();
    if rx.wait_for(Option::is_some).await.is_err() {
        return std::future::pending().await;
    }
    let dir = store.dir().to_path_buf();
    let mut last = String::new();
    loop {
        tokio::time::sleep(STORAGE_RECHECK).await;
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || crate::store::check_writable(&d)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                let e = e.to_string();
                if e != last {
                    tracing::info!(state_dir = %dir.display(), "state directory still unwritable: {e}");
                    last = e;
                }
            }
            Err(_) => {}
        }
    }
}

async fn async_main(config_arg: Option<PathBuf>, loaded: config::Loaded, log: LogHandle) -> Exit {
    let cfg = Arc::new(loaded.config);
    let state_dir = cfg.daemon.state_dir.clone();
    let cache_mb = cfg.daemon.cache_mb;
    let store = match tokio::task::spawn_blocking(move || Store::open(&state_dir, cache_mb)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return store_failure("cannot open the state", &e, &cfg.daemon.state_dir),
        Err(e) => {
            eprintln!("cobbyd: opening the state panicked: {e}");
            return Exit::Code(1);
        }
    };
    let flusher = store.spawn_flusher();
    match store.finish_removals().await {
        Ok(shops) if !shops.is_empty() => {
            tracing::warn!(shops = ?shops, "finished shop removals interrupted by a crash");
        }
        Ok(_) => {}
        Err(e) => {
            return store_failure(
                "cannot finish an interrupted shop removal",
                &e,
                &cfg.daemon.state_dir,
            );
        }
    }
    let built = Daemon::build(
        cfg.clone(),
        config_arg.clone(),
        loaded.path.clone(),
        store.clone(),
    );
    let daemon = match built {
        Ok(d) => d,
        Err(e) => return store_failure("cannot load the state", &e, &cfg.daemon.state_dir),
    };
    for rec in daemon.registry.list() {
        if rec.grandfathered_http() {
            tracing::warn!(
                shop = %rec.name,
                "uses plain http (registered before --allow-insecure-http was required; still used): credentials cross the network unencrypted: register the shop's https:// URL when it has one"
            );
        } else if rec.insecure_http() {
            tracing::warn!(shop = %rec.name, "{}", crate::shop::INSECURE_HTTP_NOTE);
        }
    }
    for name in daemon.registry.names() {
        if let Err(e) = daemon.ensure_jobs(&name) {
            return store_failure(
                &format!("cannot schedule jobs of {name}"),
                &e,
                &cfg.daemon.state_dir,
            );
        }
    }
    if let Err(e) = daemon.store.flush().await {
        return store_failure("cannot write the state", &e, &cfg.daemon.state_dir);
    }

    let listener = match server::bind(&cfg.daemon.socket, &cfg.daemon.socket_group) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cobbyd: {e}");
            return Exit::Code(1);
        }
    };
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("cobbyd: metrics.listen {addr}: {e}");
                let _ = std::fs::remove_file(&cfg.daemon.socket);
                return Exit::Code(1);
            }
        },
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let server_task = tokio::spawn(server::serve(
        listener,
        daemon.clone(),
        cfg.daemon.max_connections,
        stop_rx.clone(),
    ));
    if let Some(l) = metrics_listener {
        tokio::spawn(server::serve_metrics_tcp(
            l,
            daemon.clone(),
            stop_rx.clone(),
        ));
    }
    let scheduler_task = tokio::spawn(scheduler::run(daemon.clone(), stop_rx.clone()));
    tokio::spawn(status_line_task(daemon.clone(), stop_rx.clone()));
    if let Some(every) = notify::watchdog_interval() {
        tokio::spawn(watchdog_task(every, stop_rx.clone()));
    }

    daemon.set_phase(Phase::Running);
    notify::ready(&daemon.status_line());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %cfg.daemon.socket.display(),
        state_dir = %cfg.daemon.state_dir.display(),
        shops = daemon.registry.len(),
        "cobbyd is ready"
    );

    let mut signals = match signal_channel() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cobbyd: cannot install signal handlers: {e}");
            return Exit::Code(1);
        }
    };
    let recovered = storage_recovered(daemon.store.clone());
    tokio::pin!(recovered);
    let restart = loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Some(signal_hook::consts::SIGHUP) => reload(&daemon, &log),
                Some(sig) => {
                    tracing::info!(signal = sig, "stopping: draining running work");
                    break false;
                }
                None => break false,
            },
            () = &mut recovered => {
                tracing::warn!(
                    state_dir = %cfg.daemon.state_dir.display(),
                    "the state directory takes writes again: restarting in place (same pid) to reopen the database"
                );
                break true;
            }
        }
    };

    if restart {
        // sled latched the write error: only a fresh open clears it. Stop
        // the work (it cannot write anyway) and start again in place; what
        // was flushed before the failure is all there, as after a crash.
        daemon.set_phase(Phase::Stopping);
        notify::reloading();
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), scheduler_task).await;
        server_task.abort();
        let _ = server_task.await;
        let _ = std::fs::remove_file(&cfg.daemon.socket);
        drop(daemon);
        flusher.abort();
        return Exit::Reexec;
    }

    // Drain: /health turns 503, the scheduler takes no new jobs, running
    // jobs get shutdown_timeout to finish their current page.
    daemon.set_phase(Phase::Stopping);
    notify::stopping();
    let _ = stop_tx.send(true);
    let timeout = daemon.config().daemon.shutdown_timeout;
    let drained = tokio::select! {
        r = tokio::time::timeout(timeout, scheduler_task) => r.is_ok(),
        _ = async {
            // A second SIGTERM/SIGINT: leave now (the state is crash-safe).
            while let Some(sig) = signals.recv().await {
                if sig != signal_hook::consts::SIGHUP {
                    break;
                }
            }
        } => {
            tracing::warn!("second stop signal: exiting at once");
            let _ = std::fs::remove_file(&cfg.daemon.socket);
            std::process::exit(1);
        }
    };
    if !drained {
        tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "running work did not finish in time; it resumes at the next start"
        );
    }
    server_task.abort();
    let _ = server_task.await;
    let _ = std::fs::remove_file(&cfg.daemon.socket);
    let store = daemon.store.clone();
    drop(daemon);
    flusher.abort();
    let flushed = tokio::task::spawn_blocking(move || store.flush_blocking()).await;
    match flushed {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            Exit::Code(0)
        }
        Ok(Err(e)) => {
            tracing::error!("final flush failed: {e}");
            Exit::Code(1)
        }
        Err(e) => {
            tracing::error!("final flush panicked: {e}");
            Exit::Code(1)
        }
    }
}

/// SIGHUP: re-read the config; a bad file is logged and the running one kept.
fn reload(daemon: &Daemon, log: &LogHandle) {
    notify::reloading();
    match config::load(daemon.config_arg.as_deref()) {
        Ok(loaded) => {
            let old = daemon.config();
            let new = loaded.config;
            for (key, changed) in [
                (
                    "daemon.state_dir",
                    old.daemon.state_dir != new.daemon.state_dir,
                ),
                ("daemon.socket", old.daemon.socket != new.daemon.socket),
                (
                    "daemon.socket_group",
                    old.daemon.socket_group != new.daemon.socket_group,
                ),
                (
                    "daemon.max_connections",
                    old.daemon.max_connections != new.daemon.max_connections,
                ),
                (
                    "daemon.cache_mb",
                    old.daemon.cache_mb != new.daemon.cache_mb,
                ),
                ("metrics.listen", old.metrics.listen != new.metrics.listen),
            ] {
                if changed {
                    tracing::warn!(
                        key,
                        "changed in the config file; takes effect at the next restart"
                    );
                }
            }
            log.set_level(&new.daemon.log_level);
            daemon.syncs.reconfigure(&new);
            *daemon.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
            *daemon
                .config_path
                .write()
                .unwrap_or_else(|e| e.into_inner()) = loaded.path;
            daemon.registry.forget_clients();
            tracing::info!("configuration reloaded");
        }
        Err(e) => {
            tracing::error!("configuration reload failed, keeping the running configuration: {e}");
        }
    }
    notify::ready(&daemon.status_line());
}

/// Signals arrive on a plain thread (signal-hook) and are forwarded to the
/// runtime; nothing blocks an async worker.
fn signal_channel() -> std::io::Result<tokio::sync::mpsc::Receiver<i32>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    std::thread::Builder::new()
        .name("cobbyd-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.blocking_send(sig).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

/// Keeps `STATUS=` current without polling: wakes when something changed,
/// at most every 2 s.
async fn status_line_task(daemon: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
    let mut last = String::new();
    loop {
        let line = daemon.status_line();
        if line != last {
            notify::status(&line);
            last = line;
        }
        tokio::select! {
            _ = daemon.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = stop.changed() => return,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn watchdog_task(every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => notify::watchdog(),
            _ = stop.changed() => {
                // Keep pinging while draining so systemd does not kill a
                // clean shutdown; the process exits soon anyway.
                loop {
                    tick.tick().await;
                    notify::watchdog();
                }
            }
        }
    }
}
