//! The control socket: HTTP/1.1 over a Unix socket (so `curl
//! --unix-socket` works and the CLI is a thin client). This module owns the
//! socket file (stale-socket detection, mode 0660, group, the safety of its
//! directory) and the connection limits; the routes live in
//! [`crate::routes`].
//!
//! Connection policy: every connection is accepted at once (nobody waits in
//! the kernel's backlog behind idle clients). At most `max_connections` are
//! open; when a new one arrives at the cap, the oldest connection that is
//! not in the middle of a request (connected but silent, dripping its
//! headers, or idle between keep-alive requests) is closed to make room;
//! when every connection is busy with a request, the new one is closed.
//! A request's headers must arrive within [`HEADER_TIMEOUT`] in total, and
//! its body within as long again after them, so a silent or slow client is
//! cut off even when there is room. A request counts as "in the middle"
//! only once its body has arrived: a client stuck inside its body is as
//! evictable as one stuck inside its headers.
//!
//! A body the routes did not read (an early error, a route that takes
//! none) is read to its end before the answer (at most [`DRAIN_LIMIT`],
//! by the body's deadline): a connection closed with unread bytes, or
//! before bytes still on their way arrive, resets the client's side
//! (`ECONNRESET`) and can lose the answer.
//!
//! The servers run until their stop token is cancelled: they stop
//! accepting, let each open connection finish the answer it is giving
//! (at most [`CLOSE_GRACE`]; idle ones close at once), and return.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A client must send a request's headers within this time (in total, not
/// per byte; also between keep-alive requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a body the routes left unread is read (and dropped) before
/// the answer; past it the connection is closed.
pub const DRAIN_LIMIT: usize = 1024 * 1024;
/// How long a closed server waits for its connections' answers.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("control socket {0}: another cobbyd is listening there; stop it or set daemon.socket")]
    InUse(PathBuf),
    #[error(
        "control socket {0}: the path exists and is not a socket; remove it or set daemon.socket"
    )]
    NotASocket(PathBuf),
    #[error(
        "control socket {socket}: its directory {dir} is writable by everyone (mode {mode:o}, no sticky bit), so any user could replace the socket; put it in a directory only cobbyd can write, such as /run/cobbyd (the unit's RuntimeDirectory=): daemon.socket = \"/run/cobbyd/cobbyd.sock\""
    )]
    WorldWritableDir {
        socket: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error(
        "control socket {0}: permission denied for this user: set daemon.socket in a config file of your own (cobbyd run --config FILE) to a path you may create, and pass the same --config (or --socket) to the client commands; or run cobbyd as root"
    )]
    Denied(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket. A stale socket file (nobody listening) is
/// replaced; anything else at the path stops start-up, and so does a
/// directory that everyone may write without the sticky bit.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, BindError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            BindError::Denied(path.to_path_buf())
        } else {
            BindError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(io)?;
        check_dir(path, parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing a stale control socket");
                    std::fs::remove_file(path).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => {
            if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                tracing::warn!(group, error = %e, "cannot give the control socket to its group");
            }
        }
        Ok(None) => tracing::warn!(
            group,
            "daemon.socket_group {group:?} does not exist; the socket stays with the daemon's group (only the daemon's user may use it): create the group (`groupadd --system {group}`) and restart cobbyd, or set daemon.socket_group to an existing group"
        ),
        Err(e) => tracing::warn!(group, error = %e, "cannot look up daemon.socket_group"),
    }
    Ok(listener)
}

