//! Byte-slice entry points into the parsers that read untrusted input, for
//! the property tests (`tests/props/`) and the cargo-fuzz targets
//! (`fuzz/`). Not an API: it exists so that the parsers can stay private.
//!
//! Every `check_*` function feeds one input to the real code and asserts the
//! properties that must hold for *any* input (it panics when one does not,
//! which is what a fuzzer reports): no panic inside the parser, errors that
//! say something and stay short, and the semantic properties of each
//! format (round trips, order independence).

use crate::config::{self, Config};
use crate::magento::m2::{self, Answer};
use crate::magento::{oauth, xmlrpc};
use bytes::Bytes;
use reqwest::header::HeaderMap;
use std::sync::Arc;
use std::time::Duration;

/// Longest error text any decoder may produce for hostile input (errors
/// quote excerpts, never whole documents).
pub const MAX_ERROR_TEXT: usize = 1024;

// ------------------------------------------------------------------ XML-RPC

/// True when `v` holds a double that is NaN (NaN != NaN, so round trips of
/// values holding one are compared by their encoding instead).
fn has_nan(v: &xmlrpc::Value) -> bool {
    match v {
        xmlrpc::Value::Double(d) => d.is_nan(),
        xmlrpc::Value::Struct(m) => m.iter().any(|(_, v)| has_nan(v)),
        xmlrpc::Value::Array(a) => a.iter().any(has_nan),
        _ => false,
    }
}

fn check_xmlrpc_error(e: &xmlrpc::XmlRpcError) {
    let text = e.to_string();
    assert!(!text.is_empty(), "empty XML-RPC error for {e:?}");
    assert!(
        text.len() <= MAX_ERROR_TEXT,
        "XML-RPC error text of {} bytes: {}…",
        text.len(),
        text.chars().take(200).collect::<String>()
    );
}

/// `value` survives encoding as a response and decoding again.
pub fn check_xmlrpc_round_trip(value: &xmlrpc::Value) {
    let doc = xmlrpc::encode_response(value);
    match xmlrpc::decode_response(doc.as_bytes()) {
        Ok(Ok(back)) => {
            if has_nan(value) {
                assert_eq!(xmlrpc::encode_response(&back), doc);
            } else {
                assert_eq!(
                    &back, value,
                    "round trip changed the value; document: {doc}"
                );
            }
        }
        other => panic!("own encoding not decoded: {other:?}\ndocument: {doc}"),
    }
}

/// Decodes `data` as an XML-RPC response and as a call. Whatever decodes
/// must survive re-encoding; whatever fails must say why, briefly.
pub fn check_xmlrpc(data: &[u8]) {
    match xmlrpc::decode_response(data) {
        Ok(Ok(v)) => check_xmlrpc_round_trip(&v),
        Ok(Err(fault)) => {
            let doc = xmlrpc::encode_fault(fault.code, &fault.message);
            match xmlrpc::decode_response(doc.as_bytes()) {
                Ok(Err(back)) => assert_eq!(back, fault),
                other => panic!("own fault not decoded: {other:?}"),
            }
        }
        Err(e) => check_xmlrpc_error(&e),
    }
    match xmlrpc::decode_call(data) {
        Ok((method, params)) => {
            assert!(!method.is_empty());
            // A call with nil is decoded (a server must read what clients
            // send) but never encoded.
            if let Ok(doc) = xmlrpc::encode_call(&method, &params) {
                match xmlrpc::decode_call(doc.as_bytes()) {
                    Ok((m, p)) => {
                        assert_eq!(m, method);
                        if !params.iter().any(has_nan) {
                            assert_eq!(p, params);
                        }
                    }
                    Err(e) => panic!("own call not decoded: {e}\ndocument: {doc}"),
                }
            }
        }
        Err(e) => check_xmlrpc_error(&e),
    }
}

// --------------------------------------------------------------- Magento 2

/// A product listing body as the client parses it.
pub fn parse_m2_page(
    data: &[u8],
    fields: Option<&str>,
) -> Result<m2::ProductPage, crate::magento::ShopError> {
    m2::parse_page(&Bytes::copy_from_slice(data), fields)
}

