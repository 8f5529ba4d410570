//! `cobbyd run`: the daemon's life in three steps.
//!
//! 1. **Start-up** ([`startup`]): config → store (lock, migrations,
//!    interrupted removals) → shared state ([`Daemon`]) → control socket →
//!    services → `READY=1`. A failure here returns the exit code.
//! 2. **Run** ([`run_until_stop`]): waits for [`Event`]s; a reload is
//!    applied as a [`ConfigChange`] and the loop goes on; anything else
//!    ends it.
//! 3. **Drain** ([`drain`]): cancels the one shutdown token, waits for the
//!    services (within `daemon.shutdown_timeout`; a second stop signal cuts
//!    it short), closes the control servers, removes the socket, flushes.
//!
//! Shutdown is one [`CancellationToken`]: every service gets a child of it
//! ([`Services::spawn`]) and ends once it is cancelled and its work is
//! done. The control servers are not services: they keep answering status
//! while the services drain and are closed last ([`ControlServer::close`]).
//! Nothing here calls `process::exit`: each step returns an [`Exit`] that
//! [`run`] turns into the process's exit code (or a re-exec).

use crate::config::{self, ConfigChange};
use crate::daemon::{Daemon, EX_CONFIG, EX_TEMPFAIL, Phase};
use crate::logging::{self, LogHandle};
use crate::store::{Store, StoreError};
use crate::{notify, scheduler, server};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often a daemon whose disk failed looks whether it takes writes again.
const STORAGE_RECHECK: Duration = Duration::from_secs(2);
/// How long the services may take to stop before an in-place restart
/// (they cannot write anyway: the disk failed).
const RESTART_DRAIN: Duration = Duration::from_secs(5);
/// Events waiting for the main loop.
const EVENT_QUEUE: usize = 8;

/// What the main loop reacts to: a closed set, fed by the signal thread
/// and the storage watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: re-read the configuration.
    Reload,
    /// The first SIGTERM/SIGINT: drain and stop.
    Stop,
    /// A later SIGTERM/SIGINT: leave now (the state is crash-safe).
    ForceStop,
    /// The state directory takes writes again after a disk failure:
    /// restart in place so that sled starts afresh.
    StorageRecovered,
}

/// How a step ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exit with this code after the runtime shut down in order.
    Code(u8),
    /// Exit with this code now, without waiting for blocking threads.
    Now(u8),
    /// Replace the process image (same pid) so that sled starts afresh.
    Reexec,
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
    match exit {
        Exit::Now(code) => {
            runtime.shutdown_background();
            code
        }
        Exit::Code(code) => {
            // Blocking threads (a stuck DNS lookup, say) must not hold up exit.
            runtime.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Exit::Reexec => {
            runtime.shutdown_timeout(Duration::from_secs(1));
            reexec()
        }
    }
}

async fn async_main(config_arg: Option<PathBuf>, loaded: config::Loaded, log: LogHandle) -> Exit {
    let (tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let running = match startup(config_arg, loaded, tx.clone()).await {
        Ok(r) => r,
        Err(exit) => return exit,
    };
    // Installed once started: a stop signal during start-up (a long
    // migration, say) still ends the process at once.
    if let Err(e) = forward_signals(tx) {
        eprintln!("cobbyd: cannot install signal handlers: {e}");
        let _ = drain(running, Event::Stop, &mut events).await;
        return Exit::Code(1);
    }
    let why = run_until_stop(&running.daemon, &mut events, &log).await;
    drain(running, why, &mut events).await
}

/// A started daemon: what the drain step stops.
struct Running {
    daemon: Arc<Daemon>,
    /// The one shutdown token; the services hold children of it.
    shutdown: CancellationToken,
    services: Services,
    control: ControlServer,
    metrics: Option<ControlServer>,
    flusher: tokio::task::JoinHandle<()>,
}

/// Start-up: everything up to `READY=1`. `events` receives
/// [`Event::StorageRecovered`] from the storage watcher.
async fn startup(
    config_arg: Option<PathBuf>,
    loaded: config::Loaded,
    events: mpsc::Sender<Event>,
) -> Result<Running, Exit> {
    let cfg = Arc::new(loaded.config);
    let dir = cfg.daemon.state_dir.clone();
    let (store, flusher) = open_store(&cfg).await?;
    let daemon = Daemon::build(cfg.clone(), config_arg, loaded.path, store)
        .map_err(|e| store_failure("cannot load the state", &e, &dir))?;
    daemon.warn_insecure_shops();
    for name in daemon.registry.names() {
        if let Err(e) = daemon.ensure_jobs(&name) {
            return Err(store_failure(
                &format!("cannot schedule jobs of {name}"),
                &e,
                &dir,
            ));
        }
    }
    if let Err(e) = daemon.store.flush().await {
        return Err(store_failure("cannot write the state", &e, &dir));
    }
    let (control, metrics) = bind_servers(&daemon).await?;

    let shutdown = CancellationToken::new();
    let services = start_services(&daemon, &shutdown, events);
    daemon.set_phase(Phase::Running);
    notify::ready(&daemon.status_line());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %cfg.daemon.socket.display(),
        state_dir = %cfg.daemon.state_dir.display(),
        shops = daemon.registry.len(),
        "cobbyd is ready"
    );
    Ok(Running {
        daemon,
        shutdown,
        services,
        control,
        metrics,
        flusher,
    })
}

