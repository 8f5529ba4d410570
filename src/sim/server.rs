//! Listeners, connections and the shop's front door: fault modes first,
//! then routing to the REST API, the XML-RPC API or the storefront.
//!
//! `Fault::Down` must look like a stopped web server: the listening socket
//! leaves the LISTEN state before `set_fault` returns (a `shutdown(2)` on a
//! duplicate of its descriptor, so no connect can slip into the backlog),
//! and every open connection is dropped. Coming back binds the same port
//! again.

use super::{Inner, bump, lock};
use crate::sim::faults::Fault;
use crate::sim::{control, faults, m1, m2};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Response body: in memory, or a stream (truncation).
pub type Body = BoxBody<Bytes, io::Error>;
/// A response.
pub type Resp = Response<Body>;

/// Largest request body read from the shop listener (XML-RPC multiCalls are
/// the big ones).
pub const MAX_SHOP_BODY: usize = 8 * 1024 * 1024;
/// Largest request body read from the control listener.
pub const MAX_CONTROL_BODY: usize = 64 * 1024;

/// An in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A streamed body.
pub fn stream_body<S>(s: S) -> Body
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + Sync + 'static,
{
    StreamBody::new(s).boxed()
}

fn with_type(status: u16, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(full(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// A JSON answer from serialized bytes.
pub fn json_bytes(status: u16, body: Vec<u8>) -> Resp {
    with_type(status, "application/json; charset=utf-8", body)
}

/// A JSON answer.
pub fn json<T: serde::Serialize>(status: u16, v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(b) => json_bytes(status, b),
        Err(_) => json_bytes(500, br#"{"message":"Internal Error."}"#.to_vec()),
    }
}

/// An HTML answer.
pub fn html(status: u16, body: &'static str) -> Resp {
    with_type(status, "text/html; charset=UTF-8", body)
}

/// An XML answer (XML-RPC is always HTTP 200).
pub fn xml(body: String) -> Resp {
    with_type(200, "text/xml; charset=UTF-8", body)
}

/// Listener state: which sockets are open and how to close them.
pub(super) struct Listeners {
    rt: Handle,
    /// A duplicate of the shop listener's descriptor, used only to
    /// `shutdown(2)` it; `None` while down.
    shop_kill: Option<std::net::TcpStream>,
    /// Bumped when the shop goes down: its accept loop and connections end.
    shop_epoch: watch::Sender<u64>,
    control_kill: Option<std::net::TcpStream>,
    /// Set at shutdown: the control loop and connections end.
    control_epoch: watch::Sender<u64>,
    stopped: bool,
    tasks: Vec<JoinHandle<()>>,
    /// Duplicates of the open shop connections' descriptors, so that going
    /// down closes them before `set_fault` returns (a client's pooled
    /// connection then fails before its next request is written, and its
    /// retry meets the refused port).
    shop_conns: HashMap<u64, std::net::TcpStream>,
    next_conn: u64,
}

impl Listeners {
    pub(super) fn new(rt: Handle) -> Listeners {
        Listeners {
            rt,
            shop_kill: None,
            shop_epoch: watch::channel(0).0,
            control_kill: None,
            control_epoch: watch::channel(0).0,
            stopped: false,
            tasks: Vec::new(),
            shop_conns: HashMap::new(),
            next_conn: 0,
        }
    }
}

/// A handle able to `shutdown(2)` a listening socket: a duplicate of its
/// descriptor viewed as a stream (`TcpStream::shutdown` is the plain
/// syscall; on Linux, shutting down a listening socket takes it out of the
/// LISTEN state at once and resets what waits in its backlog).
fn killer(l: &std::net::TcpListener) -> io::Result<std::net::TcpStream> {
    let dup: std::os::fd::OwnedFd = l.try_clone()?.into();
    Ok(std::net::TcpStream::from(dup))
}

#[derive(Clone, Copy)]
enum Side {
    Shop,
    Control,
}

fn spawn_accept(
    inner: &Arc<Inner>,
    ls: &mut Listeners,
    l: std::net::TcpListener,
    side: Side,
) -> io::Result<()> {
    l.set_nonblocking(true)?;
    let (rx, epoch) = match side {
        Side::Shop => {
            ls.shop_kill = Some(killer(&l)?);
            (ls.shop_epoch.subscribe(), *ls.shop_epoch.borrow())
        }
        Side::Control => {
            ls.control_kill = Some(killer(&l)?);
            (ls.control_epoch.subscribe(), *ls.control_epoch.borrow())
        }
    };
    let inner = inner.clone();
    let task = ls.rt.spawn(accept_loop(inner, l, side, rx, epoch));
    ls.tasks.retain(|t| !t.is_finished());
    ls.tasks.push(task);
    Ok(())
}

pub(super) fn start_shop(inner: &Arc<Inner>, l: std::net::TcpListener) -> io::Result<()> {
    let mut ls = lock(&inner.listeners);
    spawn_accept(inner, &mut ls, l, Side::Shop)
}

pub(super) fn start_control(inner: &Arc<Inner>, l: std::net::TcpListener) -> io::Result<()> {
    let mut ls = lock(&inner.listeners);
    spawn_accept(inner, &mut ls, l, Side::Control)
}

/// Closes the shop listener now and drops its connections.
pub(super) fn shop_down(inner: &Arc<Inner>) {
    let mut ls = lock(&inner.listeners);
    if let Some(k) = ls.shop_kill.take() {
        let _ = k.shutdown(Shutdown::Both);
        ls.shop_epoch.send_modify(|e| *e += 1);
    }
    for (_, c) in ls.shop_conns.drain() {
        let _ = c.shutdown(Shutdown::Both);
    }
}

/// Removes a connection from the registry when its task ends.
struct ConnGuard {
    inner: Arc<Inner>,
    id: Option<u64>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.inner.listeners).shop_conns.remove(&id);
        }
    }
}