/// The socket's directory: writable by everyone without the sticky bit is
/// refused (anyone could delete or replace the socket); with the sticky bit
/// (like /tmp) it is tolerated with a warning.
fn check_dir(socket: &Path, dir: &Path) -> Result<(), BindError> {
    let meta = std::fs::metadata(dir).map_err(|source| BindError::Io {
        path: socket.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 == 0 {
        return Ok(());
    }
    if mode & 0o1000 == 0 {
        return Err(BindError::WorldWritableDir {
            socket: socket.to_path_buf(),
            dir: dir.to_path_buf(),
            mode,
        });
    }
    tracing::warn!(
        dir = %dir.display(),
        "the control socket's directory is writable by everyone (sticky, like /tmp): other users cannot replace the socket but may squat its name before cobbyd starts; prefer /run/cobbyd (the unit's RuntimeDirectory=)"
    );
    Ok(())
}

/// One open control connection, as the cap sees it.
struct Conn {
    /// Requests in progress (from the end of the request body to the end
    /// of the answer's body). A connection with none may be evicted.
    busy: Arc<AtomicUsize>,
    /// Requests whose headers arrived and whose body has not: evicted only
    /// when no connection is wholly idle, so a client whose body is on its
    /// way loses its slot only to a flood of such clients.
    reading: Arc<AtomicUsize>,
    abort: tokio::task::AbortHandle,
}

/// The open connections, oldest first (ids only grow).
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: BTreeMap<u64, Conn>,
}

/// Serves one connection outside any listener and its cap (the fuzzing
/// harness drives the real connection code over an in-memory stream).
pub(crate) async fn serve_standalone<S>(stream: S, router: axum::Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let table = Arc::new(Mutex::new(Conns {
        next_id: 0,
        open: BTreeMap::new(),
    }));
    let guard = ConnGuard { id: 0, table };
    let counter = || Arc::new(AtomicUsize::new(0));
    let never = CancellationToken::new();
    serve_connection(stream, router, counter(), counter(), guard, never).await;
}

/// Removes a connection from the table when its task ends (or is aborted).
struct ConnGuard {
    id: u64,
    table: Arc<Mutex<Conns>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.table).open.remove(&self.id);
    }
}

