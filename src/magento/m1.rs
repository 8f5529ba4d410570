//! The Magento 1 (OpenMage) XML-RPC client: one API session per shop,
//! renewed transparently when the shop expires it (fault 5), the endpoint
//! found under `/api/xmlrpc/` or `/index.php/api/xmlrpc/`, and every fault
//! and HTTP answer classified into a [`ShopError`].
//!
//! The session id is a credential: it is kept as a [`Secret`] and never
//! logged, like the API key.

use super::http;
use super::xmlrpc::{self, Fault, Value, XmlRpcError};
use super::{ClientOptions, FailureKind, ProbeInfo, ShopError};
use crate::logging;
use crate::secret::Secret;
use crate::shop::{Credentials, Platform, ShopRecord};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, DATE, HeaderMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Instant;
use tracing::{debug, warn};

/// The two places the XML-RPC endpoint lives: with URL rewrites, and without.
const ENDPOINTS: [&str; 2] = ["api/xmlrpc/", "index.php/api/xmlrpc/"];

/// Longest fault text kept in an error.
const MAX_MESSAGE: usize = 500;

/// Longest session id accepted from `login`. Magento's are 32 hex
/// characters; the id is sent again with every call, so a shop (or a proxy)
/// answering something huge would multiply every request by it.
pub const MAX_SESSION_ID: usize = 256;

/// Magento's "Session expired. Try to relogin." fault.
const FAULT_SESSION_EXPIRED: i64 = 5;

struct Inner {
    shop: String,
    http: reqwest::Client,
    /// Shop URL without trailing slash.
    base: String,
    api_user: String,
    api_key: Secret,
    opts: ClientOptions,
    /// 0 while unknown, else 1 + index into [`ENDPOINTS`].
    endpoint: AtomicUsize,
    /// The API session, shared by all clones; held while logging in so that
    /// concurrent calls wait for one login instead of making their own.
    session: tokio::sync::Mutex<Option<Secret>>,
    /// Newest `Date` header of an answer, in Unix seconds (0: none yet).
    last_date: AtomicI64,
}

/// A Magento 1 shop. Cheap to clone (one `Arc`); clones share the session.
#[derive(Clone)]
pub struct M1Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for M1Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("M1Client")
            .field("shop", &self.inner.shop)
            .field("base", &self.inner.base)
            .field("api_user", &self.inner.api_user)
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

/// A decoded answer: the whole value, or an array streamed to a visitor.
enum Answered {
    Whole(Value),
    Streamed,
}

/// What [`M1Client::with_session`] hands back: the value, or (streaming)
/// the value when it was not an array.
trait Streamed {
    fn from_answer(a: Answered) -> Self;
}

impl Streamed for Value {
    fn from_answer(a: Answered) -> Self {
        match a {
            Answered::Whole(v) => v,
            // Only a call without a visitor yields this, and it never
            // streams.
            Answered::Streamed => Value::Nil,
        }
    }
}

impl Streamed for Option<Value> {
    fn from_answer(a: Answered) -> Self {
        match a {
            Answered::Whole(v) => Some(v),
            Answered::Streamed => None,
        }
    }
}

/// One HTTP exchange, before classification.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    /// The URL that gave the answer.
    url: url::Url,
}

impl M1Client {
    /// A client for the shop at `base_url` (`shop` names it in logs).
    pub fn new(
        shop: &str,
        base_url: &str,
        api_user: &str,
        api_key: Secret,
        opts: &ClientOptions,
    ) -> Result<Self, ShopError> {
        let base = http::base_url(base_url)?;
        Ok(M1Client {
            inner: Arc::new(Inner {
                shop: shop.to_string(),
                http: http::build_client(opts)?,
                base,
                api_user: api_user.to_string(),
                api_key,
                opts: opts.clone(),
                endpoint: AtomicUsize::new(0),
                session: tokio::sync::Mutex::new(None),
                last_date: AtomicI64::new(0),
            }),
        })
    }