/// The `fields` values the sync sends, and none.
const FIELDS: [Option<&str>; 4] = [
    None,
    Some("items[id,sku,updated_at],total_count"),
    Some("total_count"),
    Some("items[sku],total_count"),
];

fn check_shop_error(e: &crate::magento::ShopError) {
    assert!(!e.message.is_empty(), "empty shop error: {e:?}");
    assert!(
        e.message.len() <= 2 * MAX_ERROR_TEXT,
        "shop error of {} bytes: {}…",
        e.message.len(),
        e.message.chars().take(200).collect::<String>()
    );
}

/// Feeds `data` to every Magento 2 body parser: product listings (with the
/// `fields` the sync uses), error bodies under every status the classifier
/// distinguishes, and `storeConfigs`.
pub fn check_m2(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    for fields in FIELDS {
        match m2::parse_page(&body, fields) {
            Ok(page) => {
                assert_eq!(page.body_bytes, data.len());
                for item in &page.items {
                    // The raw item is the exact JSON the shop sent.
                    assert!(
                        serde_json::from_str::<serde::de::IgnoredAny>(item.raw.get()).is_ok(),
                        "raw item is not JSON"
                    );
                }
            }
            Err(e) => check_shop_error(&e),
        }
    }
    if let Some(m) = m2::magento_message(data) {
        // MAX_MESSAGE bytes plus the ellipsis.
        assert!(m.len() <= 503, "message of {} bytes", m.len());
    }
    if let Err(e) = m2::check_store_configs(data) {
        check_shop_error(&e);
    }
    for status in [200, 400, 401, 404, 429, 500, 503] {
        let a = Answer {
            status,
            headers: HeaderMap::new(),
            body: body.clone(),
            redirected: status == 401,
            // A constant that parses: the expect cannot fire.
            url: url::Url::parse("http://127.0.0.1/rest/default/V1/products")
                .expect("a constant, valid URL"),
        };
        if let Err(e) = m2::classify(&a) {
            check_shop_error(&e);
            assert_eq!(e.status, Some(status));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = m2::fill_placeholders(text, None);
    }
}

// -------------------------------------------------------------------- OAuth

/// Checks the shape of a base string after its method: only RFC 3986
/// unreserved characters, `%XX` escapes with upper-case hex, and the two
/// `&` separators.
pub fn check_base_string_encoding(base: &str, method: &str) {
    let upper = method.to_ascii_uppercase();
    let rest = base
        .strip_prefix(upper.as_str())
        .and_then(|r| r.strip_prefix('&'))
        .unwrap_or_else(|| panic!("base string does not start with {upper:?}&: {base:?}"));
    assert_eq!(rest.matches('&').count(), 1, "not two parts: {rest:?}");
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'&' => i += 1,
            b'%' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                assert!(
                    i + 2 < b.len() && hex(b[i + 1]) && hex(b[i + 2]),
                    "bad escape at {i} in {rest:?}"
                );
                i += 3;
            }
            c => panic!("reserved byte {c:#04x} unencoded at {i} in {rest:?}"),
        }
    }
}

/// The query of `url` with its `&`-separated pieces stably sorted by name
/// (the relative order of a repeated name, which decides its value, kept).
fn reorder_query(url: &url::Url) -> url::Url {
    let mut u = url.clone();
    if let Some(q) = url.query() {
        let mut pieces: Vec<&str> = q.split('&').collect();
        // By decoded name: `a` and `%61` are the same parameter.
        pieces.sort_by_key(|p| {
            percent_encoding::percent_decode_str(p.split('=').next().unwrap_or(""))
                .collect::<Vec<u8>>()
        });
        u.set_query(Some(&pieces.join("&")));
    }
    u
}