fn register(inner: &Arc<Inner>, side: Side, stream: &tokio::net::TcpStream) -> ConnGuard {
    let id = match side {
        Side::Control => None,
        Side::Shop => {
            use std::os::fd::AsFd as _;
            stream.as_fd().try_clone_to_owned().ok().map(|fd| {
                let mut ls = lock(&inner.listeners);
                ls.next_conn += 1;
                let id = ls.next_conn;
                ls.shop_conns.insert(id, std::net::TcpStream::from(fd));
                id
            })
        }
    };
    ConnGuard {
        inner: inner.clone(),
        id,
    }
}

/// Binds the shop port again if it is down.
pub(super) fn shop_up(inner: &Arc<Inner>) -> io::Result<()> {
    let mut ls = lock(&inner.listeners);
    if ls.shop_kill.is_some() || ls.stopped {
        return Ok(());
    }
    // The old socket may still be closing; a few quick tries cover that.
    let mut last = None;
    for _ in 0..50 {
        match std::net::TcpListener::bind(("127.0.0.1", inner.port)) {
            Ok(l) => return spawn_accept(inner, &mut ls, l, Side::Shop),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("bind failed")))
}

/// Stops everything and waits for the accept loops to end.
pub(super) async fn shutdown(inner: &Arc<Inner>) {
    let tasks = {
        let mut ls = lock(&inner.listeners);
        ls.stopped = true;
        for k in [ls.shop_kill.take(), ls.control_kill.take()]
            .into_iter()
            .flatten()
        {
            let _ = k.shutdown(Shutdown::Both);
        }
        ls.shop_epoch.send_modify(|e| *e += 1);
        ls.control_epoch.send_modify(|e| *e += 1);
        std::mem::take(&mut ls.tasks)
    };
    for t in tasks {
        let _ = t.await;
    }
}

