//! The Magento 2 REST client: signs every request with OAuth 1.0a (or a
//! bearer token), finds the API under `/rest/` or `/index.php/rest/`, lists
//! products in a stable order, and turns every answer a shop can give into
//! either data or a classified [`ShopError`].
//!
//! Products are returned as the exact bytes the shop sent
//! ([`RawProduct::raw`]), so the mirror stores what the API said, not a
//! re-serialisation of it.

use super::http::{self, Shape};
use super::oauth;
use super::{ClientOptions, FailureKind, ProbeInfo, ShopError};
use crate::secret::Secret;
use crate::shop::{Credentials, Platform, ShopRecord};
use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// The two places the REST API lives: with URL rewrites, and without.
const PREFIXES: [&str; 2] = ["rest", "index.php/rest"];

/// Longest shop message kept in an error (Magento messages are short; a
/// misbehaving proxy's are not).
const MAX_MESSAGE: usize = 500;

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum M2Auth {
    /// OAuth 1.0a with HMAC-SHA256: the integration's four values.
    Oauth {
        consumer_key: Secret,
        consumer_secret: Secret,
        access_token: Secret,
        access_token_secret: Secret,
    },
    /// `Authorization: Bearer`: needs the shop's
    /// `oauth/consumer/enable_integration_as_bearer`.
    Bearer { access_token: Secret },
}

struct Inner {
    shop: String,
    http: reqwest::Client,
    /// Shop URL without trailing slash.
    base: String,
    auth: M2Auth,
    opts: ClientOptions,
    /// 0 while unknown, else 1 + index into [`PREFIXES`].
    prefix: AtomicUsize,
    /// Newest `Date` header of an answer, in Unix seconds (0: none yet).
    last_date: AtomicI64,
}

/// A Magento 2 shop. Cheap to clone (one `Arc`); the connection pool and
/// the discovered API prefix are shared by the clones.
#[derive(Clone)]
pub struct M2Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for M2Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("M2Client")
            .field("shop", &self.inner.shop)
            .field("base", &self.inner.base)
            .field("api_base", &self.api_base())
            .finish_non_exhaustive()
    }
}

/// Which page of the catalog to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductQuery {
    /// `YYYY-MM-DD HH:MM:SS` (UTC): only products with `updated_at` at or
    /// after it (`gteq`, so the boundary second is re-read).
    pub updated_since: Option<String>,
    /// At least 1 (0 is sent as 1). Shops commonly cap it at 300.
    pub page_size: u32,
    /// 1-based (0 is sent as 1).
    pub current_page: u32,
    /// Magento's `fields` filter, e.g. `items[id,sku,updated_at],total_count`.
    pub fields: Option<String>,
    /// Keyset paging after the checkpoint (T, I): `updated_at` ≥ T AND
    /// (`updated_at` > T OR `entity_id` > I). Two filter groups (AND), the
    /// second with two filters (OR), as Magento's searchCriteria reads them.
    pub after: Option<(String, i64)>,
    /// Listing by id: `entity_id` > this, sorted by `entity_id` only.
    pub id_after: Option<i64>,
    /// Only these entity ids (`in`); sorted by `entity_id`.
    pub ids: Vec<i64>,
    /// Listing an id range: `entity_id` ≥ from (`from`) and ≤ to (`to`),
    /// sorted by `entity_id` only (a primary-key range scan).
    pub id_range: Option<(i64, i64)>,
    /// Sorted by `entity_id` descending (the largest id first).
    pub id_desc: bool,
}

impl Default for ProductQuery {
    fn default() -> Self {
        ProductQuery {
            updated_since: None,
            page_size: 200,
            current_page: 1,
            fields: None,
            after: None,
            id_after: None,
            ids: Vec::new(),
            id_range: None,
            id_desc: false,
        }
    }
}

/// One page of a product listing.
#[derive(Debug, Clone)]
pub struct ProductPage {
    pub items: Vec<RawProduct>,
    /// Matching products over all pages.
    pub total_count: u64,
    /// Size of the answer body, for metrics.
    pub body_bytes: usize,
}

/// A product as listed: the keys the sync needs, and the item's exact JSON.
/// A key left out by `fields` is 0 / empty.
#[derive(Debug, Clone)]
pub struct RawProduct {
    pub id: i64,
    pub sku: String,
    pub updated_at: String,
    pub raw: Box<RawValue>,
}

/// One HTTP exchange, before classification.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// True when the answer came from another URL (a followed redirect):
    /// an OAuth signature is then for the wrong URL.
    pub(crate) redirected: bool,
    /// The URL that gave the answer.
    pub(crate) url: url::Url,
}

impl M2Client {
    /// A client for the shop at `base_url` (`shop` names it in logs).
    pub fn new(
        shop: &str,
        base_url: &str,
        auth: M2Auth,
        opts: &ClientOptions,
    ) -> Result<Self, ShopError> {
        let base = http::base_url(base_url)?;
        Ok(M2Client {
            inner: Arc::new(Inner {
                shop: shop.to_string(),
                http: http::build_client(opts)?,
                base,
                auth,
                opts: opts.clone(),
                prefix: AtomicUsize::new(0),
                last_date: AtomicI64::new(0),
            }),
        })
    }