fn lock(t: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks a request in progress once its body has arrived in full (or the
/// handler has answered without it), until its answer's body is done.
/// Before that the connection counts as idle: a client stuck in the
/// middle of its body holds no more claim on a connection slot than one
/// stuck in its headers, so a flood of them cannot lock the real client
/// out.
struct BusySlot {
    busy: Arc<AtomicUsize>,
    /// Counts this request as reading its body until it is marked busy
    /// (or dropped).
    reading: Mutex<Option<BusyGuard>>,
    guard: Mutex<Option<BusyGuard>>,
    /// The rest of a body the routes dropped unread (to drain).
    unread: Mutex<Option<hyper::body::Incoming>>,
}

impl BusySlot {
    fn new(busy: &Arc<AtomicUsize>, reading: &Arc<AtomicUsize>) -> Arc<BusySlot> {
        Arc::new(BusySlot {
            busy: busy.clone(),
            reading: Mutex::new(Some(BusyGuard::new(reading))),
            guard: Mutex::new(None),
            unread: Mutex::new(None),
        })
    }

    fn mark(&self) {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(BusyGuard::new(&self.busy));
        }
        drop(g);
        self.reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// A request's body as the routes see it: marks the request busy when
/// it ends, and fails once [`HEADER_TIMEOUT`] has passed since the
/// headers arrived (a total deadline, like the headers', not one per
/// read).
struct RequestBody {
    /// `None` only once dropped.
    inner: Option<hyper::body::Incoming>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    slot: Arc<BusySlot>,
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take()
            && !hyper::body::Body::is_end_stream(&inner)
        {
            *self.slot.unread.lock().unwrap_or_else(|e| e.into_inner()) = Some(inner);
        }
    }
}

/// Reads and drops what is left of a request body, up to [`DRAIN_LIMIT`]
/// and `deadline`.
async fn drain_unread(mut body: hyper::body::Incoming, deadline: tokio::time::Instant) {
    let mut left = DRAIN_LIMIT;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, Bytes::len);
            if n > left {
                return;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.slot.mark();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if inner.is_end_stream() {
                    this.slot.mark();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// A request body did not arrive within [`HEADER_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}s", HEADER_TIMEOUT.as_secs())]
pub struct BodyTimeout;

/// Counts a request as in progress until its answer's body is done.
struct BusyGuard(Arc<AtomicUsize>);

impl BusyGuard {
    fn new(busy: &Arc<AtomicUsize>) -> BusyGuard {
        busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(busy.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body that keeps its connection marked busy while it streams
/// (a long products export is not "idle").
struct GuardedBody {
    inner: axum::body::Body,
    _busy: Arc<BusySlot>,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the control API (`router`) until `stop` is cancelled. The
/// daemon cancels it last, after the drain: status stays readable while
/// running work finishes.
pub async fn serve(
    listener: UnixListener,
    router: axum::Router,
    max_connections: usize,
    stop: CancellationToken,
) {
    accept_loop(listener, router, max_connections, stop).await;
}

/// Accepts connections under the policy described at the top until
/// `stop`, then closes them (answers in progress get [`CLOSE_GRACE`]).
async fn accept_loop<L: Listener>(
    mut listener: L,
    router: axum::Router,
    max_connections: usize,
    stop: CancellationToken,
) {
    let table = Arc::new(Mutex::new(Conns::default()));
    let max = max_connections.max(1);
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept_one() => r,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (id, busy, reading) = {
            let mut t = lock(&table);
            if t.open.len() >= max {
                let idle = |c: &Conn| c.busy.load(Ordering::SeqCst) == 0;
                let victim = t
                    .open
                    .iter()
                    .find(|(_, c)| idle(c) && c.reading.load(Ordering::SeqCst) == 0)
                    .or_else(|| t.open.iter().find(|(_, c)| idle(c)))
                    .map(|(id, _)| *id);
                match victim.and_then(|v| t.open.remove(&v)) {
                    Some(c) => {
                        tracing::debug!(
                            "control connections at the cap: closing the oldest idle one"
                        );
                        // Its guard finds it gone; the task drops the
                        // connection when the runtime next polls it.
                        c.abort.abort();
                    }
                    None => {
                        tracing::warn!(
                            max,
                            "control connections at the cap, all busy: refusing a new one (daemon.max_connections)"
                        );
                        drop(stream);
                        continue;
                    }
                }
            }
            t.next_id += 1;
            (
                t.next_id,
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicUsize::new(0)),
            )
        };
        // Registered under the lock after the spawn, so the guard's removal
        // cannot run before the insertion.
        let mut t = lock(&table);
        let guard = ConnGuard {
            id,
            table: table.clone(),
        };
        let abort = tasks.spawn(serve_connection(
            stream,
            router.clone(),
            busy.clone(),
            reading.clone(),
            guard,
            stop.clone(),
        ));
        t.open.insert(
            id,
            Conn {
                busy,
                reading,
                abort,
            },
        );
    }
    drop(listener);
    let finish = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE, finish).await.is_err() {
        tracing::debug!("control connections still open at close: cut");
    }
}

/// Something that hands out connections (the Unix socket, or TCP for
/// `/metrics`).
trait Listener {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&mut self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&mut self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&mut self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves one connection (HTTP/1.1, header timeout); `busy` counts its
/// requests in progress; the guard takes it off the table at the end.
async fn serve_connection<S>(
    stream: S,
    router: axum::Router,
    busy: Arc<AtomicUsize>,
    reading: Arc<AtomicUsize>,
    guard: ConnGuard,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let slot = BusySlot::new(&busy, &reading);
        if hyper::body::Body::is_end_stream(req.body()) {
            slot.mark();
        }
        let deadline_at = tokio::time::Instant::now() + HEADER_TIMEOUT;
        let deadline = Box::pin(tokio::time::sleep_until(deadline_at));
        let body_slot = slot.clone();
        let req = req.map(move |inner| {
            axum::body::Body::new(RequestBody {
                inner: Some(inner),
                deadline,
                slot: body_slot,
            })
        });
        let router = router.clone();
        async move {
            let resp = router.oneshot(req).await?;
            let unread = slot.unread.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(body) = unread {
                drain_unread(body, deadline_at).await;
            }
            // Answering: busy from here on, body read or not.
            slot.mark();
            Ok::<_, std::convert::Infallible>(resp.map(|inner| GuardedBody { inner, _busy: slot }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client that shuts down its writing side after the request
        // (`nc -U`, a script) still gets the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            // The answer in progress is finished; an idle connection closes.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "control connection ended with an error");
    }
    drop(guard);
}

/// The optional Prometheus TCP listener (`metrics.listen`): `router`
/// serves `/metrics` only.
pub async fn serve_metrics_tcp(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: CancellationToken,
) {
    accept_loop(listener, router, 16, stop).await;
}