/// Opens the store, starts its flusher, finishes removals a crash
/// interrupted.
async fn open_store(cfg: &config::Config) -> Result<(Store, tokio::task::JoinHandle<()>), Exit> {
    let dir = cfg.daemon.state_dir.clone();
    let cache_mb = cfg.daemon.cache_mb;
    let d = dir.clone();
    let store = match tokio::task::spawn_blocking(move || Store::open(&d, cache_mb)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(store_failure("cannot open the state", &e, &dir)),
        Err(e) => {
            eprintln!("cobbyd: opening the state panicked: {e}");
            return Err(Exit::Code(1));
        }
    };
    let flusher = store.spawn_flusher();
    match store.finish_removals().await {
        Ok(shops) if !shops.is_empty() => {
            tracing::warn!(shops = ?shops, "finished shop removals interrupted by a crash");
        }
        Ok(_) => {}
        Err(e) => {
            return Err(store_failure(
                "cannot finish an interrupted shop removal",
                &e,
                &dir,
            ));
        }
    }
    Ok((store, flusher))
}

/// Binds the control socket and, when configured, the metrics listener,
/// and starts serving both.
async fn bind_servers(
    daemon: &Arc<Daemon>,
) -> Result<(ControlServer, Option<ControlServer>), Exit> {
    let cfg = daemon.config();
    let listener = server::bind(&cfg.daemon.socket, &cfg.daemon.socket_group).map_err(|e| {
        eprintln!("cobbyd: {e}");
        Exit::Code(1)
    })?;
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("cobbyd: metrics.listen {addr}: {e}");
                let _ = std::fs::remove_file(&cfg.daemon.socket);
                return Err(Exit::Code(1));
            }
        },
        None => None,
    };
    let router = crate::routes::router(daemon.clone());
    let max = cfg.daemon.max_connections;
    let control = ControlServer::spawn(|stop| server::serve(listener, router, max, stop));
    let metrics = metrics_listener.map(|l| {
        let router = crate::routes::metrics_router(daemon.clone());
        ControlServer::spawn(|stop| server::serve_metrics_tcp(l, router, stop))
    });
    Ok((control, metrics))
}

/// The daemon's background services. Each runs with a child of the
/// shutdown token and must end once it is cancelled and its work is done
/// (within `daemon.shutdown_timeout`); the drain waits for all of them.
pub struct Services {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Services {
    fn new(shutdown: &CancellationToken) -> Services {
        Services {
            shutdown: shutdown.clone(),
            tasks: JoinSet::new(),
        }
    }

    /// Starts a service: `start` gets its shutdown token.
    pub fn spawn<F>(&mut self, name: &'static str, start: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fut = start(self.shutdown.child_token());
        self.tasks.spawn(async move {
            fut.await;
            tracing::debug!(service = name, "stopped");
        });
    }

    /// Waits until every service has ended.
    async fn join(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The services of a running daemon. A new background service (say, one
/// that pushes accepted edits, or delivers webhooks) is one line here.
fn start_services(
    daemon: &Arc<Daemon>,
    shutdown: &CancellationToken,
    events: mpsc::Sender<Event>,
) -> Services {
    let mut s = Services::new(shutdown);
    let d = daemon.clone();
    s.spawn("scheduler", move |stop| scheduler::run(d, stop));
    let d = daemon.clone();
    s.spawn("status line", move |stop| status_line(d, stop));
    let store = daemon.store.clone();
    s.spawn("storage watcher", move |stop| async move {
        tokio::select! {
            () = storage_recovered(store) => {
                let _ = events.send(Event::StorageRecovered).await;
            }
            () = stop.cancelled() => {}
        }
    });
    if let Some(every) = notify::watchdog_interval() {
        // Not a service: it pings for as long as the process lives, so
        // systemd does not kill a clean drain.
        tokio::spawn(watchdog(every));
    }
    s
}

/// A control server (the socket, or the metrics listener) and the token
/// that closes it.
struct ControlServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    fn spawn<F>(serve: impl FnOnce(CancellationToken) -> F) -> ControlServer
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(stop.clone()));
        ControlServer { stop, task }
    }