async fn ended(rx: &mut watch::Receiver<u64>, epoch: u64) {
    loop {
        if *rx.borrow_and_update() != epoch {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(
    inner: Arc<Inner>,
    l: std::net::TcpListener,
    side: Side,
    mut rx: watch::Receiver<u64>,
    epoch: u64,
) {
    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
        return;
    };
    loop {
        tokio::select! {
            r = l.accept() => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let inner = inner.clone();
                    let rx = rx.clone();
                    tokio::spawn(serve_conn(inner, stream, side, rx, epoch));
                }
                Err(_) => {
                    // Shut down (EINVAL) or out of descriptors: look at the
                    // epoch, then back off a little.
                    if *rx.borrow() != epoch {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = ended(&mut rx, epoch) => return,
        }
    }
}

async fn serve_conn(
    inner: Arc<Inner>,
    stream: tokio::net::TcpStream,
    side: Side,
    mut rx: watch::Receiver<u64>,
    epoch: u64,
) {
    let _guard = register(&inner, side, &stream);
    let tls = match side {
        Side::Shop => inner.tls.clone(),
        Side::Control => None,
    };
    let svc = service_fn(move |req: Request<Incoming>| {
        let inner = inner.clone();
        async move {
            match side {
                Side::Shop => shop_request(inner, req).await,
                Side::Control => Ok(control::handle(&inner, req).await),
            }
        }
    });
    let work = async move {
        match tls {
            None => {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
            Some(acceptor) => {
                // A client that refuses the certificate ends the handshake
                // with an alert: nothing more to do for that connection.
                let accepted =
                    tokio::time::timeout(super::tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await;
                if let Ok(Ok(tls_stream)) = accepted {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls_stream), svc)
                        .await;
                }
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = ended(&mut rx, epoch) => {}
    }
}

/// Reads a request body up to `cap` bytes; `None` when it is larger or the
/// connection fails.
pub async fn read_body(body: Incoming, cap: usize) -> Option<Bytes> {
    Limited::new(body, cap)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

/// Which part of the shop a path addresses.
enum Area<'a> {
    /// `/rest/...`: the rest after `/rest/`.
    Rest(&'a str),
    /// `/api/xmlrpc[/...]`.
    XmlRpc,
    /// `/` (storefront).
    Home,
    /// Anything else.
    Other,
}

fn classify(path: &str) -> (Area<'_>, bool) {
    let (p, via_index) = match path.strip_prefix("/index.php") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => (rest, true),
        _ => (path, false),
    };
    let area = if let Some(rest) = p.strip_prefix("/rest/") {
        Area::Rest(rest)
    } else if p == "/api/xmlrpc" || p.starts_with("/api/xmlrpc/") {
        Area::XmlRpc
    } else if p.is_empty() || p == "/" {
        Area::Home
    } else {
        Area::Other
    };
    (area, via_index)
}

async fn shop_request(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Resp, io::Error> {
    let c = &inner.counters;
    bump(&c.requests);
    let _in_flight = super::InFlight::new(c);
    let fault = lock(&inner.fault).clone();
    let path = req.uri().path().to_string();
    let (area, via_index) = classify(&path);
    let routed = via_index || !inner.cfg.index_php_only;
    let is_rest = matches!(area, Area::Rest(_)) && routed;
    let is_xmlrpc = matches!(area, Area::XmlRpc) && routed;
    let is_api = is_rest || is_xmlrpc;
    match &fault {
        // The Magento 1 modes are answered by the XML-RPC API itself, the
        // Magento 2 listing modes inside the listing (`m2::list_products`).
        Fault::ShortTotal { .. } | Fault::PartialListing { .. } | Fault::Endless { .. } => {}
        Fault::None
        | Fault::Truncated
        | Fault::M1InfoFault { .. }
        | Fault::M1InfoWrongId { .. }
        | Fault::M1ListIgnoresRange
        | Fault::M1HugeSession { .. } => {}
        Fault::Down => {
            bump(&c.faults_injected);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "shop is down",
            ));
        }
        Fault::Maintenance => {
            bump(&c.faults_injected);
            return Ok(faults::maintenance());
        }
        Fault::Html200 => {
            if is_api {
                bump(&c.faults_injected);
                return Ok(faults::storefront());
            }
        }
        Fault::Garbage => {
            if is_api {
                bump(&c.faults_injected);
                return Ok(faults::garbage(is_xmlrpc));
            }
        }
        Fault::RateLimited { retry_after_s } => {
            bump(&c.faults_injected);
            return Ok(faults::rate_limited(*retry_after_s));
        }
        Fault::Redirect { status, to } => {
            if is_api {
                bump(&c.faults_injected);
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                return Ok(faults::redirect(*status, to, pq));
            }
        }
        Fault::Message { message } => {
            if is_api {
                bump(&c.faults_injected);
                return Ok(faults::message(is_xmlrpc, message));
            }
        }
        Fault::Flaky { every } => {
            let n = inner.flaky_seen.fetch_add(1, Ordering::Relaxed) + 1;
            if *every > 0 && n % u64::from(*every) == 0 {
                bump(&c.faults_injected);
                return Ok(faults::internal_error(is_xmlrpc, inner.next_salt()));
            }
        }
        Fault::Slow(d) => {
            bump(&c.faults_injected);
            tokio::time::sleep(*d).await;
        }
    }
    let resp = match area {
        Area::Rest(rest) if routed => m2::handle(&inner, req, rest.to_string()).await,
        Area::XmlRpc if routed => m1::handle(&inner, req).await,
        Area::Rest(_) | Area::XmlRpc | Area::Home => {
            c.route("storefront");
            faults::storefront()
        }
        Area::Other => {
            c.route("not found");
            html(404, faults::NOT_FOUND_HTML)
        }
    };
    if fault == Fault::Truncated {
        bump(&c.faults_injected);
        return Ok(faults::truncate(resp).await);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_classify() {
        assert!(matches!(
            classify("/rest/V1/products"),
            (Area::Rest("V1/products"), false)
        ));
        assert!(matches!(
            classify("/index.php/rest/fr/V1/x"),
            (Area::Rest("fr/V1/x"), true)
        ));
        assert!(matches!(classify("/api/xmlrpc/"), (Area::XmlRpc, false)));
        assert!(matches!(
            classify("/index.php/api/xmlrpc"),
            (Area::XmlRpc, true)
        ));
        assert!(matches!(classify("/"), (Area::Home, false)));
        assert!(matches!(classify("/index.php"), (Area::Home, true)));
        assert!(matches!(
            classify("/index.phpx/rest/V1"),
            (Area::Other, false)
        ));
        assert!(matches!(classify("/api/xmlrpcx"), (Area::Other, false)));
    }
}
