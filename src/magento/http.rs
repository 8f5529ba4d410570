//! The HTTP plumbing both shop clients share: one way to build a hardened
//! `reqwest` client, read a body under a size cap, and turn transport
//! failures and the HTTP answers every Magento version gives alike (HTML
//! storefronts, maintenance pages, 429/503 with `Retry-After`) into
//! [`ShopError`]s. Protocol-specific answers (M2 JSON errors, M1 faults) are
//! classified by the clients themselves.

use super::{ClientOptions, FailureKind, ShopError};
use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use std::error::Error as StdError;
use std::time::Duration;

/// Redirects followed at most (same origin, or an `http` to `https` upgrade
/// of the same host).
pub(crate) const MAX_REDIRECTS: usize = 5;

/// Longest `Retry-After` honoured: a shop asking for more is asked again
/// after a day anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The longest the TCP+TLS connection setup may take, within the request
/// timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client with TLS verification on (rustls, webpki roots), a timeout on
/// every request, a bounded connect time, and redirects limited to
/// [`MAX_REDIRECTS`] that never leave the shop's host (the request carries
/// credentials) nor downgrade https to http.
/// Checks a shop's base URL (http(s) with a host) and returns it without a
/// trailing slash.
pub(crate) fn base_url(base_url: &str) -> Result<String, ShopError> {
    let invalid = |why: String| {
        ShopError::new(
            FailureKind::Protocol,
            format!("invalid shop URL {base_url:?}: {why}"),
        )
    };
    let parsed = url::Url::parse(base_url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid("needs http(s):// and a host".into()));
    }
    Ok(base_url.trim_end_matches('/').to_string())
}

pub(crate) fn build_client(opts: &ClientOptions) -> Result<reqwest::Client, ShopError> {
    // One client per distinct timeout, shared by every shop: a reqwest
    // client carries its own TLS root store and connection pool, which with
    // hundreds of shops costs tens of MiB for nothing. The redirect policy
    // only compares URLs of one request chain, so sharing it is safe.
    static SHARED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<std::time::Duration, reqwest::Client>>,
    > = std::sync::OnceLock::new();
    let shared = SHARED.get_or_init(Default::default);
    let mut map = shared.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(&opts.timeout) {
        return Ok(c.clone());
    }
    let client = new_client(opts)?;
    // Reloads with new timeouts add entries; keep the map small.
    if map.len() >= 8 {
        map.clear();
    }
    map.insert(opts.timeout, client.clone());
    Ok(client)
}

fn new_client(opts: &ClientOptions) -> Result<reqwest::Client, ShopError> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.follow();
        };
        if attempt.previous().len() > MAX_REDIRECTS {
            let msg = format!("more than {MAX_REDIRECTS} redirects");
            return attempt.error(msg);
        }
        let next = attempt.url();
        let same_host = next.host_str() == first.host_str();
        let same_origin = same_host
            && next.scheme() == first.scheme()
            && next.port_or_known_default() == first.port_or_known_default();
        let upgrade = same_host && first.scheme() == "http" && next.scheme() == "https";
        if same_origin || upgrade {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(opts.timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(opts.timeout))
        .redirect(policy)
        .user_agent(concat!("cobbyd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            ShopError::new(
                FailureKind::Protocol,
                format!("cannot set up the HTTP client: {e}"),
            )
        })
}

/// Every message in an error's source chain, outermost first.
fn chain(e: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        out.push(err.to_string());
        cur = err.source();
    }
    out
}