/// Splits fuzz input into lines: method, URL, then `name=value` OAuth
/// parameters; checks the base string (encoding, independence of the order
/// of the parameters and of the query), header parsing of arbitrary text,
/// and that a signed header parses back and verifies.
pub fn check_oauth(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = oauth::parse_authorization(&text);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("GET");
    let Some(Ok(url)) = lines.next().map(url::Url::parse) else {
        return;
    };
    let params: Vec<(String, String)> = lines
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    // PHP arrays: a repeated OAuth name is ambiguous; keep names unique so
    // that any order is the same request.
    let mut unique: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        if !unique.iter().any(|(u, _)| *u == k) {
            unique.push((k, v));
        }
    }
    let base = oauth::base_string(method, &url, &unique);
    check_base_string_encoding(&base, method);
    let mut reversed = unique.clone();
    reversed.reverse();
    assert_eq!(
        oauth::base_string(method, &url, &reversed),
        base,
        "the order of the OAuth parameters changed the base string"
    );
    assert_eq!(
        oauth::base_string(method, &reorder_query(&url), &unique),
        base,
        "the order of the query changed the base string"
    );
    // Sign with the first two parameters as key and token, then read the
    // header back the way the simulator does.
    let get = |i: usize| unique.get(i).map_or("", |(_, v)| v.as_str());
    let (ck, cs, tok, ts, nonce) = (get(0), get(1), get(2), get(3), get(4));
    let header = oauth::authorization_header(method, &url, ck, cs, tok, ts, 1_700_000_000, nonce);
    if header.len() <= oauth::MAX_HEADER {
        let p = oauth::parse_authorization(&header)
            .unwrap_or_else(|e| panic!("own header refused: {e}: {header}"));
        assert_eq!(
            (p.consumer_key.as_str(), p.token.as_str(), p.nonce.as_str()),
            (ck, tok, nonce)
        );
        assert!(
            oauth::verify(method, &url, &p, cs, ts),
            "own signature does not verify"
        );
    }
}

// ------------------------------------------------------------------- config

/// Splits fuzz input into the TOML text (up to the first NUL byte) and
/// environment lines after it (`SECTION__KEY=value`, prefixed with
/// `COBBYD__`).
pub fn split_config_input(data: &[u8]) -> (String, Vec<(String, String)>) {
    let (toml_part, env_part) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let env = String::from_utf8_lossy(env_part)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("COBBYD__{}", k.trim()), v.to_string()))
        .collect();
    (String::from_utf8_lossy(toml_part).into_owned(), env)
}

/// Loads a config from text and environment. An error names its source
/// and key; a config that loads serialises to TOML that loads to the same
/// config.
pub fn check_config_text(text: &str, env: Vec<(String, String)>) -> Option<Config> {
    match config::parse("fuzz.toml", Some(text), env) {
        Ok(c) => {
            let again = toml::to_string(&c).unwrap_or_else(|e| panic!("cannot serialise: {e}"));
            match config::parse("again.toml", Some(&again), Vec::new()) {
                Ok(back) => assert_eq!(back, c, "config changed by a round trip:\n{again}"),
                Err(e) => panic!("own config refused: {e}\n{again}"),
            }
            Some(c)
        }
        Err(e) => {
            assert!(
                e.source_name == "fuzz.toml" || e.source_name.starts_with("environment COBBYD__"),
                "error without its source: {e:?}"
            );
            assert!(
                !e.key.is_empty() && !e.problem.is_empty(),
                "vague error: {e:?}"
            );
            None
        }
    }
}

/// [`check_config_text`] on fuzz input split by [`split_config_input`].
pub fn check_config(data: &[u8]) {
    let (text, env) = split_config_input(data);
    check_config_text(&text, env);
}

// ---------------------------------------------------------- control socket

/// A daemon's control API over an in-memory connection: the real router and
/// the real connection code (`crate::server::serve_standalone`), a store
/// in a temporary directory, no scheduler. Each request gets a fresh
/// registry (shops it added are removed afterwards).
pub struct ControlHarness {
    rt: tokio::runtime::Runtime,
    daemon: Arc<crate::daemon::Daemon>,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

/// An HTTP answer as read back from the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes after the head (as sent: possibly chunked).
    pub rest: Vec<u8>,
}

/// Parses the head of the first answer in `bytes`; `None` for no bytes.
/// Panics when the bytes are not an HTTP/1.x answer.
pub fn parse_answer(bytes: &[u8]) -> Option<RawAnswer> {
    if bytes.is_empty() {
        return None;
    }
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("answer without an end of head: {:?}", excerpt(bytes)));
    let head = std::str::from_utf8(&bytes[..end])
        .unwrap_or_else(|_| panic!("answer head not UTF-8: {:?}", excerpt(bytes)));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        // An HTTP/1.0 request is answered in HTTP/1.0.
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.x status line: {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Some(RawAnswer {
        status,
        headers,
        rest: bytes[end + 4..].to_vec(),
    })
}

