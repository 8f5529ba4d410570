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

/// Longest `Retry-After` read (a bound against overflow only): what is
/// honoured is capped by the caller (the probe's `backoff_max`, the sync's
/// `sync::MAX_RETRY_AFTER`), which can then say what the shop asked for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The longest the TCP+TLS connection setup may take, within the request
/// timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A client with TLS verification on (rustls, webpki roots plus the shop's
/// `tls_ca_file` if it has one), a timeout on every request, a bounded
/// connect time, and the redirect policy of [`follow_redirect`].
///
/// Shops without a CA file share one client per distinct timeout; a shop
/// with one gets its own (its root store differs), built from the file as
/// it is now.
pub(crate) fn build_client(opts: &ClientOptions) -> Result<reqwest::Client, ShopError> {
    if opts.tls_ca_file.is_some() {
        return new_client(opts);
    }
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

/// Whether to follow a redirect from `previous` (the chain so far, the
/// shop's own URL first) to `next`. Every request carries credentials (an
/// `Authorization` header on Magento 2, the API user and key in the body
/// of an M1 `login`, which a 307/308 would send again), so a redirect is
/// followed only when it stays on the first URL's host: the same origin,
/// or an upgrade of the first URL's `http` to `https` on that host. Never
/// to another host or port, never from https back to http, at most
/// [`MAX_REDIRECTS`] times. A redirect not followed comes back to the
/// client as the 3xx answer, which [`classify_common`] explains.
pub(crate) fn follow_redirect(previous: &[url::Url], next: &url::Url) -> Redirect {
    let Some(first) = previous.first() else {
        return Redirect::Follow;
    };
    if previous.len() > MAX_REDIRECTS {
        return Redirect::TooMany;
    }
    let same_host = next.host_str() == first.host_str();
    let same_origin = same_host
        && next.scheme() == first.scheme()
        && next.port_or_known_default() == first.port_or_known_default();
    let upgrade = same_host
        && first.scheme() == "http"
        && next.scheme() == "https"
        && next.port_or_known_default() == Some(443)
        && first.port_or_known_default() == Some(80);
    let downgrade = previous
        .iter()
        .any(|u| u.scheme() == "https" && next.scheme() != "https");
    if (same_origin || upgrade) && !downgrade {
        Redirect::Follow
    } else {
        Redirect::Stop
    }
}

/// What [`follow_redirect`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirect {
    Follow,
    /// Not followed: the 3xx answer is the result.
    Stop,
    TooMany,
}