    /// Stops accepting, lets open connections finish their answer (at most
    /// [`server::CLOSE_GRACE`]), then returns.
    async fn close(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(server::CLOSE_GRACE * 2, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Step 2: applies reloads until something ends the run.
async fn run_until_stop(
    daemon: &Daemon,
    events: &mut mpsc::Receiver<Event>,
    log: &LogHandle,
) -> Event {
    loop {
        match events.recv().await {
            Some(Event::Reload) => reload(daemon, log),
            Some(Event::Stop | Event::ForceStop) | None => {
                tracing::info!("stopping: draining running work");
                return Event::Stop;
            }
            Some(Event::StorageRecovered) => {
                tracing::warn!(
                    state_dir = %daemon.store.dir().display(),
                    "the state directory takes writes again: restarting in place (same pid) to reopen the database"
                );
                return Event::StorageRecovered;
            }
        }
    }
}

/// Step 3: stops the services, closes the servers, flushes.
async fn drain(running: Running, why: Event, events: &mut mpsc::Receiver<Event>) -> Exit {
    let Running {
        daemon,
        shutdown,
        mut services,
        control,
        metrics,
        flusher,
    } = running;
    let socket = daemon.config().daemon.socket.clone();
    daemon.set_phase(Phase::Stopping);
    if why == Event::StorageRecovered {
        // sled latched the write error: only a fresh open clears it. Stop
        // the work (it cannot write anyway) and start again in place; what
        // was flushed before the failure is all there, as after a crash.
        notify::reloading();
        shutdown.cancel();
        let _ = tokio::time::timeout(RESTART_DRAIN, services.join()).await;
        close_servers(control, metrics, &socket).await;
        drop(daemon);
        flusher.abort();
        return Exit::Reexec;
    }
    // /health turns 503, the scheduler takes no new jobs, running jobs get
    // shutdown_timeout to finish their current page.
    notify::stopping();
    shutdown.cancel();
    let timeout = daemon.config().daemon.shutdown_timeout;
    let drained = tokio::select! {
        r = tokio::time::timeout(timeout, services.join()) => r.is_ok(),
        () = next_force_stop(events) => {
            tracing::warn!("second stop signal: exiting at once");
            let _ = std::fs::remove_file(&socket);
            return Exit::Now(1);
        }
    };
    if !drained {
        tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "running work did not finish in time; it resumes at the next start"
        );
    }
    close_servers(control, metrics, &socket).await;
    let store = daemon.store.clone();
    drop(daemon);
    flusher.abort();
    final_flush(store).await
}

/// Resolves at the next [`Event::ForceStop`] (reloads while draining are
/// ignored).
async fn next_force_stop(events: &mut mpsc::Receiver<Event>) {
    while let Some(e) = events.recv().await {
        if e == Event::ForceStop {
            return;
        }
    }
    std::future::pending().await
}

async fn close_servers(control: ControlServer, metrics: Option<ControlServer>, socket: &Path) {
    control.close().await;
    if let Some(m) = metrics {
        m.close().await;
    }
    let _ = std::fs::remove_file(socket);
}

/// The last flush, after every writer has stopped.
async fn final_flush(store: Store) -> Exit {
    match tokio::task::spawn_blocking(move || store.flush_blocking()).await {
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

/// SIGHUP: re-reads the config; a bad file is logged and the running one
/// kept. The change is applied by each part that reads it, and the keys
/// that only a restart applies are logged.
fn reload(daemon: &Daemon, log: &LogHandle) {
    notify::reloading();
    match config::load(daemon.config_arg.as_deref()) {
        Ok(loaded) => {
            let change = ConfigChange::new(daemon.config(), Arc::new(loaded.config));
            for key in change.restart_keys() {
                tracing::warn!(
                    key,
                    "changed in the config file; takes effect at the next restart"
                );
            }
            log.set_level(&change.new.daemon.log_level);
            daemon.apply(&change, loaded.path);
            tracing::info!("configuration reloaded");
        }
        Err(e) => {
            tracing::error!("configuration reload failed, keeping the running configuration: {e}");
        }
    }
    notify::ready(&daemon.status_line());
}

/// Signals arrive on a plain thread (signal-hook) and are forwarded to the
/// runtime as [`Event`]s; nothing blocks an async worker. The first stop
/// signal is [`Event::Stop`], every later one [`Event::ForceStop`].
fn forward_signals(tx: mpsc::Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("cobbyd-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for sig in signals.forever() {
                let event = match sig {
                    SIGHUP => Event::Reload,
                    _ if stopping => Event::ForceStop,
                    _ => {
                        stopping = true;
                        Event::Stop
                    }
                };
                if tx.blocking_send(event).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
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

/// Keeps `STATUS=` current without polling: wakes when something changed,
/// at most every 2 s.
async fn status_line(daemon: Arc<Daemon>, stop: CancellationToken) {
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
            _ = stop.cancelled() => return,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `WATCHDOG=1` every `every`, for the life of the process.
async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        notify::watchdog();
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
fn store_failure(what: &str, e: &StoreError, dir: &Path) -> Exit {
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