fn excerpt(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl ControlHarness {
    /// A daemon in `Running` over a fresh store. Probes time out after 2 s
    /// (the fuzzer must not wait on unreachable hosts for long).
    pub fn new() -> std::io::Result<ControlHarness> {
        let dir = tempfile::tempdir()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut cfg = Config::default();
        cfg.daemon.state_dir = dir.path().join("state");
        cfg.daemon.socket = dir.path().join("sock");
        cfg.probe.timeout = Duration::from_secs(2);
        let cfg = Arc::new(cfg);
        let store = crate::store::Store::open(&cfg.daemon.state_dir, 8)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let daemon = rt.block_on(async {
            store.spawn_flusher();
            crate::daemon::Daemon::build(cfg, None, None, store)
        });
        let daemon = daemon.map_err(|e| std::io::Error::other(e.to_string()))?;
        daemon.set_phase(crate::daemon::Phase::Running);
        let router = crate::routes::router(daemon.clone());
        Ok(ControlHarness {
            rt,
            daemon,
            router,
            _dir: dir,
        })
    }

    /// The daemon behind the API.
    pub fn daemon(&self) -> &crate::daemon::Daemon {
        &self.daemon
    }

    /// Writes `request` into a new connection, closes the writing side,
    /// and returns every byte the server wrote before it closed (or
    /// `None` when it did not close within 30 s: a hang).
    pub fn exchange(&self, request: &[u8]) -> Option<Vec<u8>> {
        self.exchange_keep(request, false)
    }

    /// [`Self::exchange`]; with `keep` the shops the request added stay.
    pub fn exchange_keep(&self, request: &[u8], keep: bool) -> Option<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let out = self.rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let conn = tokio::spawn(crate::server::serve_standalone(server, self.router.clone()));
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let req = request.to_vec();
            let write = async move {
                // The server may stop reading (an error, a 413): a failed
                // write is then expected.
                let _ = wr.write_all(&req).await;
                let _ = wr.shutdown().await;
            };
            let read = async move {
                let mut buf = Vec::new();
                let _ = rd.read_to_end(&mut buf).await;
                buf
            };
            let (_, buf) =
                tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
                    .await
                    .ok()?;
            let _ = conn.await;
            Some(buf)
        });
        if !keep {
            self.reset();
        }
        out
    }

    /// Removes every shop and its jobs, health and mirror.
    pub fn reset(&self) {
        let d = &self.daemon;
        // As `shop remove --purge` does it.
        for name in d.registry.names() {
            d.registry.forget(&name);
            let _ = d.queue.unregister(&name, true);
            d.health.forget(&name);
            let _ = d.store.finish_removal_blocking(&name, true);
        }
    }
}

/// True when `request` starts with something shaped like a request line
/// (after the empty lines HTTP allows before it): three words, the last
/// `HTTP/1.x`. Anything else is garbage that must get a 4xx or a close.
pub fn has_request_line(request: &[u8]) -> bool {
    let start = request
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(request.len());
    let request = &request[start..];
    let Some(end) = request.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = request[..end]
        .strip_suffix(b"\r")
        .unwrap_or(&request[..end]);
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = line.split(' ');
    let (Some(m), Some(t), Some(v), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !m.is_empty() && !t.is_empty() && (v == "HTTP/1.1" || v == "HTTP/1.0")
}

/// Sends raw bytes into the control connection: the answer (if any) must be
/// a well-formed HTTP/1.1 answer, never a 500 and never a hang; bytes that
/// do not even start with a request line get a 4xx or a clean close.
pub fn check_control(h: &ControlHarness, request: &[u8]) {
    let bytes = h
        .exchange(request)
        .unwrap_or_else(|| panic!("no answer and no close within 30 s"));
    let Some(answer) = parse_answer(&bytes) else {
        return;
    };
    assert!(
        answer.status != 500,
        "500 for {:?}: {:?}",
        excerpt(request),
        excerpt(&answer.rest)
    );
    if !has_request_line(request) {
        assert!(
            (400..500).contains(&answer.status),
            "{} for garbage {:?}",
            answer.status,
            excerpt(request)
        );
    }
}