    /// A client for a registered Magento 2 shop.
    pub fn from_record(rec: &ShopRecord, opts: &ClientOptions) -> Result<Self, ShopError> {
        let auth = match (&rec.platform, &rec.credentials) {
            (
                Platform::Magento2,
                Credentials::M2Oauth {
                    consumer_key,
                    consumer_secret,
                    access_token,
                    access_token_secret,
                },
            ) => M2Auth::Oauth {
                consumer_key: consumer_key.clone(),
                consumer_secret: consumer_secret.clone(),
                access_token: access_token.clone(),
                access_token_secret: access_token_secret.clone(),
            },
            (Platform::Magento2, Credentials::M2Bearer { access_token }) => M2Auth::Bearer {
                access_token: access_token.clone(),
            },
            _ => {
                return Err(ShopError::new(
                    FailureKind::Protocol,
                    format!(
                        "shop {} is not a Magento 2 shop with Magento 2 credentials",
                        rec.name
                    ),
                ));
            }
        };
        let opts = ClientOptions {
            tls_ca_file: rec.tls_ca_file.clone(),
            ..opts.clone()
        };
        M2Client::new(&rec.name, &rec.url, auth, &opts)
    }

    /// `{base}/rest` or `{base}/index.php/rest`, once a request has shown
    /// which one the shop routes.
    pub fn api_base(&self) -> Option<String> {
        match self.inner.prefix.load(Ordering::Relaxed) {
            // Only 1 and 2 are ever stored.
            i @ (1 | 2) => Some(format!("{}/{}", self.inner.base, PREFIXES[i - 1])),
            _ => None,
        }
    }

    /// Proves the shop answers, accepts the credentials (`storeConfigs`) and
    /// grants the catalog permission the sync needs (a one-item listing).
    pub async fn probe(&self, store_code: &str) -> Result<ProbeInfo, ShopError> {
        let body = self.get(store_code, "store/storeConfigs", &[]).await?;
        check_store_configs(&body)?;
        let query = vec![
            pair("searchCriteria[pageSize]", "1"),
            pair("fields", "total_count"),
        ];
        let body = self.get(store_code, "products", &query).await?;
        let page = parse_page(&body, Some("total_count"))?;
        Ok(ProbeInfo {
            version: None,
            product_count: Some(page.total_count),
            api_base: self.api_base().unwrap_or_else(|| self.inner.base.clone()),
        })
    }

    /// The shop's clock as of the newest answer received so far (its `Date`
    /// header, to the second), if any answer carried one.
    pub fn shop_clock(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.inner.last_date.load(Ordering::Relaxed) {
            0 => None,
            secs => chrono::DateTime::from_timestamp(secs, 0),
        }
    }

    /// One page of products, sorted by (`updated_at`, `entity_id`) ascending
    /// so that pages are stable and a cursor can resume in the middle of a
    /// second shared by many products.
    pub async fn list_products(
        &self,
        store_code: &str,
        q: &ProductQuery,
    ) -> Result<ProductPage, ShopError> {
        let body = self.get(store_code, "products", &product_query(q)).await?;
        parse_page(&body, q.fields.as_deref())
    }