/// True when some link of the chain is an `io::Error` of kind
/// `InvalidData`: rustls reports its failures that way.
fn has_invalid_data(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Classifies a failure to get an answer at all: timeout, DNS, TLS,
/// connection. The message names the host, never headers.
pub(crate) fn classify_send_error(e: &reqwest::Error, opts: &ClientOptions) -> ShopError {
    let host = e
        .url()
        .and_then(|u| u.host_str())
        .unwrap_or("the shop")
        .to_string();
    let links = chain(e);
    // The innermost message is the most specific one ("Connection refused").
    let detail = links.last().cloned().unwrap_or_default();
    let all = links.join(": ").to_ascii_lowercase();
    if e.is_timeout() {
        return ShopError::new(
            FailureKind::Timeout,
            format!(
                "{host} did not answer within {}s",
                opts.timeout.as_secs_f32()
            ),
        );
    }
    if e.is_redirect() {
        return ShopError::new(
            FailureKind::HttpStatus,
            format!("{host} redirected more than {MAX_REDIRECTS} times"),
        );
    }
    if all.contains("dns error") || all.contains("failed to lookup address") {
        return ShopError::new(FailureKind::Dns, format!("cannot resolve {host}: {detail}"));
    }
    let tls_words = [
        "certificate",
        "tls",
        "ssl",
        "handshake",
        "corrupt message",
        "peer misbehaved",
        "alert",
    ];
    if has_invalid_data(e) || tls_words.iter().any(|w| all.contains(w)) {
        return ShopError::new(
            FailureKind::Tls,
            format!("TLS with {host} failed: {detail}"),
        );
    }
    ShopError::new(
        FailureKind::Connect,
        format!("cannot connect to {host}: {detail}"),
    )
}

/// Reads a whole body, refusing more than `max` bytes (announced or
/// received) and reporting a connection cut before the announced end.
pub(crate) async fn read_body(
    resp: &mut reqwest::Response,
    opts: &ClientOptions,
) -> Result<Bytes, ShopError> {
    let max = opts.max_body;
    let status = resp.status().as_u16();
    let too_large = || {
        ShopError::new(
            FailureKind::Protocol,
            format!("answer larger than {max} bytes"),
        )
        .with_status(status)
    };
    let announced = resp.content_length();
    if announced.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let cap = announced.map_or(8 * 1024, |n| n as usize);
    let mut buf = BytesMut::with_capacity(cap);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Err(ShopError::new(
                    FailureKind::Timeout,
                    format!(
                        "answer not complete within {}s ({} bytes read)",
                        opts.timeout.as_secs_f32(),
                        buf.len()
                    ),
                )
                .with_status(status));
            }
            Err(_) => {
                return Err(ShopError::new(
                    FailureKind::Protocol,
                    format!("answer truncated after {} bytes", buf.len()),
                )
                .with_status(status));
            }
        }
    }
    if let Some(n) = announced {
        if (buf.len() as u64) < n {
            return Err(ShopError::new(
                FailureKind::Protocol,
                format!("answer truncated after {} of {n} bytes", buf.len()),
            )
            .with_status(status));
        }
    }
    Ok(buf.freeze())
}

/// `Retry-After` as a delay: delta-seconds or an HTTP date (past dates are
/// zero), capped at a day.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    parse_retry_after(raw, chrono::Utc::now())
}

fn parse_retry_after(raw: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let d = if let Ok(secs) = raw.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = chrono::DateTime::parse_from_rfc2822(raw).ok()?;
        (when.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// What a body looks like, judged by its first non-blank byte (the
/// `Content-Type` of misconfigured shops cannot be trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Empty,
    /// Starts with `<`: HTML or XML.
    Markup,
    /// Starts like a JSON document.
    Json,
    Other,
}

pub(crate) fn shape(body: &[u8]) -> Shape {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Shape::Empty,
        Some(b'<') => Shape::Markup,
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => Shape::Json,
        Some(_) => Shape::Other,
    }
}

/// True for bodies that are HTML pages (not XML-RPC, not JSON).
pub(crate) fn is_html(headers: &HeaderMap, body: &[u8]) -> bool {
    let ct_html = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("html"));
    if ct_html {
        return true;
    }
    let head: Vec<u8> = body
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take(512)
        .map(u8::to_ascii_lowercase)
        .collect();
    let head = String::from_utf8_lossy(&head);
    head.starts_with("<!doctype html") || head.contains("<html")
}