fn new_client(opts: &ClientOptions) -> Result<reqwest::Client, ShopError> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        match follow_redirect(attempt.previous(), attempt.url()) {
            Redirect::Follow => attempt.follow(),
            Redirect::Stop => attempt.stop(),
            Redirect::TooMany => {
                let msg = format!("more than {MAX_REDIRECTS} redirects");
                attempt.error(msg)
            }
        }
    });
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(opts.timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(opts.timeout))
        .redirect(policy)
        .user_agent(concat!("cobbyd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &opts.tls_ca_file {
        let certs = crate::tls::load_ca_file(path).map_err(|e| {
            ShopError::new(
                FailureKind::Tls,
                format!(
                    "{e} (the shop's --tls-ca-file; to change it, remove and add the shop again)"
                ),
            )
        })?;
        for der in certs {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| {
                ShopError::new(
                    FailureKind::Tls,
                    format!("the CA file {}: {e}", path.display()),
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| {
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
            format!("TLS with {host} failed: {detail}{}", tls_explanation(&all)),
        );
    }
    ShopError::new(
        FailureKind::Connect,
        format!("cannot connect to {host}: {detail}"),
    )
}

/// Plain words for the certificate failures operators meet most, from
/// rustls' error text (lower-cased).
fn tls_explanation(all: &str) -> &'static str {
    if all.contains("unknownissuer") || all.contains("unknown issuer") {
        " (the certificate is not signed by a CA cobbyd trusts: a self-signed certificate or a private CA; trust it with `shop add --tls-ca-file`)"
    } else if all.contains("notvalidforname") || all.contains("not valid for name") {
        " (the certificate is made out to another host name: use the host name it names in the shop URL)"
    } else if all.contains("expired") {
        " (the certificate has expired, or this server's clock is wrong)"
    } else {
        ""
    }
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
/// whether the body is in the API's own format (JSON for M2, XML-RPC for M1);
/// `url` is the URL that gave this answer.
pub(crate) fn classify_common(
    status: u16,
    headers: &HeaderMap,
    body_is_api: bool,
    url: &url::Url,
) -> Option<ShopError> {
    let retry = retry_after(headers);
    let err = match status {
        300..=399 => ShopError::new(
            FailureKind::HttpStatus,
            redirect_message(status, headers, url),
        ),
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

/// Why a 3xx answer reached the client (the redirect policy did not follow
/// it) and what to do. Names the target's origin only, never its path or
/// query.
fn redirect_message(status: u16, headers: &HeaderMap, from: &url::Url) -> String {
    let location = headers.get(LOCATION).and_then(|v| v.to_str().ok());
    let Some(location) = location else {
        return format!(
            "HTTP {status} without a Location header: the shop URL does not lead to the API; check the shop URL"
        );
    };
    let Ok(to) = from.join(location) else {
        return format!(
            "HTTP {status} with an unusable Location header: the shop URL does not lead to the API; check the shop URL"
        );
    };
    let origin = to.origin().ascii_serialization();
    let host = to.host_str().unwrap_or("?");
    if to.host_str() != from.host_str() {
        format!(
            "HTTP {status}: the shop redirected to another host ({host}); cobbyd does not follow cross-host redirects (the request carries credentials): fix the shop URL (use the final URL, {origin})"
        )
    } else if from.scheme() == "https" && to.scheme() != "https" {
        format!(
            "HTTP {status}: the shop redirected from https to plain http ({origin}); cobbyd never downgrades: fix the shop's redirect, or its URL"
        )
    } else {
        format!(
            "HTTP {status}: the shop redirected to {origin}, another port or scheme than the shop URL; cobbyd follows redirects only on the shop URL's own origin (or http to https on the default ports): fix the shop URL (use the final URL, {origin})"
        )
    }
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
        assert_eq!(
            parse_retry_after("999999999", now),
            Some(Duration::from_secs(999_999_999))
        );
        assert_eq!(
            parse_retry_after("99999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn redirects_stay_on_the_shop_host() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        let shop = [u("https://shop.example/rest/V1/x")];
        let f = |prev: &[url::Url], next: &str| follow_redirect(prev, &u(next));
        assert_eq!(
            f(&shop, "https://shop.example/index.php/rest/V1/x"),
            Redirect::Follow
        );
        assert_eq!(
            f(&shop, "https://www.shop.example/rest/V1/x"),
            Redirect::Stop
        );
        assert_eq!(
            f(&shop, "https://shop.example:8443/rest/V1/x"),
            Redirect::Stop
        );
        assert_eq!(f(&shop, "http://shop.example/rest/V1/x"), Redirect::Stop);
        let plain = [u("http://shop.example/rest/V1/x")];
        assert_eq!(
            f(&plain, "https://shop.example/rest/V1/x"),
            Redirect::Follow
        );
        assert_eq!(f(&plain, "https://evil.example/rest/V1/x"), Redirect::Stop);
        assert_eq!(f(&plain, "https://shop.example:8443/x"), Redirect::Stop);
        // Upgraded once, never back down.
        let upgraded = [u("http://shop.example/x"), u("https://shop.example/x")];
        assert_eq!(f(&upgraded, "http://shop.example/y"), Redirect::Stop);
        let long: Vec<url::Url> = (0..=MAX_REDIRECTS).map(|_| shop[0].clone()).collect();
        assert_eq!(f(&long, "https://shop.example/y"), Redirect::TooMany);
    }

    #[test]
    fn redirect_messages_name_the_origin_and_the_fix() {
        let from = url::Url::parse("https://shop.example/rest/V1/x").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            LOCATION,
            "https://www.shop.example/rest/V1/x?secret=1"
                .parse()
                .unwrap(),
        );
        let m = redirect_message(301, &h, &from);
        assert!(m.contains("another host (www.shop.example)"), "{m}");
        assert!(
            m.contains("use the final URL, https://www.shop.example"),
            "{m}"
        );
        assert!(!m.contains("secret"), "{m}");
        h.insert(LOCATION, "http://shop.example/rest/V1/x".parse().unwrap());
        assert!(redirect_message(302, &h, &from).contains("never downgrades"));
        h.insert(LOCATION, "/elsewhere".parse().unwrap());
        assert!(redirect_message(302, &h, &from).contains("https://shop.example"));
        assert!(redirect_message(302, &HeaderMap::new(), &from).contains("without a Location"));
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
