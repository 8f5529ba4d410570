//! The CLI side of the control socket: a small HTTP/1.1 client over a Unix
//! socket, with timeouts, and errors mapped to `status`'s exit codes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest JSON answer read (status of thousands of shops fits).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why the daemon could not be asked. Exit codes follow `cobbyd status`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cobbyd is not running: no control socket at {0} (start it with `systemctl start cobbyd`, or pass --socket)"
    )]
    NoSocket(PathBuf),
    #[error("cobbyd is not running: nothing listens on {0} (a stale socket file)")]
    Refused(PathBuf),
    #[error("permission denied on the control socket {0}: {1}; {2}")]
    Permission(PathBuf, String, String),
    #[error("control socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("protocol error talking to the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// 3: not running / unreachable; 4: permission or protocol trouble.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoSocket(_)
            | ClientError::Refused(_)
            | ClientError::Io(..)
            | ClientError::Timeout(_) => 3,
            ClientError::Permission(..) | ClientError::Protocol(_) => 4,
        }
    }
}

/// A response, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ClientError::Protocol(format!("answer is not JSON ({e})")))
    }

    /// `error.message` of an error answer, or the status line.
    pub fn error_message(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("the daemon answered {}", self.status))
    }
}

/// Talks to one daemon.
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        {
            Err(_) => return Err(ClientError::Timeout(Duration::from_secs(5))),
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => ClientError::NoSocket(self.socket.clone()),
                    std::io::ErrorKind::ConnectionRefused => {
                        ClientError::Refused(self.socket.clone())
                    }
                    std::io::ErrorKind::PermissionDenied => permission_error(&self.socket),
                    _ => ClientError::Io(self.socket.clone(), e),
                });
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "cobbyd");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        match tokio::time::timeout(self.timeout, sender.send_request(req)).await {
            Err(_) => Err(ClientError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(ClientError::Protocol(e.to_string())),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A request whose answer is read whole (bounded).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
        let body = match tokio::time::timeout(self.timeout, limited.collect()).await {
            Err(_) => return Err(ClientError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(ClientError::Protocol(format!("reading the answer: {e}"))),
            Ok(Ok(c)) => c.to_bytes(),
        };
        Ok(Answer { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request(Method::GET, path, None).await
    }

    /// Streams an answer's body into `out` (the products export).
    pub async fn stream_to(
        &self,
        path: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        on_headers: impl FnOnce(&hyper::HeaderMap),
    ) -> Result<Result<(), Answer>, ClientError> {
        use tokio::io::AsyncWriteExt;
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if status.is_success() {
            on_headers(resp.headers());
        }
        let mut body = resp.into_body();
        if !status.is_success() {
            let limited = http_body_util::Limited::new(body, 1024 * 1024);
            let bytes = limited
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Ok(Err(Answer {
                status,
                body: bytes,
            }));
        }
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ClientError::Protocol(format!("export interrupted: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if let Err(e) = out.write_all(&data).await {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(Ok(()));
                    }
                    return Err(ClientError::Io(PathBuf::from("stdout"), e));
                }
            }
        }
        out.flush()
            .await
            .map_err(|e| ClientError::Io(PathBuf::from("stdout"), e))?;
        Ok(Ok(()))
    }
}

/// Says who may use the socket: its owner, group and mode as this user sees
/// them (or that its directory is closed to this user).
fn permission_error(socket: &Path) -> ClientError {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(socket) {
        Ok(m) => {
            let user = nix::unistd::User::from_uid(m.uid().into())
                .ok()
                .flatten()
                .map_or_else(|| m.uid().to_string(), |u| u.name);
            let group = nix::unistd::Group::from_gid(m.gid().into())
                .ok()
                .flatten()
                .map_or_else(|| m.gid().to_string(), |g| g.name);
            let fix = if m.gid() == 0 {
                // The daemon's fallback when daemon.socket_group does not
                // exist (it runs as root): joining root is never the fix.
                "the socket belongs to group root, so the group named by daemon.socket_group in the daemon's config (default cobbyd) probably does not exist: create it (`sudo groupadd --system cobbyd`, or set daemon.socket_group to an existing group), restart the daemon, join that group (`sudo usermod -aG cobbyd $USER`) and log in again; or run the command as root".to_string()
            } else {
                format!(
                    "run the command as root or as the daemon's user, or join the socket's group (daemon.socket_group in the daemon's config): `sudo usermod -aG {group} $USER`, then log in again"
                )
            };
            ClientError::Permission(
                socket.to_path_buf(),
                format!(
                    "only its owner {user} and members of group {group} may connect (mode {:o})",
                    m.mode() & 0o777
                ),
                fix,
            )
        }
        Err(_) => ClientError::Permission(
            socket.to_path_buf(),
            "this user cannot reach the socket's directory".into(),
            "run the command as root or as the daemon's user, or pass --socket with a socket you may reach".into(),
        ),
    }
}