    /// GET `{base}/{prefix}/{store}/V1/{path}?{query}`: the JSON body of a
    /// 2xx answer, or the classified failure. Discovers the prefix on the
    /// first call (plain first, `index.php/` when that answers 404 or a
    /// non-JSON 2xx) and sticks to it once the API has answered.
    async fn get(
        &self,
        store: &str,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Bytes, ShopError> {
        let cached = self.inner.prefix.load(Ordering::Relaxed);
        let candidates: &[usize] = if cached == 0 { &[1, 2] } else { &[cached] };
        let mut first_failure: Option<ShopError> = None;
        for &p in candidates {
            let a = self.send(PREFIXES[p - 1], store, path, query).await?;
            let is_2xx = (200..300).contains(&a.status);
            let shape = http::shape(&a.body);
            let not_here = a.status == 404 || (is_2xx && shape != Shape::Json);
            if shape == Shape::Json && a.status != 404 {
                self.inner.prefix.store(p, Ordering::Relaxed);
            } else if not_here && cached != 0 {
                // The shop's routing changed (rewrites switched on or off):
                // discover again on the next request.
                let _ = self.inner.prefix.compare_exchange(
                    cached,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let result = classify(&a);
            if not_here && cached == 0 {
                match first_failure.take() {
                    None => {
                        first_failure = result.err();
                        continue;
                    }
                    Some(mut first) => {
                        first.message.push_str(" (also tried /index.php/rest/)");
                        return Err(first);
                    }
                }
            }
            return result.map(|()| a.body);
        }
        // Unreachable in practice: the loop returns on its last candidate.
        Err(first_failure
            .unwrap_or_else(|| ShopError::new(FailureKind::Protocol, "no API prefix to try")))
    }

    /// One signed GET, body read under the cap.
    async fn send(
        &self,
        prefix: &str,
        store: &str,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Answer, ShopError> {
        let inner = &*self.inner;
        let mut s = format!(
            "{}/{}/{}/V1/{}",
            inner.base,
            prefix,
            oauth::encode(store),
            path
        );
        if !query.is_empty() {
            s.push('?');
            s.push_str(&oauth::query_string(query));
        }
        let url = url::Url::parse(&s).map_err(|e| {
            ShopError::new(
                FailureKind::Protocol,
                format!("cannot build the request URL: {e}"),
            )
        })?;
        let mut auth = HeaderValue::from_str(&authorization(&inner.auth, &url)).map_err(|_| {
            ShopError::new(
                FailureKind::Unauthorized,
                "the credentials contain characters that cannot travel in an HTTP header",
            )
        })?;
        auth.set_sensitive(true);
        let started = Instant::now();
        let mut resp = inner
            .http
            .get(url.clone())
            .header(AUTHORIZATION, auth)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| http::classify_send_error(&e, &inner.opts))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if let Some(t) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
        {
            inner.last_date.fetch_max(t.timestamp(), Ordering::Relaxed);
        }
        let redirected = resp.url() != &url;
        let answered_by = resp.url().clone();
        let body = http::read_body(&mut resp, &inner.opts).await?;
        debug!(
            shop = %inner.shop,
            path = url.path(),
            status,
            bytes = body.len(),
            ms = started.elapsed().as_millis() as u64,
            "magento2 request"
        );
        Ok(Answer {
            status,
            headers,
            body,
            redirected,
            url: answered_by,
        })
    }
}

/// The `storeConfigs` answer of a probe must be a JSON list (its content is
/// not used).
pub(crate) fn check_store_configs(body: &[u8]) -> Result<(), ShopError> {
    serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(body)
        .map(|_| ())
        .map_err(|e| {
            ShopError::new(
                FailureKind::Protocol,
                format!("storeConfigs did not answer a JSON list: {e}"),
            )
            .with_status(200)
        })
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// The listing's query, in a fixed order; indexes stay below 10 so natural
/// and byte order agree anyway.
fn product_query(q: &ProductQuery) -> Vec<(String, String)> {
    let mut v = Vec::with_capacity(16);
    let mut group = 0;
    let filter = |v: &mut Vec<(String, String)>,
                  g: usize,
                  i: usize,
                  field: &str,
                  value: &str,
                  cond: &str| {
        let f = format!("searchCriteria[filter_groups][{g}][filters][{i}]");
        v.push(pair(&format!("{f}[field]"), field));
        v.push(pair(&format!("{f}[value]"), value));
        v.push(pair(&format!("{f}[condition_type]"), cond));
    };
    if let Some(since) = &q.updated_since {
        filter(&mut v, group, 0, "updated_at", since, "gteq");
        group += 1;
    }
    if let Some((t, id)) = &q.after {
        filter(&mut v, group, 0, "updated_at", t, "gteq");
        filter(&mut v, group + 1, 0, "updated_at", t, "gt");
        filter(&mut v, group + 1, 1, "entity_id", &id.to_string(), "gt");
        group += 2;
    }
    if let Some(id) = q.id_after {
        filter(&mut v, group, 0, "entity_id", &id.to_string(), "gt");
        group += 1;
    }
    if !q.ids.is_empty() {
        let list: Vec<String> = q.ids.iter().map(i64::to_string).collect();
        filter(&mut v, group, 0, "entity_id", &list.join(","), "in");
        group += 1;
    }
    if let Some((from, to)) = q.id_range {
        filter(&mut v, group, 0, "entity_id", &from.to_string(), "from");
        filter(&mut v, group + 1, 0, "entity_id", &to.to_string(), "to");
    }
    if q.id_desc {
        v.push(pair("searchCriteria[sortOrders][0][field]", "entity_id"));
        v.push(pair("searchCriteria[sortOrders][0][direction]", "DESC"));
    } else if q.id_after.is_some() || !q.ids.is_empty() || q.id_range.is_some() {
        v.push(pair("searchCriteria[sortOrders][0][field]", "entity_id"));
        v.push(pair("searchCriteria[sortOrders][0][direction]", "ASC"));
    } else {
        v.push(pair("searchCriteria[sortOrders][0][field]", "updated_at"));
        v.push(pair("searchCriteria[sortOrders][0][direction]", "ASC"));
        v.push(pair("searchCriteria[sortOrders][1][field]", "entity_id"));
        v.push(pair("searchCriteria[sortOrders][1][direction]", "ASC"));
    }
    v.push(pair(
        "searchCriteria[pageSize]",
        &q.page_size.max(1).to_string(),
    ));
    v.push(pair(
        "searchCriteria[currentPage]",
        &q.current_page.max(1).to_string(),
    ));
    if let Some(f) = &q.fields {
        v.push(pair("fields", f));
    }
    v
}

fn authorization(auth: &M2Auth, url: &url::Url) -> String {
    match auth {
        M2Auth::Oauth {
            consumer_key,
            consumer_secret,
            access_token,
            access_token_secret,
        } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            oauth::authorization_header(
                "GET",
                url,
                consumer_key.expose(),
                consumer_secret.expose(),
                access_token.expose(),
                access_token_secret.expose(),
                now,
                &nonce(),
            )
        }
        M2Auth::Bearer { access_token } => format!("Bearer {}", access_token.expose()),
    }
}

/// 32 random alphanumerics: Magento refuses a nonce it has seen before.
fn nonce() -> String {
    use rand::Rng as _;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Most `parameters` entries used to fill a message (Magento's messages
/// have a handful).
const MAX_PARAMS: usize = 100;

/// Magento's placeholders filled as its `Phrase` renderer does (PHP
/// `strtr`, longest placeholder first): `%1`, `%2`... from a `parameters`
/// array, `%name` from a `parameters` object.
///
/// Bounded for hostile bodies: only the first [`MAX_PARAMS`] parameters and
/// the first `8 * MAX_MESSAGE` bytes of `message` are used, and filling
/// stops once the text is longer than `MAX_MESSAGE` bytes (the caller cuts
/// it there anyway). Without the bounds, `"%1%1..."` with a long `%1` grows
/// quadratically and many parameters make every character a long scan.
pub fn fill_placeholders(message: &str, params: Option<&serde_json::Value>) -> String {
    let message = cut(message, 8 * MAX_MESSAGE);
    let pairs: Vec<(String, String)> = match params {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .take(MAX_PARAMS)
            .enumerate()
            .map(|(i, v)| (format!("%{}", i + 1), php_string(v)))
            .collect(),
        Some(serde_json::Value::Object(o)) => o
            .iter()
            .take(MAX_PARAMS)
            .map(|(k, v)| (format!("%{k}"), php_string(v)))
            .collect(),
        _ => return message.to_string(),
    };
    let mut out = String::with_capacity(message.len().min(2 * MAX_MESSAGE));
    let mut rest = message;
    while !rest.is_empty() && out.len() <= MAX_MESSAGE {
        let best = pairs
            .iter()
            .filter(|(k, _)| rest.starts_with(k.as_str()))
            .max_by_key(|(k, _)| k.len());
        match best {
            Some((k, v)) => {
                out.push_str(v);
                rest = &rest[k.len()..];
            }
            None => {
                let c = rest.chars().next().unwrap_or_default();
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A parameter as PHP would print it, at most `2 * MAX_MESSAGE` bytes
/// (more can never show).
fn php_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => cut(s, 2 * MAX_MESSAGE).to_string(),
        serde_json::Value::Null => String::new(),
        serde_json::Value::Bool(b) => if *b { "1" } else { "" }.to_string(),
        other => other.to_string(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let end = cut(&s, MAX_MESSAGE).len();
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The person-readable message of a Magento JSON error body, placeholders
/// filled; `None` when the body is not one.
pub(crate) fn magento_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let msg = v.get("message")?.as_str()?;
    Some(truncate(fill_placeholders(msg, v.get("parameters"))))
}

/// Sorts an answer into data (`Ok`) or a classified failure.
pub(crate) fn classify(a: &Answer) -> Result<(), ShopError> {
    let shape = http::shape(&a.body);
    let is_json = shape == Shape::Json;
    let retry = http::retry_after(&a.headers);
    let fail = |kind, msg: String| {
        Err(ShopError::new(kind, msg)
            .with_status(a.status)
            .with_retry_after(retry))
    };
    if let Some(e) = http::classify_common(a.status, &a.headers, is_json, &a.url) {
        return Err(e);
    }
    let status = a.status;
    // Only failures carry a message; a 2xx body is a product page (parsed
    // once, by the caller), not something to parse twice.
    // An empty message says nothing: treated as none.
    let msg = if is_json && !(200..=299).contains(&status) {
        magento_message(&a.body).filter(|m| !m.trim().is_empty())
    } else {
        None
    };
    let with_msg = |prefix: &str| match &msg {
        Some(m) => format!("{prefix}: {m}"),
        None => prefix.to_string(),
    };
    match status {
        200..=299 if is_json => Ok(()),
        200..=299 => {
            let what = if http::is_html(&a.headers, &a.body) {
                "an HTML page".to_string()
            } else if shape == Shape::Empty {
                "an empty body".to_string()
            } else {
                let ct = a
                    .headers
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no content type");
                format!("a non-JSON body ({ct})")
            };
            fail(
                FailureKind::NotApi,
                format!("the URL answered with {what}, not the REST API"),
            )
        }
        401 => {
            let m = msg.clone().unwrap_or_default();
            let kind = if m.contains("signature is invalid")
                || m.contains("error occurred validating the nonce")
            {
                FailureKind::BadSignature
            } else if m.contains("isn't authorized to access") {
                FailureKind::ForbiddenResource
            } else {
                FailureKind::Unauthorized
            };
            let mut text = match msg {
                Some(m) => m,
                None => "HTTP 401 without a Magento message (is a web server password in front of the shop?)".to_string(),
            };
            if kind == FailureKind::BadSignature && a.redirected {
                text.push_str(
                    " (the request was redirected, so it was signed for another URL: register the shop with the URL it redirects to)",
                );
            }
            fail(kind, text)
        }
        400 => {
            let m = msg.clone().unwrap_or_default();
            if m.starts_with("Signature method") && m.contains("not supported") {
                fail(FailureKind::BadSignature, m)
            } else {
                fail(FailureKind::Protocol, with_msg("HTTP 400"))
            }
        }
        404 => fail(
            FailureKind::HttpStatus,
            match msg {
                Some(m) => format!("404 {m}"),
                None => "404 Not Found: no Magento REST API at this URL".to_string(),
            },
        ),
        500..=599 => fail(
            FailureKind::ServerError,
            with_msg(&format!("HTTP {status}")),
        ),
        _ => fail(FailureKind::HttpStatus, with_msg(&format!("HTTP {status}"))),
    }
}

#[derive(Deserialize)]
struct PageBody {
    #[serde(default)]
    items: Option<Vec<Box<RawValue>>>,
    #[serde(default)]
    total_count: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ItemHead {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    sku: Option<serde_json::Value>,
    #[serde(default)]
    updated_at: Option<serde_json::Value>,
}

/// Which of `id`, `sku`, `updated_at` an item must carry, given `fields`:
/// all without a `fields` filter or with a bare `items`; those named in
/// `items[...]` otherwise.
fn required_keys(fields: Option<&str>) -> [bool; 3] {
    let Some(f) = fields else {
        return [true; 3];
    };
    // Top-level entries of the fields list, and the inside of items[...].
    let mut depth = 0usize;
    let mut start = 0usize;
    let mut entries = Vec::new();
    for (i, c) in f.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                entries.push(&f[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    entries.push(&f[start..]);
    for e in entries {
        let e = e.trim();
        if e == "items" {
            return [true; 3];
        }
        if let Some(inner) = e.strip_prefix("items[").and_then(|s| s.strip_suffix(']')) {
            let mut names = Vec::new();
            let (mut d, mut s) = (0usize, 0usize);
            for (i, c) in inner.char_indices() {
                match c {
                    '[' => d += 1,
                    ']' => d = d.saturating_sub(1),
                    ',' if d == 0 => {
                        names.push(inner[s..i].trim());
                        s = i + 1;
                    }
                    _ => {}
                }
            }
            names.push(inner[s..].trim());
            return ["id", "sku", "updated_at"].map(|k| names.contains(&k));
        }
    }
    [false; 3]
}

/// Parses a listing answer: `total_count` (required) and each item's keys.
pub(crate) fn parse_page(body: &Bytes, fields: Option<&str>) -> Result<ProductPage, ShopError> {
    let proto = |m: String| ShopError::new(FailureKind::Protocol, m).with_status(200);
    let page: PageBody = serde_json::from_slice(body)
        .map_err(|e| proto(format!("malformed product listing: {e}")))?;
    let total_count = match &page.total_count {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| proto("the product listing has no numeric total_count".to_string()))?;
    let [need_id, need_sku, need_updated] = required_keys(fields);
    let raw_items = page.items.unwrap_or_default();
    let mut items = Vec::with_capacity(raw_items.len());
    for (i, raw) in raw_items.into_iter().enumerate() {
        let head: ItemHead = serde_json::from_str(raw.get())
            .map_err(|e| proto(format!("product item {i} is not an object: {e}")))?;
        let id = match &head.id {
            Some(serde_json::Value::Number(n)) => n.as_i64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let sku = head
            .sku
            .as_ref()
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let updated_at = head
            .updated_at
            .as_ref()
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let missing = |what: &str| proto(format!("product item {i} has no {what}"));
        if need_sku && sku.is_none() {
            return Err(missing("sku"));
        }
        if need_id && id.is_none() {
            return Err(missing("integer id"));
        }
        if need_updated && updated_at.is_none() {
            return Err(missing("updated_at"));
        }
        items.push(RawProduct {
            id: id.unwrap_or(0),
            sku: sku.unwrap_or_default(),
            updated_at: updated_at.unwrap_or_default(),
            raw,
        });
    }
    Ok(ProductPage {
        items,
        total_count,
        body_bytes: body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::http::testserver::{self, Answer, html, json, response};
    use super::*;
    use std::time::Duration;

    const CK: &str = "consumerkey-0123456789";
    const CS: &str = "consumersecret-abcdefgh";
    const AT: &str = "accesstoken-ijklmnopq";
    const ATS: &str = "tokensecret-rstuvwxyz";

    fn oauth_auth() -> M2Auth {
        M2Auth::Oauth {
            consumer_key: Secret::new(CK),
            consumer_secret: Secret::new(CS),
            access_token: Secret::new(AT),
            access_token_secret: Secret::new(ATS),
        }
    }

    fn opts() -> ClientOptions {
        ClientOptions {
            timeout: Duration::from_secs(5),
            max_body: 64 * 1024,
            tls_ca_file: None,
        }
    }

    fn client(addr: std::net::SocketAddr) -> M2Client {
        M2Client::new("t", &format!("http://{addr}/"), oauth_auth(), &opts()).unwrap()
    }

    fn no_secrets(e: &ShopError) {
        let s = format!("{e} {e:?}");
        for secret in [CK, CS, AT, ATS] {
            assert!(!s.contains(secret), "secret leaked: {s}");
        }
    }

    const PAGE: &str = r#"{"items":[{"id":7,"sku":"A+B c","updated_at":"2024-01-01 10:00:00","name":"Café \"x\"",  "price":1.50},{"id":"8","sku":"b","updated_at":"2024-01-01 10:00:01"}],"search_criteria":{},"total_count":12}"#;

    #[tokio::test]
    async fn lists_products_with_a_signature_magento_accepts() {
        let (addr, log) = testserver::serve(|_, _| json("200 OK", PAGE)).await;
        let c = client(addr);
        let q = ProductQuery {
            updated_since: Some("2024-01-01 10:00:00".into()),
            page_size: 2,
            current_page: 3,
            ..ProductQuery::default()
        };
        let page = c.list_products("default", &q).await.unwrap();
        assert_eq!(page.total_count, 12);
        assert_eq!(page.body_bytes, PAGE.len());
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[0].id, 7);
        assert_eq!(page.items[0].sku, "A+B c");
        assert_eq!(
            page.items[0].raw.get(),
            r#"{"id":7,"sku":"A+B c","updated_at":"2024-01-01 10:00:00","name":"Café \"x\"",  "price":1.50}"#
        );
        assert_eq!(page.items[1].id, 8);
        assert_eq!(c.api_base().unwrap(), format!("http://{addr}/rest"));

        let req = log.lock().unwrap()[0].clone();
        assert_eq!(req.method, "GET");
        let f = "searchCriteria%5Bfilter_groups%5D%5B0%5D%5Bfilters%5D%5B0%5D";
        let s = "searchCriteria%5BsortOrders%5D";
        assert_eq!(
            req.target,
            format!(
                "/rest/default/V1/products?{f}%5Bfield%5D=updated_at&{f}%5Bvalue%5D=2024-01-01%2010%3A00%3A00&{f}%5Bcondition_type%5D=gteq&{s}%5B0%5D%5Bfield%5D=updated_at&{s}%5B0%5D%5Bdirection%5D=ASC&{s}%5B1%5D%5Bfield%5D=entity_id&{s}%5B1%5D%5Bdirection%5D=ASC&searchCriteria%5BpageSize%5D=2&searchCriteria%5BcurrentPage%5D=3"
            )
        );
        // Verify as the shop would: the URL it received, the header it got.
        let url = url::Url::parse(&format!("http://{addr}{}", req.target)).unwrap();
        let p = oauth::parse_authorization(req.header("authorization").unwrap()).unwrap();
        assert_eq!(p.consumer_key, CK);
        assert_eq!(p.signature_method, "HMAC-SHA256");
        assert!(oauth::verify("GET", &url, &p, CS, ATS));
        assert_eq!(req.header("accept"), Some("application/json"));
    }

    #[tokio::test]
    async fn probe_and_bearer() {
        let (addr, log) = testserver::serve(|req, _| {
            if req.target.contains("storeConfigs") {
                json("200 OK", r#"[{"id":1,"code":"default"}]"#)
            } else {
                json("200 OK", r#"{"total_count":1234}"#)
            }
        })
        .await;
        let c = M2Client::new(
            "t",
            &format!("http://{addr}"),
            M2Auth::Bearer {
                access_token: Secret::new(AT),
            },
            &opts(),
        )
        .unwrap();
        let info = c.probe("default").await.unwrap();
        assert_eq!(info.product_count, Some(1234));
        assert_eq!(info.api_base, format!("http://{addr}/rest"));
        let reqs = log.lock().unwrap().clone();
        assert_eq!(reqs[0].target, "/rest/default/V1/store/storeConfigs");
        assert_eq!(
            reqs[1].target,
            "/rest/default/V1/products?searchCriteria%5BpageSize%5D=1&fields=total_count"
        );
        assert_eq!(
            reqs[1].header("authorization"),
            Some(format!("Bearer {AT}").as_str())
        );
    }

    #[tokio::test]
    async fn falls_back_to_index_php_and_remembers_it() {
        let (addr, log) = testserver::serve(|req, _| {
            if req.target.starts_with("/index.php/rest/") {
                json("200 OK", r#"{"items":[],"total_count":0}"#)
            } else {
                html("404 Not Found")
            }
        })
        .await;
        let c = client(addr);
        let q = ProductQuery::default();
        c.list_products("default", &q).await.unwrap();
        c.list_products("default", &q).await.unwrap();
        let targets: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.target.clone())
            .collect();
        assert_eq!(targets.len(), 3, "{targets:?}");
        assert!(targets[0].starts_with("/rest/default/V1/products?"));
        assert!(targets[1].starts_with("/index.php/rest/default/V1/products?"));
        assert!(targets[2].starts_with("/index.php/rest/"));
        assert_eq!(
            c.api_base().unwrap(),
            format!("http://{addr}/index.php/rest")
        );
    }

    #[tokio::test]
    async fn rediscovers_the_prefix_when_routing_changes() {
        let (addr, log) = testserver::serve(|req, n| {
            // First answer from /rest/; from then on only index.php routes.
            if n == 0 || req.target.starts_with("/index.php/") {
                json("200 OK", r#"{"items":[],"total_count":0}"#)
            } else {
                html("404 Not Found")
            }
        })
        .await;
        let c = client(addr);
        let q = ProductQuery::default();
        c.list_products("default", &q).await.unwrap();
        assert_eq!(c.api_base().unwrap(), format!("http://{addr}/rest"));
        let e = c.list_products("default", &q).await.unwrap_err();
        assert_eq!(e.status, Some(404));
        assert_eq!(c.api_base(), None);
        c.list_products("default", &q).await.unwrap();
        assert_eq!(
            c.api_base().unwrap(),
            format!("http://{addr}/index.php/rest")
        );
        assert_eq!(log.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn html_storefront_is_not_the_api() {
        let (addr, log) = testserver::serve(|_, _| html("200 OK")).await;
        let e = client(addr).probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::NotApi, "{e}");
        assert!(e.message.contains("HTML page, not the REST API"), "{e}");
        assert!(e.message.contains("also tried /index.php/rest/"), "{e}");
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn json_404_reports_magento_message() {
        let (addr, _) = testserver::serve(|_, _| {
            json(
                "404 Not Found",
                r#"{"message":"Request does not match any route."}"#,
            )
        })
        .await;
        let e = client(addr).probe("nostore").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::HttpStatus);
        assert_eq!(e.status, Some(404));
        assert!(
            e.message
                .starts_with("404 Request does not match any route."),
            "{e}"
        );
    }

    async fn answer_kind(a: fn() -> Answer) -> ShopError {
        let (addr, _) = testserver::serve(move |_, _| a()).await;
        let e = client(addr).probe("default").await.unwrap_err();
        no_secrets(&e);
        e
    }

    #[tokio::test]
    async fn classifies_401_bodies() {
        let e = answer_kind(|| {
            json(
                "401 Unauthorized",
                r#"{"message":"The signature is invalid. Verify and try again."}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::BadSignature);
        let e = answer_kind(|| {
            json(
                "401 Unauthorized",
                r#"{"message":"An error occurred validating the nonce"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::BadSignature);
        let e = answer_kind(|| {
            json(
                "401 Unauthorized",
                r#"{"message":"Specified token does not exist"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::Unauthorized);
        let e = answer_kind(|| {
            json(
                "401 Unauthorized",
                r#"{"message":"A consumer having the specified key does not exist"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::Unauthorized);
        let e = answer_kind(|| {
            json(
                "401 Unauthorized",
                r#"{"message":"The consumer isn't authorized to access %resources.","parameters":{"resources":"Magento_Catalog::products"}}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::ForbiddenResource);
        assert_eq!(
            e.message,
            "The consumer isn't authorized to access Magento_Catalog::products."
        );
        assert_eq!(e.status, Some(401));
        let e = answer_kind(|| {
            json(
                "400 Bad Request",
                r#"{"message":"Signature method %1 is not supported","parameters":["HMAC-SHA1"]}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::BadSignature);
        assert_eq!(e.message, "Signature method HMAC-SHA1 is not supported");
        let e = answer_kind(|| {
            json(
                "400 Bad Request",
                r#"{"message":"Cannot perform GET operation with store code 'all'"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::Protocol);
        assert!(e.message.contains("store code 'all'"));
    }

    #[tokio::test]
    async fn classifies_server_side_answers() {
        let e = answer_kind(|| {
            response(
                "503 Service Unavailable",
                "text/html",
                &[("Retry-After", "300")],
                "<html><body>Service Temporarily Unavailable</body></html>",
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::Maintenance);
        assert_eq!(e.retry_after, Some(Duration::from_secs(300)));
        assert_eq!(e.status, Some(503));
        let e = answer_kind(|| {
            response(
                "429 Too Many Requests",
                "application/json",
                &[("Retry-After", "7")],
                r#"{"message":"Too Many Requests"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::RateLimited);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let e = answer_kind(|| {
            json(
                "500 Internal Server Error",
                r#"{"message":"Internal Error. Details are available in Magento log file. Report ID: webapi-65a1b2c3d4e5f"}"#,
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::ServerError);
        assert!(e.message.contains("Report ID: webapi-65a1b2c3d4e5f"), "{e}");
        let e = answer_kind(|| {
            response(
                "502 Bad Gateway",
                "text/html",
                &[],
                "<html>bad gateway</html>",
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::ServerError);
        let e = answer_kind(|| json("200 OK", r#"{"items": [}"#)).await;
        assert_eq!(e.kind, FailureKind::Protocol);
    }

    #[tokio::test]
    async fn truncated_and_oversized_bodies() {
        let e = answer_kind(|| {
            Answer::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"id\":1}"
                    .to_vec(),
            )
        })
        .await;
        assert_eq!(e.kind, FailureKind::Protocol);
        assert!(e.message.contains("answer truncated"), "{e}");
        // Announced too large.
        let e = answer_kind(|| json("200 OK", &format!("[\"{}\"]", "x".repeat(70 * 1024)))).await;
        assert_eq!(e.kind, FailureKind::Protocol);
        assert!(e.message.contains("answer larger than 65536 bytes"), "{e}");
        // Not announced (close-delimited), too large as it streams.
        let e = answer_kind(|| {
            let mut b = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[\"".to_vec();
            b.extend(std::iter::repeat_n(b'x', 70 * 1024));
            b.extend_from_slice(b"\"]");
            Answer::Raw(b)
        })
        .await;
        assert!(e.message.contains("answer larger than 65536 bytes"), "{e}");
    }

    #[tokio::test]
    async fn transport_failures() {
        // Timeout.
        let (addr, _) = testserver::serve(|_, _| Answer::Hang).await;
        let quick = ClientOptions {
            timeout: Duration::from_millis(300),
            max_body: 1024,
            tls_ca_file: None,
        };
        let c = M2Client::new("t", &format!("http://{addr}"), oauth_auth(), &quick).unwrap();
        let e = c.probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Timeout, "{e}");
        // Connection refused: a port that was just free.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = M2Client::new(
            "t",
            &format!("http://127.0.0.1:{port}"),
            oauth_auth(),
            &opts(),
        )
        .unwrap();
        let e = c.probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Connect, "{e}");
        // DNS.
        let c = M2Client::new("t", "http://cobbyd-test.invalid", oauth_auth(), &opts()).unwrap();
        let e = c.probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Dns, "{e}");
        // TLS against a server that answers plain HTTP at once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let c = M2Client::new("t", &format!("https://{addr}"), oauth_auth(), &opts()).unwrap();
        let e = c.probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Tls, "{e}");
        no_secrets(&e);
    }

    #[tokio::test]
    async fn redirects_to_another_host_are_not_followed() {
        let (addr, log) = testserver::serve(move |_, _| {
            // 127.0.0.1 -> localhost: another host name, so not followed.
            Answer::Raw(
                b"HTTP/1.1 302 Found\r\nLocation: http://localhost:1/rest/x\r\nContent-Length: 0\r\n\r\n"
                    .to_vec(),
            )
        })
        .await;
        let e = client(addr).probe("default").await.unwrap_err();
        assert_eq!(e.kind, FailureKind::HttpStatus, "{e}");
        assert!(
            e.message.contains("redirected to another host (localhost)")
                && e.message.contains("use the final URL, http://localhost:1"),
            "{e}"
        );
        assert!(!e.message.contains("/rest/x"), "{e}");
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn no_redirect_takes_the_authorization_header_elsewhere() {
        // Another port of the same address, for bearer and OAuth alike,
        // whatever the 3xx: the second server must hear nothing.
        let (other, other_log) = testserver::serve(|_, _| json("200 OK", "{}")).await;
        for status in [
            "301 Moved Permanently",
            "302 Found",
            "307 Temporary Redirect",
            "308 Permanent Redirect",
        ] {
            let to = format!("http://{other}/rest/V1/store/storeConfigs");
            let (addr, log) = testserver::serve(move |_, _| {
                response(status, "text/html", &[("Location", to.as_str())], "moved")
            })
            .await;
            for auth in [
                oauth_auth(),
                M2Auth::Bearer {
                    access_token: Secret::new(AT),
                },
            ] {
                let c = M2Client::new("t", &format!("http://{addr}"), auth, &opts()).unwrap();
                let e = c.probe("default").await.unwrap_err();
                assert_eq!(e.kind, FailureKind::HttpStatus, "{e}");
                assert!(e.message.contains("another port or scheme"), "{e}");
                no_secrets(&e);
            }
            assert!(!log.lock().unwrap().is_empty());
        }
        assert!(other_log.lock().unwrap().is_empty());
    }

    #[test]
    fn items_must_carry_their_keys() {
        let body = Bytes::from_static(br#"{"items":[{"id":1,"sku":"a","updated_at":"x"},{"id":2,"updated_at":"y"}],"total_count":2}"#);
        let e = parse_page(&body, Some("items[id,sku,updated_at],total_count")).unwrap_err();
        assert_eq!(e.kind, FailureKind::Protocol);
        assert!(e.message.contains("item 1 has no sku"), "{e}");
        let e = parse_page(&body, None).unwrap_err();
        assert!(e.message.contains("item 1 has no sku"), "{e}");
        // Not asked for: not required.
        let p = parse_page(&body, Some("items[id,updated_at],total_count")).unwrap();
        assert_eq!(p.items[1].sku, "");
        let body = Bytes::from_static(br#"{"items":[],"total_count":"x"}"#);
        assert!(
            parse_page(&body, None)
                .unwrap_err()
                .message
                .contains("total_count")
        );
        let body = Bytes::from_static(br#"{"items":[]}"#);
        assert!(parse_page(&body, None).is_err());
        let body = Bytes::from_static(br#"{"items":[3],"total_count":1}"#);
        assert!(
            parse_page(&body, None)
                .unwrap_err()
                .message
                .contains("item 0")
        );
        let body = Bytes::from_static(br#"{"items":null,"total_count":5}"#);
        assert_eq!(parse_page(&body, None).unwrap().total_count, 5);
        assert_eq!(required_keys(Some("total_count")), [false; 3]);
        assert_eq!(required_keys(Some("items,total_count")), [true; 3]);
        assert_eq!(
            required_keys(Some(
                "items[sku,extension_attributes[website_ids,stock_item[qty]]],total_count"
            )),
            [false, true, false]
        );
    }

    #[test]
    fn placeholders() {
        use serde_json::json;
        assert_eq!(
            fill_placeholders(
                "Signature method %1 is not supported",
                Some(&json!(["HMAC-SHA1"]))
            ),
            "Signature method HMAC-SHA1 is not supported"
        );
        assert_eq!(
            fill_placeholders(
                "%1 and %10 and %2",
                Some(&json!(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]))
            ),
            "a and j and b"
        );
        assert_eq!(
            fill_placeholders(
                "The consumer isn't authorized to access %resources.",
                Some(&json!({"resources": "Magento_Catalog::products"}))
            ),
            "The consumer isn't authorized to access Magento_Catalog::products."
        );
        assert_eq!(
            fill_placeholders(
                "Maximum SearchCriteria pageSize is %max",
                Some(&json!({"max": 300}))
            ),
            "Maximum SearchCriteria pageSize is 300"
        );
        assert_eq!(fill_placeholders("100% sure %1", None), "100% sure %1");
        assert_eq!(fill_placeholders("%x é %1", Some(&json!([true]))), "%x é 1");
    }

    #[test]
    fn query_order_and_clamping() {
        let q = ProductQuery {
            page_size: 0,
            current_page: 0,
            fields: Some("items[id,sku,updated_at],total_count".into()),
            ..ProductQuery::default()
        };
        let v = product_query(&q);
        assert_eq!(v[0].0, "searchCriteria[sortOrders][0][field]");
        assert!(v.contains(&pair("searchCriteria[pageSize]", "1")));
        assert!(v.contains(&pair("searchCriteria[currentPage]", "1")));
        assert_eq!(v.last().unwrap().1, "items[id,sku,updated_at],total_count");
    }
}
