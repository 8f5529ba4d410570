//! The control socket: HTTP/1.1 over a Unix socket (so `curl
//! --unix-socket` works and the CLI is a thin client). This module owns the
//! socket file (stale-socket detection, mode 0660, group) and the
//! connection limits; the routes live in [`crate::routes`].

use crate::daemon::Daemon;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};

/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("control socket {0}: another cobbyd is listening there; stop it or set daemon.socket")]
    InUse(PathBuf),
    #[error(
        "control socket {0}: the path exists and is not a socket; remove it or set daemon.socket"
    )]
    NotASocket(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket. A stale socket file (nobody listening) is
/// replaced; anything else at the path stops start-up.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
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
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(io)?;
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
            "daemon.socket_group does not exist; the socket stays with the daemon's group"
        ),
        Err(e) => tracing::warn!(group, error = %e, "cannot look up daemon.socket_group"),
    }
    Ok(listener)
}

/// Serves the control API until `stop`... and a little beyond: status stays
/// readable while the daemon drains; the caller aborts this task last.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    max_connections: usize,
    _stop: watch::Receiver<bool>,
) {
    let router = crate::routes::router(daemon);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // Wait for a free slot before accepting: excess clients queue in
        // the kernel's backlog instead of costing memory here.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, router.clone(), permit));
    }
}

/// Serves one connection (HTTP/1.1, header timeout); the permit is its
/// slot in the connection cap.
pub(crate) async fn serve_connection<S>(
    stream: S,
    router: axum::Router,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client that shuts down its writing side after the request
        // (`nc -U`, a script) still gets the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "control connection ended with an error");
    }
    drop(permit);
}

/// The optional Prometheus TCP listener (`metrics.listen`): `/metrics` only.
pub async fn serve_metrics_tcp(
    listener: tokio::net::TcpListener,
    daemon: Arc<Daemon>,
    _stop: watch::Receiver<bool>,
) {
    let router = crate::routes::metrics_router(daemon);
    let slots = Arc::new(Semaphore::new(16));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(serve_connection(stream, router.clone(), permit));
    }
}