/// The answers both APIs give alike, classified; `None` when the status is
/// for the protocol-specific classification to judge. `body_is_api` says
/// whether the body is in the API's own format (JSON for M2, XML-RPC for M1).
pub(crate) fn classify_common(
    status: u16,
    headers: &HeaderMap,
    body_is_api: bool,
) -> Option<ShopError> {
    let retry = retry_after(headers);
    let err = match status {
        300..=399 => {
            let to = headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url::Url::parse(l).ok())
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_else(|| "elsewhere".to_string());
            ShopError::new(
                FailureKind::HttpStatus,
                format!(
                    "HTTP {status}: the shop redirects to {to}; not followed with credentials: register the shop with the URL it redirects to"
                ),
            )
        }
        429 => ShopError::new(
            FailureKind::RateLimited,
            match retry {
                Some(d) => format!("HTTP 429 Too Many Requests (retry after {}s)", d.as_secs()),
                None => "HTTP 429 Too Many Requests".to_string(),
            },
        ),
        503 if !body_is_api => ShopError::new(
            FailureKind::Maintenance,
            "HTTP 503 with a non-API page: the shop is in maintenance mode (or overloaded)",
        ),
        _ => return None,
    };
    Some(err.with_status(status).with_retry_after(retry))
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A tiny HTTP/1.1 server for client tests: each connection gets one
    //! canned answer chosen by a function of the request, then is closed.

    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A request as received.
    #[derive(Debug, Clone)]
    pub struct Req {
        pub method: String,
        /// Path and query as sent.
        pub target: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Req {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// What the server does with a request.
    pub enum Answer {
        /// These bytes, then close.
        Raw(Vec<u8>),
        /// Never answer (for timeouts).
        Hang,
    }

    /// A complete response with a correct Content-Length.
    pub fn response(
        status: &str,
        content_type: &str,
        extra: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut s = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in extra {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.push_str(body);
        Answer::Raw(s.into_bytes())
    }

    pub fn json(status: &str, body: &str) -> Answer {
        response(status, "application/json; charset=utf-8", &[], body)
    }

    pub fn html(status: &str) -> Answer {
        response(
            status,
            "text/html; charset=UTF-8",
            &[],
            "<!doctype html>\n<html><head><title>Shop</title></head><body>Welcome&nbsp;<br></body></html>",
        )
    }

    pub type Log = Arc<Mutex<Vec<Req>>>;

    /// Starts the server; returns its address and the log of requests.
    pub async fn serve<F>(route: F) -> (SocketAddr, Log)
    where
        F: Fn(&Req, usize) -> Answer + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let route = Arc::new(route);
        let log2 = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let route = route.clone();
                let log = log2.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    let n = {
                        let mut l = log.lock().unwrap();
                        l.push(req.clone());
                        l.len() - 1
                    };
                    match route(&req, n) {
                        Answer::Raw(bytes) => {
                            let _ = sock.write_all(&bytes).await;
                            let _ = sock.shutdown().await;
                        }
                        Answer::Hang => {
                            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        }
                    }
                });
            }
        });
        (addr, log)
    }

    async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Req> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let target = first.next()?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = sock.read(&mut tmp).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..n]);
        }
        Some(Req {
            method,
            target,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn shapes() {
        assert_eq!(shape(b"  {\"a\":1}"), Shape::Json);
        assert_eq!(shape(b"\n<!DOCTYPE html>"), Shape::Markup);
        assert_eq!(shape(b"   "), Shape::Empty);
        assert_eq!(shape(b"Service Unavailable"), Shape::Other);
        let h = HeaderMap::new();
        assert!(is_html(&h, b"\n<!DOCTYPE html><html>"));
        assert!(is_html(&h, b"<HTML><BODY>x"));
        assert!(!is_html(&h, b"<?xml version=\"1.0\"?><methodResponse>"));
    }
}
