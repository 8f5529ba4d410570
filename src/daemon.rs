//! `cobbyd run`: builds the daemon (config → store → queue → registry →
//! scheduler → control server → `READY=1`), then handles signals: SIGHUP
//! reloads, SIGTERM/SIGINT drain and stop, a second SIGTERM exits at once.

use crate::config::{self, Config};
use crate::logging::{self, LogHandle};
use crate::notify;
use crate::probe::HealthBook;
use crate::queue::{JobKind, Queue, now_ms};
use crate::registry::Registry;
use crate::store::Store;
use crate::sync::SyncManager;
use crate::{scheduler, server};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;

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
        if self.stopping() {
            line.push_str("; stopping");
        }
        line
    }

    /// Makes sure every shop has its recurring jobs pending (after start-up
    /// and after `shop add`). Existing pending jobs keep their time.
    pub fn ensure_jobs(&self, shop: &str) -> Result<(), crate::store::StoreError> {
        let cfg = self.config();
        let now = now_ms();
        let jitter = |d: Duration| -> u64 {
            // Spread first runs over a tenth of the interval, per shop.
            let span = (d.as_millis() as u64 / 10).max(1);
            shop_hash(shop) % span
        };
        self.queue
            .schedule_at(shop, JobKind::Probe, now + jitter(cfg.probe.interval), true)?;
        if self.queue.pending(shop, JobKind::Sync).is_none() {
            self.queue
                .schedule_at(shop, JobKind::Sync, now + jitter(cfg.sync.interval), true)?;
        }
        if self.queue.pending(shop, JobKind::FullSync).is_none() {
            let due =
                now + cfg.sync.full_interval.as_millis() as u64 + jitter(cfg.sync.full_interval);
            self.queue.schedule_at(shop, JobKind::FullSync, due, true)?;
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
    let code = runtime.block_on(async_main(config_arg, loaded, log));
    // Blocking threads (a stuck DNS lookup, say) must not hold up exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn async_main(config_arg: Option<PathBuf>, loaded: config::Loaded, log: LogHandle) -> u8 {
    let cfg = Arc::new(loaded.config);
    let state_dir = cfg.daemon.state_dir.clone();
    let cache_mb = cfg.daemon.cache_mb;
    let store = match tokio::task::spawn_blocking(move || Store::open(&state_dir, cache_mb)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            eprintln!("cobbyd: {e}");
            return 1;
        }
        Err(e) => {
            eprintln!("cobbyd: opening the state panicked: {e}");
            return 1;
        }
    };
    let flusher = store.spawn_flusher();
    let built = Daemon::build(
        cfg.clone(),
        config_arg.clone(),
        loaded.path.clone(),
        store.clone(),
    );
    let daemon = match built {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cobbyd: cannot load the state: {e}");
            return 1;
        }
    };
    for name in daemon.registry.names() {
        if let Err(e) = daemon.ensure_jobs(&name) {
            eprintln!("cobbyd: cannot schedule jobs of {name}: {e}");
            return 1;
        }
    }
    if let Err(e) = daemon.store.flush().await {
        eprintln!("cobbyd: {e}");
        return 1;
    }

    let listener = match server::bind(&cfg.daemon.socket, &cfg.daemon.socket_group) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cobbyd: {e}");
            return 1;
        }
    };
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("cobbyd: metrics.listen {addr}: {e}");
                let _ = std::fs::remove_file(&cfg.daemon.socket);
                return 1;
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
            return 1;
        }
    };
    loop {
        match signals.recv().await {
            Some(signal_hook::consts::SIGHUP) => reload(&daemon, &log),
            Some(sig) => {
                tracing::info!(signal = sig, "stopping: draining running work");
                break;
            }
            None => break,
        }
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
            0
        }
        Ok(Err(e)) => {
            tracing::error!("final flush failed: {e}");
            1
        }
        Err(e) => {
            tracing::error!("final flush panicked: {e}");
            1
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