    /// A client for a registered Magento 1 shop.
    pub fn from_record(rec: &ShopRecord, opts: &ClientOptions) -> Result<Self, ShopError> {
        match (&rec.platform, &rec.credentials) {
            (Platform::Magento1, Credentials::M1 { api_user, api_key }) => {
                let opts = ClientOptions {
                    tls_ca_file: rec.tls_ca_file.clone(),
                    ..opts.clone()
                };
                M1Client::new(&rec.name, &rec.url, api_user, api_key.clone(), &opts)
            }
            _ => Err(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "shop {} is not a Magento 1 shop with Magento 1 credentials",
                    rec.name
                ),
            )),
        }
    }

    /// The endpoint URL, once a request has shown which one the shop routes.
    pub fn endpoint(&self) -> Option<String> {
        match self.inner.endpoint.load(Ordering::Relaxed) {
            // Only 1 and 2 are ever stored.
            i @ (1 | 2) => Some(format!("{}/{}", self.inner.base, ENDPOINTS[i - 1])),
            _ => None,
        }
    }

    /// The shop's clock as of the newest answer received so far (its `Date`
    /// header, to the second), if any answer carried one. Every request sent
    /// after this call reaches the shop at this time or later.
    pub fn shop_clock(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.inner.last_date.load(Ordering::Relaxed) {
            0 => None,
            secs => chrono::DateTime::from_timestamp(secs, 0),
        }
    }

    /// Proves the shop answers and accepts the API user: logs in when there
    /// is no session yet, asks `core_magento.info` for the version, then
    /// proves the catalog permission the sync needs with a one-id
    /// `catalog_product.list` (a role without it faults 2 there, not at
    /// login).
    pub async fn probe(&self) -> Result<ProbeInfo, ShopError> {
        let info = self.call("core_magento.info", Vec::new()).await?;
        let one_id = Value::Struct(vec![(
            "product_id".into(),
            Value::Struct(vec![
                ("from".into(), Value::Int(1)),
                ("to".into(), Value::Int(1)),
            ]),
        )]);
        self.list_products(one_id, None).await?;
        let version = ["magento_edition", "magento_version"]
            .iter()
            .filter_map(|k| info.get(k).and_then(Value::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(ProbeInfo {
            version: (!version.is_empty()).then_some(version),
            product_count: None,
            api_base: self
                .endpoint()
                .unwrap_or_else(|| format!("{}/{}", self.inner.base, ENDPOINTS[0])),
        })
    }

    /// `call(session, method, args)`. A fault is classified (fault 2 names
    /// the method whose resource the role lacks); an expired session is
    /// renewed once and the call repeated.
    pub async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, ShopError> {
        let args = Value::Array(args);
        self.with_session(
            "call",
            method,
            |sid| vec![Value::str(sid), Value::str(method), args.clone()],
            None,
        )
        .await
    }

    /// `multiCall(session, [[method, args], ...])`: one result per call, in
    /// order; a call that failed comes back as its [`Fault`] (the other calls
    /// still ran).
    pub async fn multi_call(
        &self,
        calls: Vec<(String, Vec<Value>)>,
    ) -> Result<Vec<Result<Value, Fault>>, ShopError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let n = calls.len();
        let payload = Value::Array(
            calls
                .into_iter()
                .map(|(m, args)| Value::Array(vec![Value::String(m), Value::Array(args)]))
                .collect(),
        );
        let answer = self
            .with_session(
                "multiCall",
                "multiCall",
                |sid| vec![Value::str(sid), payload.clone()],
                None,
            )
            .await?;
        match answer {
            Value::Array(items) if items.len() == n => Ok(items
                .into_iter()
                .map(|item| match Fault::from_value(&item) {
                    Some(f) => Err(f),
                    None => Ok(item),
                })
                .collect()),
            Value::Array(items) => Err(ShopError::new(
                FailureKind::Protocol,
                format!("multiCall answered {} results for {n} calls", items.len()),
            )),
            _ => Err(ShopError::new(
                FailureKind::Protocol,
                "multiCall did not answer a list",
            )),
        }
    }

    /// [`M1Client::multi_call`] without the whole answer in memory: each
    /// call's result goes to `f` as soon as it is decoded (in order), so
    /// only the answer's bytes and one result's tree are held at once. More
    /// results than calls stop the decoding; fewer are refused afterwards.
    pub async fn multi_call_each(
        &self,
        calls: Vec<(String, Vec<Value>)>,
        f: &mut (dyn FnMut(Result<Value, Fault>) + Send),
    ) -> Result<(), ShopError> {
        if calls.is_empty() {
            return Ok(());
        }
        let n = calls.len();
        let payload = Value::Array(
            calls
                .into_iter()
                .map(|(m, args)| Value::Array(vec![Value::String(m), Value::Array(args)]))
                .collect(),
        );
        let mut seen = 0usize;
        let mut each = |item: Value| {
            seen += 1;
            if seen > n {
                return Err(XmlRpcError::Refused(format!(
                    "multiCall answered more than {n} results for {n} calls"
                )));
            }
            f(match Fault::from_value(&item) {
                Some(fault) => Err(fault),
                None => Ok(item),
            });
            Ok(())
        };
        let answer = self
            .with_session(
                "multiCall",
                "multiCall",
                |sid| vec![Value::str(sid), payload.clone()],
                Some(&mut each),
            )
            .await?;
        match answer {
            None if seen == n => Ok(()),
            None => Err(ShopError::new(
                FailureKind::Protocol,
                format!("multiCall answered {seen} results for {n} calls"),
            )),
            Some(_) => Err(ShopError::new(
                FailureKind::Protocol,
                "multiCall did not answer a list",
            )),
        }
    }

    /// [`M1Client::list_products`] without the whole answer in memory: each
    /// listed product goes to `f` as it is decoded; `f` may stop the
    /// decoding (too many products, say) with an error.
    pub async fn list_products_each(
        &self,
        filters: Value,
        store: Option<&str>,
        f: &mut (dyn FnMut(Value) -> Result<(), XmlRpcError> + Send),
    ) -> Result<(), ShopError> {
        let mut args = vec![filters];
        if let Some(s) = store {
            args.push(Value::str(s));
        }
        let args = Value::Array(args);
        let method = "catalog_product.list";
        match self
            .with_session(
                "call",
                method,
                |sid| vec![Value::str(sid), Value::str(method), args.clone()],
                Some(f),
            )
            .await?
        {
            None => Ok(()),
            Some(_) => Err(ShopError::new(
                FailureKind::Protocol,
                "catalog_product.list did not answer a list",
            )),
        }
    }

    /// Ends the session at the shop (best effort) and forgets it.
    pub async fn end_session(&self) {
        let Some(sid) = self.inner.session.lock().await.take() else {
            return;
        };
        let r = self
            .post("endSession", vec![Value::str(sid.expose())], None)
            .await;
        debug!(shop = %self.inner.shop, ok = matches!(r, Ok(Ok(_))), "magento1 session ended");
    }

    /// `catalog_product.list(filters[, store])`: every matching product (no
    /// paging: narrow large catalogs with a `product_id` range filter).
    /// Pass `Value::Struct(vec![])` for no filter (nil is never sent).
    pub async fn list_products(
        &self,
        filters: Value,
        store: Option<&str>,
    ) -> Result<Vec<Value>, ShopError> {
        let mut args = vec![filters];
        if let Some(s) = store {
            args.push(Value::str(s));
        }
        match self.call("catalog_product.list", args).await? {
            Value::Array(items) => Ok(items),
            _ => Err(ShopError::new(
                FailureKind::Protocol,
                "catalog_product.list did not answer a list",
            )),
        }
    }

    /// The current session, logging in when there is none.
    async fn session(&self) -> Result<Secret, ShopError> {
        let mut guard = self.inner.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = self.login().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Forgets `stale` unless another task already replaced it.
    async fn forget(&self, stale: &Secret) {
        let mut guard = self.inner.session.lock().await;
        if guard.as_ref() == Some(stale) {
            *guard = None;
        }
    }

    async fn login(&self) -> Result<Secret, ShopError> {
        let params = vec![
            Value::str(self.inner.api_user.as_str()),
            Value::str(self.inner.api_key.expose()),
        ];
        match self
            .post("login", params, None)
            .await?
            .map(<Value as Streamed>::from_answer)
        {
            Ok(Value::String(s)) if s.len() > MAX_SESSION_ID => Err(ShopError::new(
                FailureKind::Protocol,
                format!(
                    "login answered a session id of {} bytes; Magento's are 32 hex characters (at most {MAX_SESSION_ID} are accepted): something between cobbyd and the shop (a proxy, a PHP warning, a broken API module) rewrites the answer; check the shop's API with `curl` and its logs",
                    s.len()
                ),
            )),
            Ok(Value::String(s)) if !s.trim().is_empty() => {
                debug!(shop = %self.inner.shop, "magento1 logged in");
                Ok(Secret::new(s))
            }
            Ok(_) => Err(ShopError::new(
                FailureKind::Protocol,
                "login did not answer a session id",
            )),
            Err(f) if f.code == 2 => Err(ShopError::new(
                FailureKind::Unauthorized,
                format!(
                    "Access denied: API user name or key wrong, or the user was deleted (fault 2: {})",
                    truncate(&f.message)
                ),
            )),
            Err(f) => Err(map_fault("login", &f)),
        }
    }

    /// Runs `rpc` (`call` or `multiCall`), whose first parameter is the
    /// session; on fault 5 logs in again once and repeats it. `label` names
    /// the API method in errors.
    async fn with_session<'e, R: Streamed>(
        &self,
        rpc: &str,
        label: &str,
        build: impl Fn(&str) -> Vec<Value>,
        mut each: Option<&mut (dyn FnMut(Value) -> Result<(), XmlRpcError> + Send + 'e)>,
    ) -> Result<R, ShopError> {
        let mut expired_once = false;
        loop {
            let sid = self.session().await?;
            let answer = self
                .post(rpc, build(sid.expose()), each.as_deref_mut())
                .await?;
            match answer.map(R::from_answer) {
                Ok(v) => return Ok(v),
                Err(f) if f.code == FAULT_SESSION_EXPIRED => {
                    self.forget(&sid).await;
                    if expired_once {
                        return Err(ShopError::new(
                            FailureKind::Session,
                            format!(
                                "the session expired again right after a new login ({})",
                                truncate(&f.to_string())
                            ),
                        ));
                    }
                    debug!(shop = %self.inner.shop, "magento1 session expired; logging in again");
                    expired_once = true;
                }
                Err(f) => return Err(map_fault(label, &f)),
            }
        }
    }

    /// One XML-RPC request: the decoded answer (value or fault), or the
    /// classified failure. Finds the endpoint on the first request (plain
    /// first, `index.php/` when that answers 404 or a non-XML-RPC 2xx) and
    /// sticks to it once the API has answered.
    ///
    /// With `each`, an array answer's elements go to it as they are
    /// decoded and the value returned is `Nil` (see
    /// [`xmlrpc::decode_response_each`]); a non-array answer is returned as
    /// [`Streamed`] says.
    async fn post<'e>(
        &self,
        rpc: &str,
        params: Vec<Value>,
        mut each: Option<&mut (dyn FnMut(Value) -> Result<(), XmlRpcError> + Send + 'e)>,
    ) -> Result<Result<Answered, Fault>, ShopError> {
        let xml = xmlrpc::encode_call(rpc, &params)
            .map_err(|e| ShopError::new(FailureKind::Protocol, e.to_string()))?;
        let body = Bytes::from(xml);
        let cached = self.inner.endpoint.load(Ordering::Relaxed);
        let candidates: &[usize] = if cached == 0 { &[1, 2] } else { &[cached] };
        let mut first_failure: Option<ShopError> = None;
        for &p in candidates {
            let a = self.send(ENDPOINTS[p - 1], rpc, body.clone()).await?;
            let decoded = self.decode(&a, rpc, &params, each.as_deref_mut());
            let is_2xx = (200..300).contains(&a.status);
            // XML-RPC after a PHP notice is the API answering (badly): this
            // is the right endpoint, and the answer a protocol failure.
            let preamble = match &decoded {
                Err(_) if is_2xx => text_before_xml(&a.body),
                _ => None,
            };
            let not_here = a.status == 404
                || (is_2xx
                    && preamble.is_none()
                    && matches!(decoded, Err(XmlRpcError::NotXmlRpc { .. })));
            if let Some((what, n)) = preamble {
                self.inner.endpoint.store(p, Ordering::Relaxed);
                return Err(ShopError::new(
                    FailureKind::Protocol,
                    format!(
                        "the shop printed {what} ({n} bytes) before its XML-RPC answer: a PHP notice or warning shown to API clients (display_errors on), or a byte order mark or blank line outside <?php in one of its PHP files"
                    ),
                )
                .with_status(a.status));
            }
            if decoded.is_ok() {
                self.inner.endpoint.store(p, Ordering::Relaxed);
            } else if not_here && cached != 0 {
                // The shop's routing changed: discover again next time.
                let _ = self.inner.endpoint.compare_exchange(
                    cached,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let result = classify(&a, decoded);
            if not_here && cached == 0 {
                match first_failure.take() {
                    None => {
                        first_failure = result.err();
                        continue;
                    }
                    Some(mut first) => {
                        first
                            .message
                            .push_str(" (also tried /index.php/api/xmlrpc/)");
                        return Err(first);
                    }
                }
            }
            return result;
        }
        // Unreachable in practice: the loop returns on its last candidate.
        Err(first_failure
            .unwrap_or_else(|| ShopError::new(FailureKind::Protocol, "no endpoint to try")))
    }

    /// Decodes an answer (see [`M1Client::post`]). Bytes that are not
    /// UTF-8 are replaced by U+FFFD (see [`xmlrpc::utf8_lossy`]), and each
    /// streamed element that held some is named in a warning.
    fn decode<'e>(
        &self,
        a: &Answer,
        rpc: &str,
        params: &[Value],
        each: Option<&mut (dyn FnMut(Value) -> Result<(), XmlRpcError> + Send + 'e)>,
    ) -> Result<Result<Answered, Fault>, XmlRpcError> {
        let (text, fixes) = xmlrpc::utf8_lossy(&a.body);
        let method = match params.get(1) {
            Some(Value::String(m)) if rpc == "call" => m.as_str(),
            _ => rpc,
        };
        let Some(f) = each else {
            let r = xmlrpc::decode_response(&text).map(|r| r.map(Answered::Whole));
            if let Some(first) = fixes.first() {
                // Whole answers are the probe's and small look-ups: the
                // products the sync stores are streamed and named below.
                debug!(
                    shop = %self.inner.shop,
                    method = %logging::escape(method),
                    offset = first.offset,
                    replaced = fixes.len(),
                    "magento1 answer had bytes that are not UTF-8; read with U+FFFD in their place"
                );
            }
            return r;
        };
        let mut spans = |v: Value, span: std::ops::Range<usize>| {
            if let Some((first, bytes)) = xmlrpc::replaced_in(&fixes, span) {
                let sku = v.get("sku").and_then(Value::as_str).unwrap_or("");
                let id = v
                    .get("product_id")
                    .and_then(Value::as_i64)
                    .unwrap_or_default();
                warn!(
                    shop = %self.inner.shop,
                    method = %logging::escape(method),
                    sku = %logging::escape(sku),
                    id,
                    offset = first.offset,
                    "product {:?} (id {id}) has {bytes} byte(s) that are not UTF-8 in the answer to {}, the first at byte {} of the answer; read with U+FFFD in their place: fix the product's text in the shop (it is probably Latin-1 from an import)",
                    logging::escape(sku).as_ref(),
                    logging::escape(method),
                    first.offset
                );
            }
            f(v)
        };
        xmlrpc::decode_response_spans(&text, &mut spans)
            .map(|r| r.map(|v| v.map_or(Answered::Streamed, Answered::Whole)))
    }

    async fn send(&self, endpoint: &str, rpc: &str, body: Bytes) -> Result<Answer, ShopError> {
        let inner = &*self.inner;
        let url = format!("{}/{}", inner.base, endpoint);
        let started = Instant::now();
        let mut resp = inner
            .http
            .post(&url)
            .header(CONTENT_TYPE, "text/xml; charset=utf-8")
            .header(ACCEPT, "text/xml")
            .body(body)
            .send()
            .await
            .map_err(|e| http::classify_send_error(&e, &inner.opts))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let answered_by = resp.url().clone();
        if let Some(t) = headers
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
        {
            inner.last_date.fetch_max(t.timestamp(), Ordering::Relaxed);
        }
        let body = http::read_body(&mut resp, &inner.opts).await?;
        debug!(
            shop = %inner.shop,
            endpoint,
            rpc,
            status,
            bytes = body.len(),
            ms = started.elapsed().as_millis() as u64,
            "magento1 request"
        );
        Ok(Answer {
            status,
            headers,
            body,
            url: answered_by,
        })
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut cut = MAX_MESSAGE;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

/// What the shop printed before an XML-RPC answer (see
/// [`http::text_before_answer`]).
fn text_before_xml(body: &[u8]) -> Option<(String, usize)> {
    http::text_before_answer(body, |b| {
        b.starts_with(b"<?xml") || b.starts_with(b"<methodResponse")
    })
}

/// A fault of a call (not of login) as a [`ShopError`].
fn map_fault(method: &str, f: &Fault) -> ShopError {
    let text = truncate(&f.to_string());
    let (kind, message) = match f.code {
        2 => (
            FailureKind::ForbiddenResource,
            format!("the API user's role lacks the resource for {method} ({text})"),
        ),
        3 | 4 => (
            FailureKind::NotApi,
            format!("the API resource for {method} does not exist: a module is missing ({text})"),
        ),
        0 | 1 => (FailureKind::ServerError, format!("{method}: {text}")),
        FAULT_SESSION_EXPIRED => (FailureKind::Session, format!("{method}: {text}")),
        _ => (FailureKind::Protocol, format!("{method}: {text}")),
    };
    ShopError::new(kind, message)
}

/// Sorts an answer into a decoded XML-RPC result or a classified failure.
fn classify<T>(
    a: &Answer,
    decoded: Result<Result<T, Fault>, XmlRpcError>,
) -> Result<Result<T, Fault>, ShopError> {
    let status = a.status;
    if let Some(e) = http::classify_common(status, &a.headers, decoded.is_ok(), &a.url) {
        return Err(e);
    }
    let fail = |kind, msg: String| Err(ShopError::new(kind, msg).with_status(status));
    match (status, decoded) {
        // PHP setups answer some faults with a 5xx status: the fault says more.
        (200..=299 | 500..=599, Ok(r)) => Ok(r),
        (200..=299, Err(XmlRpcError::NotXmlRpc { .. })) => {
            let what = if http::is_html(&a.headers, &a.body) {
                "an HTML page"
            } else if http::shape(&a.body) == http::Shape::Empty {
                "an empty body"
            } else {
                "something else"
            };
            fail(
                FailureKind::NotApi,
                format!("the URL answered with {what}, not the XML-RPC API"),
            )
        }
        (200..=299, Err(e)) => fail(
            FailureKind::Protocol,
            format!("malformed XML-RPC answer: {e}"),
        ),
        (404, _) => fail(
            FailureKind::HttpStatus,
            "404 Not Found: no XML-RPC API at this URL".to_string(),
        ),
        (500..=599, Err(_)) => fail(FailureKind::ServerError, format!("HTTP {status}")),
        (401 | 403, _) => fail(
            FailureKind::HttpStatus,
            format!(
                "HTTP {status}: the web server refuses the API (a password or an IP rule in front of the shop?)"
            ),
        ),
        (_, _) => fail(FailureKind::HttpStatus, format!("HTTP {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::http::testserver::{self, Answer as Canned, Req, html, response};
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    const KEY: &str = "apikey-secret-0123456789";
    const SID1: &str = "0123456789abcdef0123456789abcdef";
    const SID2: &str = "fedcba9876543210fedcba9876543210";

    fn opts() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_secs(5),
            max_body: 64 * 1024,
            tls_ca_file: None,
        }
    }

    fn client(addr: std::net::SocketAddr) -> M1Client {
        M1Client::new(
            "t",
            &format!("http://{addr}"),
            "cobby",
            Secret::new(KEY),
            &opts(),
        )
        .unwrap()
    }

    fn rpc(req: &Req) -> (String, Vec<Value>) {
        xmlrpc::decode_call(&req.body).unwrap()
    }

    fn ok(v: Value) -> Canned {
        response("200 OK", "text/xml", &[], &xmlrpc::encode_response(&v))
    }

    fn fault(code: i64, msg: &str) -> Canned {
        response("200 OK", "text/xml", &[], &xmlrpc::encode_fault(code, msg))
    }

    fn no_secrets(e: &ShopError) {
        let s = format!("{e} {e:?}");
        for secret in [KEY, SID1, SID2] {
            assert!(!s.contains(secret), "secret leaked: {s}");
        }
    }

    fn info() -> Value {
        Value::Struct(vec![
            ("magento_edition".into(), Value::str("Community")),
            ("magento_version".into(), Value::str("1.9.4.5")),
        ])
    }

    /// A shop whose call answers are decided by `on_call(method, args, n)`;
    /// logins hand out SID1 then SID2.
    async fn shop<F>(on_call: F) -> (std::net::SocketAddr, testserver::Log)
    where
        F: Fn(&str, &str, &[Value]) -> Canned + Send + Sync + 'static,
    {
        let logins = Arc::new(Mutex::new(0usize));
        testserver::serve(move |req, _| {
            let (name, params) = rpc(req);
            match name.as_str() {
                "login" => {
                    if params[1].as_str() != Some(KEY) {
                        return fault(2, "Access denied.");
                    }
                    let mut n = logins.lock().unwrap();
                    *n += 1;
                    ok(Value::str(if *n == 1 { SID1 } else { SID2 }))
                }
                "call" => {
                    let sid = params[0].as_str().unwrap().to_string();
                    let method = params[1].as_str().unwrap().to_string();
                    let Value::Array(args) = &params[2] else {
                        panic!()
                    };
                    on_call(&sid, &method, args)
                }
                "multiCall" => {
                    let Value::Array(calls) = &params[1] else {
                        panic!()
                    };
                    let items = calls
                        .iter()
                        .map(|c| {
                            let Value::Array(pair) = c else { panic!() };
                            let Value::Array(args) = &pair[1] else {
                                panic!()
                            };
                            if args[0].as_str() == Some("missing") {
                                Value::Struct(vec![
                                    ("isFault".into(), Value::Bool(true)),
                                    ("faultCode".into(), Value::str("101")),
                                    ("faultMessage".into(), Value::str("Product not exists.")),
                                ])
                            } else {
                                Value::Struct(vec![("sku".into(), args[0].clone())])
                            }
                        })
                        .collect();
                    ok(Value::Array(items))
                }
                "endSession" => ok(Value::Bool(true)),
                other => fault(620, &format!("Method \"{other}\" does not exist")),
            }
        })
        .await
    }

    #[tokio::test]
    async fn login_is_never_resent_to_another_host() {
        // 307 and 308 ask the client to POST the same body (user and key)
        // again: to another port it must not go.
        let (other, other_log) = testserver::serve(|_, _| ok(Value::str(SID1))).await;
        for status in [
            "307 Temporary Redirect",
            "308 Permanent Redirect",
            "302 Found",
        ] {
            let to = format!("http://{other}/api/xmlrpc/");
            let (addr, log) = testserver::serve(move |_, _| {
                response(status, "text/html", &[("Location", to.as_str())], "moved")
            })
            .await;
            let e = client(addr).probe().await.unwrap_err();
            assert_eq!(e.kind, FailureKind::HttpStatus, "{e}");
            assert!(e.message.contains("another port or scheme"), "{e}");
            no_secrets(&e);
            // The shop itself got the login (both endpoints tried).
            assert!(!log.lock().unwrap().is_empty());
        }
        assert!(other_log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn probe_logs_in_once_and_reuses_the_session() {
        let (addr, log) = shop(|sid, method, _| {
            assert_eq!(sid, SID1);
            match method {
                "core_magento.info" => ok(info()),
                "catalog_product.list" => ok(Value::Array(vec![])),
                other => panic!("{other}"),
            }
        })
        .await;
        let c = client(addr);
        let p = c.probe().await.unwrap();
        assert_eq!(p.version.as_deref(), Some("Community 1.9.4.5"));
        assert_eq!(p.api_base, format!("http://{addr}/api/xmlrpc/"));
        c.clone().probe().await.unwrap();
        let names: Vec<String> = log.lock().unwrap().iter().map(|r| rpc(r).0).collect();
        assert_eq!(names, ["login", "call", "call", "call", "call"]);
        let req = log.lock().unwrap()[0].clone();
        assert_eq!(req.method, "POST");
        assert_eq!(req.target, "/api/xmlrpc/");
        assert!(req.header("content-type").unwrap().starts_with("text/xml"));
        assert!(!format!("{c:?}").contains(KEY));
    }

    #[tokio::test]
    async fn expired_session_is_renewed_once() {
        let (addr, log) = shop(|sid, _, _| {
            if sid == SID1 {
                fault(5, "Session expired. Try to relogin.")
            } else {
                ok(Value::Array(vec![Value::Struct(vec![(
                    "product_id".into(),
                    Value::str("1"),
                )])]))
            }
        })
        .await;
        let c = client(addr);
        let filters = Value::Struct(vec![(
            "product_id".into(),
            Value::Struct(vec![
                ("from".into(), Value::Int(1)),
                ("to".into(), Value::Int(100)),
            ]),
        )]);
        let items = c
            .list_products(filters.clone(), Some("default"))
            .await
            .unwrap();
        assert_eq!(items[0].get("product_id").and_then(Value::as_i64), Some(1));
        let reqs = log.lock().unwrap().clone();
        let names: Vec<String> = reqs.iter().map(|r| rpc(r).0).collect();
        assert_eq!(names, ["login", "call", "login", "call"]);
        let (_, params) = rpc(&reqs[3]);
        assert_eq!(params[1], Value::str("catalog_product.list"));
        assert_eq!(
            params[2],
            Value::Array(vec![filters, Value::str("default")])
        );
    }

    #[tokio::test]
    async fn expiring_twice_is_a_session_failure() {
        let (addr, _) = shop(|_, _, _| fault(5, "Session expired. Try to relogin.")).await;
        let e = client(addr)
            .call("core_magento.info", vec![])
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Session, "{e}");
        no_secrets(&e);
    }

    #[tokio::test]
    async fn classifies_faults() {
        // Wrong key at login.
        let (addr, _) = shop(|_, _, _| ok(info())).await;
        let c = M1Client::new(
            "t",
            &format!("http://{addr}"),
            "cobby",
            Secret::new("wrong-key-0123456789"),
            &opts(),
        )
        .unwrap();
        let e = c.probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Unauthorized);
        assert!(
            e.message
                .starts_with("Access denied: API user name or key wrong"),
            "{e}"
        );
        assert!(!e.to_string().contains("wrong-key"));

        let cases: &[(i64, FailureKind, &str)] = &[
            (
                2,
                FailureKind::ForbiddenResource,
                "the API user's role lacks the resource for catalog_product.list",
            ),
            (3, FailureKind::NotApi, "Invalid api path."),
            (
                4,
                FailureKind::NotApi,
                "catalog_product.list does not exist",
            ),
            (0, FailureKind::ServerError, "fault 0"),
            (1, FailureKind::ServerError, "Internal Error"),
            (620, FailureKind::Protocol, "fault 620"),
            (623, FailureKind::Protocol, "fault 623"),
            (636, FailureKind::Protocol, "fault 636"),
            (101, FailureKind::Protocol, "fault 101: Product not exists."),
        ];
        for &(code, kind, needle) in cases {
            let msg = match code {
                2 => "Access denied.",
                3 => "Invalid api path.",
                1 => "Internal Error. Please see log for details.",
                101 => "Product not exists.",
                _ => "text",
            };
            let (addr, _) = shop(move |_, _, _| fault(code, msg)).await;
            let e = client(addr)
                .list_products(Value::Struct(vec![]), None)
                .await
                .unwrap_err();
            assert_eq!(e.kind, kind, "fault {code}: {e}");
            assert!(e.message.contains(needle), "fault {code}: {e}");
            no_secrets(&e);
        }
    }

    #[tokio::test]
    async fn multi_call_returns_per_item_faults() {
        let (addr, log) = shop(|_, _, _| ok(info())).await;
        let c = client(addr);
        let r = c
            .multi_call(vec![
                ("catalog_product.info".into(), vec![Value::str("A")]),
                ("catalog_product.info".into(), vec![Value::str("missing")]),
            ])
            .await
            .unwrap();
        assert_eq!(r[0].as_ref().unwrap().get("sku"), Some(&Value::str("A")));
        assert_eq!(
            r[1],
            Err(Fault {
                code: 101,
                message: "Product not exists.".into()
            })
        );
        assert!(c.multi_call(vec![]).await.unwrap().is_empty());
        c.end_session().await;
        c.end_session().await;
        let names: Vec<String> = log.lock().unwrap().iter().map(|r| rpc(r).0).collect();
        assert_eq!(names, ["login", "multiCall", "endSession"]);
    }

    #[tokio::test]
    async fn never_sends_nil() {
        let (addr, log) = shop(|_, _, _| ok(info())).await;
        let c = client(addr);
        let e = c
            .call("catalog_product.info", vec![Value::Nil])
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Protocol);
        assert!(e.message.contains("nil"), "{e}");
        // Only the login went out.
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn falls_back_to_index_php_and_remembers_it() {
        let (addr, log) = testserver::serve(move |req, _| {
            if req.target != "/index.php/api/xmlrpc/" {
                return html("404 Not Found");
            }
            let (name, params) = rpc(req);
            match (name.as_str(), params.get(1).and_then(Value::as_str)) {
                ("login", _) => ok(Value::str(SID1)),
                (_, Some("catalog_product.list")) => ok(Value::Array(vec![])),
                _ => ok(info()),
            }
        })
        .await;
        let c = client(addr);
        let p = c.probe().await.unwrap();
        assert_eq!(p.api_base, format!("http://{addr}/index.php/api/xmlrpc/"));
        let targets: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.target.clone())
            .collect();
        assert_eq!(
            targets,
            [
                "/api/xmlrpc/",
                "/index.php/api/xmlrpc/",
                "/index.php/api/xmlrpc/",
                "/index.php/api/xmlrpc/"
            ]
        );
    }

    #[tokio::test]
    async fn text_before_the_answer_is_a_protocol_failure() {
        let answer = xmlrpc::encode_response(&Value::str(SID1));
        for (prefix, what) in [
            (
                "<br />\n<b>Notice</b>:  Undefined index: feed in <b>/var/www/app/code/local/Acme/Model/Api.php</b> on line <b>42</b><br />\n",
                "<b>Notice</b>",
            ),
            (
                "PHP Deprecated:  Function create_function() is deprecated in /var/www/lib/Varien/x.php on line 7\n",
                "\"PHP Deprecated:  Function create_function()",
            ),
        ] {
            let body = format!("{prefix}{answer}");
            let (addr, log) =
                testserver::serve(move |_, _| response("200 OK", "text/xml", &[], &body)).await;
            let c = client(addr);
            let e = c.probe().await.unwrap_err();
            assert_eq!(e.kind, FailureKind::Protocol, "{e}");
            assert!(e.message.contains(what), "{e}");
            assert!(e.message.contains("before its XML-RPC answer"), "{e}");
            no_secrets(&e);
            // The API answered there: not looked for under index.php/.
            assert_eq!(log.lock().unwrap().len(), 1);
            assert_eq!(
                c.endpoint().as_deref(),
                Some(format!("http://{addr}/api/xmlrpc/").as_str())
            );
        }
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_are_replaced() {
        let (addr, _) = shop(|_, _, _| ok(info())).await;
        let c = client(addr);
        // A multiCall answer whose second product name has a Latin-1 byte.
        let names = ["Plain", "Caf\u{e9}"];
        let body: Vec<u8> = {
            let items = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Value::Struct(vec![
                        ("product_id".into(), Value::str((i + 1).to_string())),
                        ("sku".into(), Value::str(format!("S{i}"))),
                        ("name".into(), Value::str(*n)),
                    ])
                })
                .collect();
            let xml = xmlrpc::encode_response(&Value::Array(items));
            // é as one Latin-1 byte, not two UTF-8 bytes.
            let at = xml.find('\u{e9}').unwrap();
            [
                &xml.as_bytes()[..at],
                &[0xE9][..],
                &xml.as_bytes()[at + 2..],
            ]
            .concat()
        };
        let a = Answer {
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::from(body),
            url: url::Url::parse(&format!("http://{addr}/api/xmlrpc/")).unwrap(),
        };
        let mut got = Vec::new();
        let r = c
            .decode(
                &a,
                "multiCall",
                &[],
                Some(&mut |v: Value| {
                    got.push(
                        v.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    );
                    Ok(())
                }),
            )
            .unwrap();
        assert!(matches!(r, Ok(Answered::Streamed)));
        assert_eq!(got, ["Plain", "Caf\u{FFFD}"]);
        // A whole answer is read too.
        let r = c.decode(&a, "multiCall", &[], None).unwrap();
        let Ok(Answered::Whole(Value::Array(items))) = r else {
            panic!()
        };
        assert_eq!(items[1].get("name"), Some(&Value::str("Caf\u{FFFD}")));
    }

    #[tokio::test]
    async fn http_level_answers() {
        // 200 HTML everywhere: not the API.
        let (addr, log) = testserver::serve(|_, _| html("200 OK")).await;
        let e = client(addr).probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::NotApi, "{e}");
        assert!(e.message.contains("HTML page, not the XML-RPC API"), "{e}");
        assert_eq!(log.lock().unwrap().len(), 2);
        no_secrets(&e);
        // Maintenance.
        let (addr, _) = testserver::serve(|_, _| {
            response(
                "503 Service Unavailable",
                "text/html",
                &[("Retry-After", "60")],
                "<html>maintenance</html>",
            )
        })
        .await;
        let e = client(addr).probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Maintenance, "{e}");
        assert_eq!(e.retry_after, Some(Duration::from_secs(60)));
        // Malformed XML-RPC.
        let (addr, _) = testserver::serve(|_, _| {
            response("200 OK", "text/xml", &[], "<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>")
        })
        .await;
        let e = client(addr).probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Protocol, "{e}");
        assert!(e.message.contains("bad integer"), "{e}");
        // Truncated.
        let (addr, _) = testserver::serve(|_, _| {
            Canned::Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 500\r\n\r\n<methodResponse>".to_vec())
        })
        .await;
        let e = client(addr).probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Protocol, "{e}");
        assert!(e.message.contains("answer truncated"), "{e}");
        // A 500 carrying a fault reports the fault.
        let (addr, _) = testserver::serve(|_, _| {
            response(
                "500 Internal Server Error",
                "text/xml",
                &[],
                &xmlrpc::encode_fault(1, "Internal Error. Please see log for details."),
            )
        })
        .await;
        let e = client(addr).probe().await.unwrap_err();
        assert_eq!(e.kind, FailureKind::ServerError, "{e}");
        assert!(e.message.contains("Internal Error"), "{e}");
    }
}
