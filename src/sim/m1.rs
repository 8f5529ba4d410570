//! Magento 1 API v1 over XML-RPC, as OpenMage answers it: `login`, `call`,
//! `multiCall`, `endSession`; sessions that expire after idle time; the
//! catalog methods with their quirks (no paging in `catalog_product.list`,
//! digits-only SKUs read as ids by `catalog_product.info`); faults as HTTP
//! 200 `<fault>` documents with Magento's and Zend's codes.

use super::{Inner, bump, lock, read, write};
use crate::magento::xmlrpc::{self, Value};
use crate::sim::catalog::{self, Field, Filter, Lang, Op, Query, Row};
use crate::sim::server::{MAX_SHOP_BODY, Resp, read_body, xml};
use hyper::body::Incoming;
use hyper::{Method, Request};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sessions kept at most; the least recently used goes first.
pub const MAX_SESSIONS: usize = 10_000;

/// The edition and version `core_magento.info` reports.
pub const MAGENTO_VERSION: &str = "1.9.4.5";

/// A fault: code and message.
type Fault = (i64, String);

fn fault(code: i64, msg: &str) -> Fault {
    (code, msg.to_string())
}

fn access_denied() -> Fault {
    fault(2, "Access denied.")
}

fn session_expired() -> Fault {
    fault(5, "Session expired. Try to relogin.")
}

fn fault_resp(f: &Fault) -> Resp {
    xml(xmlrpc::encode_fault(f.0, &f.1))
}

/// API sessions with an idle timeout.
#[derive(Debug)]
pub struct Sessions {
    timeout: Duration,
    map: HashMap<String, Instant>,
}

impl Sessions {
    /// No sessions; they expire after `timeout` of idle time.
    pub fn new(timeout: Duration) -> Sessions {
        Sessions {
            timeout,
            map: HashMap::new(),
        }
    }

    /// Opens a session; returns its 32-hex id.
    pub fn login(&mut self) -> String {
        let now = Instant::now();
        if self.map.len() >= MAX_SESSIONS {
            let timeout = self.timeout;
            self.map.retain(|_, t| now.duration_since(*t) <= timeout);
        }
        if self.map.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let id = format!("{:032x}", rand::random::<u128>());
        self.map.insert(id.clone(), now);
        id
    }

    /// True when the session exists and has not been idle too long; marks it
    /// used. An idle-expired session is forgotten.
    pub fn touch(&mut self, id: &str) -> bool {
        let now = Instant::now();
        match self.map.get_mut(id) {
            Some(t) if now.duration_since(*t) <= self.timeout => {
                *t = now;
                true
            }
            Some(_) => {
                self.map.remove(id);
                false
            }
            None => false,
        }
    }

    /// Ends a session.
    pub fn end(&mut self, id: &str) {
        self.map.remove(id);
    }

    /// Ends every session.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when none is open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn has_nil(v: &Value) -> bool {
    match v {
        Value::Nil => true,
        Value::Array(a) => a.iter().any(has_nil),
        Value::Struct(m) => m.iter().any(|(_, v)| has_nil(v)),
        _ => false,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) | Value::DateTime(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
        _ => String::new(),
    }
}

/// Answers a request on `/api/xmlrpc/`.
pub(super) async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Resp {
    let c = &inner.counters;
    if req.method() != Method::POST {
        c.route("xmlrpc not POST");
        return fault_resp(&fault(630, "Unable to read request"));
    }
    let Some(body) = read_body(req.into_body(), MAX_SHOP_BODY).await else {
        c.route("xmlrpc too large");
        return fault_resp(&fault(630, "Unable to read request"));
    };
    let (method, params) = match xmlrpc::decode_call(&body) {
        Ok(x) => x,
        Err(_) => {
            c.route("xmlrpc malformed");
            // Zend reports a value it cannot build (e.g. <nil/>) as 636.
            let code = if String::from_utf8_lossy(&body).contains("<nil") {
                636
            } else {
                631
            };
            let msg = if code == 636 {
                "Error creating xmlrpc value"
            } else {
                "Failed to parse request"
            };
            return fault_resp(&fault(code, msg));
        }
    };
    if params.iter().any(has_nil) {
        c.route("xmlrpc nil");
        return fault_resp(&fault(636, "Error creating xmlrpc value"));
    }
    let inner2 = inner.clone();
    let out = tokio::task::spawn_blocking(move || dispatch(&inner2, &method, &params)).await;
    match out {
        Ok(Ok(v)) => xml(xmlrpc::encode_response(&v)),
        Ok(Err(f)) => fault_resp(&f),
        Err(_) => fault_resp(&fault(1, "Internal Error. Please see log for details.")),
    }
}

fn signature_mismatch() -> Fault {
    fault(623, "Calling parameters do not match signature")
}

fn dispatch(inner: &Inner, method: &str, params: &[Value]) -> Result<Value, Fault> {
    let c = &inner.counters;
    match method {
        "login" => {
            c.route("xmlrpc login");
            bump(&c.m1_logins);
            let (Some(user), Some(key)) = (
                params.first().and_then(Value::as_str),
                params.get(1).and_then(Value::as_str),
            ) else {
                return Err(signature_mismatch());
            };
            let ok = super::read(&inner.accepted)
                .iter()
                .any(|c| user == c.api_user && key == c.api_key);
            if !ok {
                bump(&c.auth_failures);
                return Err(access_denied());
            }
            let id = lock(&inner.sessions).login();
            if let crate::sim::Fault::M1HugeSession { bytes } = &*lock(&inner.fault) {
                bump(&c.faults_injected);
                let n = usize::try_from(*bytes).unwrap_or(usize::MAX);
                return Ok(Value::String(id.chars().cycle().take(n).collect()));
            }
            Ok(Value::String(id))
        }
        "endSession" => {
            c.route("xmlrpc endSession");
            if let Some(sid) = params.first().and_then(Value::as_str) {
                lock(&inner.sessions).end(sid);
            }
            Ok(Value::Bool(true))
        }
        "call" => {
            bump(&c.m1_calls);
            let (Some(sid), Some(path)) = (
                params.first().and_then(Value::as_str),
                params.get(1).and_then(Value::as_str),
            ) else {
                c.route("xmlrpc call");
                return Err(signature_mismatch());
            };
            c.route(&format!("xmlrpc call {}", label(path)));
            if !lock(&inner.sessions).touch(sid) {
                return Err(session_expired());
            }
            exec(inner, path, params.get(2))
        }
        "multiCall" => {
            c.route("xmlrpc multiCall");
            bump(&c.m1_multicalls);
            let (Some(sid), Some(Value::Array(calls))) =
                (params.first().and_then(Value::as_str), params.get(1))
            else {
                return Err(signature_mismatch());
            };
            if !lock(&inner.sessions).touch(sid) {
                return Err(session_expired());
            }
            let stop_on_fault = params
                .get(2)
                .and_then(|o| o.get("break"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let mut out = Vec::with_capacity(calls.len());
            for item in calls {
                c.m1_multicall_items
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = match item {
                    Value::Array(parts) => match parts.first().and_then(Value::as_str) {
                        Some(path) => {
                            c.route(&format!("xmlrpc multiCall {}", label(path)));
                            exec(inner, path, parts.get(1))
                        }
                        None => Err(fault(3, "Invalid api path.")),
                    },
                    _ => Err(fault(3, "Invalid api path.")),
                };
                match r {
                    Ok(v) => out.push(v),
                    Err((code, msg)) => {
                        out.push(Value::Struct(vec![
                            ("isFault".into(), Value::Bool(true)),
                            ("faultCode".into(), Value::Int(code)),
                            ("faultMessage".into(), Value::String(msg)),
                        ]));
                        if stop_on_fault {
                            break;
                        }
                    }
                }
            }
            Ok(Value::Array(out))
        }
        other => {
            c.route("xmlrpc unknown method");
            Err(fault(
                620,
                &format!("Method \"{}\" does not exist", label(other)),
            ))
        }
    }
}

/// A client-chosen name, shortened for counters and messages.
fn label(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The arguments of a call as a list (PHP `call_user_func_array` semantics:
/// an array is the list, a struct its values in order, a scalar one
/// argument).
fn arg_list(args: Option<&Value>) -> Vec<Value> {
    match args {
        None | Some(Value::Nil) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Struct(m)) => m.iter().map(|(_, v)| v.clone()).collect(),
        Some(v) => vec![v.clone()],
    }
}

fn exec(inner: &Inner, path: &str, args: Option<&Value>) -> Result<Value, Fault> {
    let (resource, method) = path.split_once('.').unwrap_or((path, ""));
    let resource = match resource {
        "product" => "catalog_product",
        "magento" => "core_magento",
        r => r,
    };
    let acl = match (resource, method) {
        ("catalog_product", "list" | "info") => "catalog/product/info",
        ("catalog_product", "update") => "catalog/product/update",
        ("core_magento", "info") => "core/magento/info",
        _ => return Err(fault(3, "Invalid api path.")),
    };
    if inner.is_revoked(acl) {
        bump(&inner.counters.auth_failures);
        return Err(access_denied());
    }
    let args = arg_list(args);
    match (resource, method) {
        ("catalog_product", "list") => product_list(inner, args.first(), args.get(1)),
        ("catalog_product", "info") => {
            let lang = store_lang(inner, args.get(1))?;
            let mut row = find_product(inner, args.first(), args.get(3))?;
            match &*lock(&inner.fault) {
                crate::sim::Fault::M1InfoFault { code, every }
                    if *every > 0 && row.id % every == 0 =>
                {
                    bump(&inner.counters.faults_injected);
                    let msg = match code {
                        101 => "Product not exists.",
                        1 => "Internal Error. Please see log for details.",
                        0 => "Unknown Error",
                        _ => "Fault.",
                    };
                    return Err(fault(*code, msg));
                }
                crate::sim::Fault::M1InfoWrongId { every } if *every > 0 && row.id % every == 0 => {
                    bump(&inner.counters.faults_injected);
                    let c = read(&inner.catalog);
                    let other = c
                        .ids()
                        .iter()
                        .find(|i| **i > row.id)
                        .or(c.ids().first())
                        .and_then(|i| c.get(*i));
                    if let Some(o) = other {
                        row = o;
                    }
                }
                _ => {}
            }
            let attrs: Option<Vec<String>> = match args.get(2) {
                Some(Value::Array(a)) if !a.is_empty() => Some(a.iter().map(text).collect()),
                _ => None,
            };
            let mut v = info_value(inner.cfg.seed, &row, lang, attrs.as_deref());
            if let (Some(sku), Value::Struct(m)) = (quirk_sku(inner, row.id), &mut v) {
                for (k, val) in m.iter_mut() {
                    if k == "sku" {
                        *val = Value::String(sku.clone());
                    }
                }
            }
            Ok(v)
        }
        ("catalog_product", "update") => {
            store_lang(inner, args.get(2))?;
            let row = find_product(inner, args.first(), args.get(3))?;
            let data = args.get(1);
            let get = |k: &str| data.and_then(|d| d.get(k)).map(text);
            let price = get("price")
                .and_then(|p| p.trim().parse::<f64>().ok())
                .map(|p| (p * 100.0).round().max(0.0) as u32);
            let small = |k: &str| get(k).and_then(|s| s.trim().parse::<u8>().ok());
            write(&inner.catalog).update(
                row.id,
                price,
                small("status"),
                small("visibility"),
                catalog::now_secs(),
            );
            Ok(Value::Bool(true))
        }
        ("core_magento", "info") => Ok(Value::Struct(vec![
            ("magento_edition".into(), Value::str("Community")),
            ("magento_version".into(), Value::str(MAGENTO_VERSION)),
        ])),
        _ => Err(fault(3, "Invalid api path.")),
    }
}

fn store_not_found() -> Fault {
    fault(100, "Requested store view not found.")
}

/// The language of the `store` argument (code or id; empty for default).
fn store_lang(inner: &Inner, store: Option<&Value>) -> Result<Lang, Fault> {
    let codes = &inner.cfg.store_codes;
    let by_id = |id: i64| -> Result<Lang, Fault> {
        if id == 0 {
            return Ok(Lang::for_store(inner.default_store()));
        }
        usize::try_from(id - 1)
            .ok()
            .and_then(|i| codes.get(i))
            .map(|c| Lang::for_store(c))
            .ok_or_else(store_not_found)
    };
    match store {
        None | Some(Value::Nil) => Ok(Lang::for_store(inner.default_store())),
        Some(Value::Int(i)) => by_id(*i),
        Some(Value::String(s)) if s.is_empty() => Ok(Lang::for_store(inner.default_store())),
        Some(Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => by_id(i),
            Err(_) if s == "admin" => Ok(Lang::for_store(inner.default_store())),
            Err(_) => codes
                .iter()
                .find(|c| *c == s)
                .map(|c| Lang::for_store(c))
                .ok_or_else(store_not_found),
        },
        Some(_) => Err(store_not_found()),
    }
}

/// Magento 1 reads a product argument as an id when it is an integer or a
/// string matching `^[+-]?[1-9][0-9]*$|^0$`, as a SKU otherwise, unless
/// `identifierType` says which.
fn find_product(
    inner: &Inner,
    product: Option<&Value>,
    ident: Option<&Value>,
) -> Result<Row, Fault> {
    let not_exists = || fault(101, "Product not exists.");
    let ident = ident.and_then(Value::as_str).map(str::to_ascii_lowercase);
    let c = read(&inner.catalog);
    let by_id = |s: &str| {
        s.trim()
            .parse::<i64>()
            .ok()
            .and_then(|i| u32::try_from(i).ok())
            .and_then(|i| c.get(i))
    };
    let row = match (product, ident.as_deref()) {
        (None, _) => None,
        (Some(p), Some("sku")) => c.find_sku(&text(p)),
        (Some(p), Some("id")) => by_id(&text(p)),
        (Some(Value::Int(i)), _) => u32::try_from(*i).ok().and_then(|i| c.get(i)),
        (Some(p), _) => {
            let s = text(p);
            if looks_like_id(&s) {
                by_id(&s)
            } else {
                c.find_sku(&s)
            }
        }
    };
    row.ok_or_else(not_exists)
}

fn looks_like_id(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    s == "0" || (!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0'))
}

fn unknown_error() -> Fault {
    fault(0, "Unknown Error")
}

/// `catalog_product.list` filters: `{attr: value}` (eq), `{attr: [a, b]}`
/// (in) or `{attr: {op: value, ...}}`; every condition is AND-ed.
fn list_filters(filters: Option<&Value>) -> Result<Vec<Vec<Filter>>, Fault> {
    let members = match filters {
        None | Some(Value::Nil) => return Ok(Vec::new()),
        Some(Value::Array(a)) if a.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::Struct(m)) => m,
        Some(_) => return Err(unknown_error()),
    };
    let mut groups = Vec::new();
    for (attr, cond) in members {
        let field = Field::from_m1(attr).ok_or_else(unknown_error)?;
        let values = |v: &Value| -> Vec<String> {
            match v {
                Value::Array(a) => a.iter().map(text).collect(),
                Value::String(s) if s.contains(',') => {
                    s.split(',').map(|x| x.trim().to_string()).collect()
                }
                other => vec![text(other)],
            }
        };
        match cond {
            Value::Struct(ops) => {
                for (op, v) in ops {
                    let op = Op::parse(op).ok_or_else(unknown_error)?;
                    let vals = if matches!(op, Op::In | Op::Nin) {
                        values(v)
                    } else {
                        vec![text(v)]
                    };
                    groups.push(vec![Filter::new(field, op, &vals)]);
                }
            }
            Value::Array(a) => {
                let vals: Vec<String> = a.iter().map(text).collect();
                groups.push(vec![Filter::new(field, Op::In, &vals)]);
            }
            v => groups.push(vec![Filter::new(field, Op::Eq, &[text(v)])]),
        }
    }
    Ok(groups)
}

fn strings(v: &[u32]) -> Value {
    Value::Array(v.iter().map(|x| Value::String(x.to_string())).collect())
}

fn product_list(
    inner: &Inner,
    filters: Option<&Value>,
    store: Option<&Value>,
) -> Result<Value, Fault> {
    let lang = store_lang(inner, store)?;
    let mut groups = list_filters(filters)?;
    if *lock(&inner.fault) == crate::sim::Fault::M1ListIgnoresRange {
        let before = groups.len();
        groups.retain(|g| !g.iter().any(|f| f.field == Field::EntityId));
        if groups.len() != before {
            bump(&inner.counters.faults_injected);
        }
    }
    let query = Query {
        groups,
        lang,
        ..Query::default()
    };
    let page = read(&inner.catalog).query(&query, 0);
    let seed = inner.cfg.seed;
    Ok(Value::Array(
        page.rows
            .iter()
            .map(|r| {
                Value::Struct(vec![
                    ("product_id".into(), Value::String(r.id.to_string())),
                    (
                        "sku".into(),
                        Value::String(
                            quirk_sku(inner, r.id).unwrap_or_else(|| catalog::sku_for(seed, r.id)),
                        ),
                    ),
                    (
                        "name".into(),
                        Value::String(catalog::name_for(seed, r.id, lang)),
                    ),
                    ("set".into(), Value::String(r.set_id.to_string())),
                    ("type".into(), Value::str(r.type_id())),
                    (
                        "category_ids".into(),
                        strings(&catalog::categories_for(seed, r.id)),
                    ),
                    (
                        "website_ids".into(),
                        strings(&catalog::websites_for(seed, r.id)),
                    ),
                ])
            })
            .collect(),
    ))
}

/// The SKU product `id` is rendered with instead of its own (see
/// [`crate::sim::SimHandle::duplicate_sku`]).
fn quirk_sku(inner: &Inner, id: u32) -> Option<String> {
    read(&inner.quirks).get(&id).and_then(|q| q.sku.clone())
}

/// A product as `catalog_product.info` returns it: `product_id`, `sku`,
/// `set`, `type`, `categories`, `websites`, then the attributes (all, or
/// those named in `attributes`), values as strings like Magento 1 sends them.
pub fn info_value(seed: u64, r: &Row, lang: Lang, attributes: Option<&[String]>) -> Value {
    let mut m: Vec<(String, Value)> = vec![
        ("product_id".into(), Value::String(r.id.to_string())),
        ("sku".into(), Value::String(catalog::sku_for(seed, r.id))),
        ("set".into(), Value::String(r.set_id.to_string())),
        ("type".into(), Value::str(r.type_id())),
        (
            "categories".into(),
            strings(&catalog::categories_for(seed, r.id)),
        ),
        (
            "websites".into(),
            strings(&catalog::websites_for(seed, r.id)),
        ),
    ];
    let name = catalog::name_for(seed, r.id, lang);
    let description = catalog::description_for(seed, r.id, lang);
    let short: String = description.chars().take(60).collect();
    let url_key = catalog::url_key_for(seed, r.id);
    let mut attrs: Vec<(&str, String)> = vec![
        ("type_id", r.type_id().to_string()),
        ("name", name.clone()),
        ("description", description),
        ("short_description", short),
        ("url_key", url_key.clone()),
        ("url_path", format!("{url_key}.html")),
        ("status", r.status.to_string()),
        ("visibility", r.visibility.to_string()),
        (
            "price",
            format!("{}.{:02}00", r.price_cents / 100, r.price_cents % 100),
        ),
    ];
    if let Some(w) = r.weight_kg() {
        attrs.push(("weight", format!("{w:.4}")));
    }
    attrs.push(("tax_class_id", "2".to_string()));
    if let Some(c) = catalog::color_for(seed, r.id) {
        attrs.push(("color", c.to_string()));
    }
    attrs.push(("meta_title", name));
    attrs.push(("has_options", "0".to_string()));
    attrs.push(("required_options", "0".to_string()));
    attrs.push(("created_at", catalog::fmt_ts(r.created_at)));
    attrs.push(("updated_at", catalog::fmt_ts(r.updated_at)));
    for (k, v) in attrs {
        if attributes.is_none_or(|want| want.iter().any(|w| w == k)) {
            m.push((k.to_string(), Value::String(v)));
        }
    }
    Value::Struct(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle() {
        let mut s = Sessions::new(Duration::from_millis(30));
        let id = s.login();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(s.touch(&id));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!s.touch(&id));
        assert!(s.is_empty());
        assert!(!s.touch("nope"));
    }

    #[test]
    fn sessions_are_bounded() {
        let mut s = Sessions::new(Duration::from_secs(60));
        for _ in 0..MAX_SESSIONS + 5 {
            s.login();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn id_or_sku() {
        assert!(looks_like_id("123"));
        assert!(looks_like_id("0"));
        assert!(looks_like_id("+5"));
        assert!(!looks_like_id("0123"));
        assert!(!looks_like_id("12a"));
        assert!(!looks_like_id(""));
    }

    #[test]
    fn filters() {
        let f = Value::Struct(vec![
            (
                "product_id".into(),
                Value::Struct(vec![
                    ("from".into(), Value::str("10")),
                    ("to".into(), Value::Int(20)),
                ]),
            ),
            ("sku".into(), Value::str("abc")),
            ("type".into(), Value::Array(vec![Value::str("simple")])),
        ]);
        let g = list_filters(Some(&f)).unwrap();
        assert_eq!(g.len(), 4);
        assert_eq!(g[0][0].field, Field::EntityId);
        let bad = Value::Struct(vec![(
            "product_id".into(),
            Value::Struct(vec![("between".into(), Value::str("1"))]),
        )]);
        assert_eq!(list_filters(Some(&bad)).unwrap_err().0, 0);
        assert!(list_filters(None).unwrap().is_empty());
    }

    #[test]
    fn info_shape() {
        let c = catalog::Catalog::generate(42, 20);
        let r = c.get(c.ids()[0]).unwrap();
        let v = info_value(42, &r, Lang::En, None).to_json();
        for k in [
            "product_id",
            "sku",
            "set",
            "type",
            "categories",
            "websites",
            "name",
            "price",
            "updated_at",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(v.get("category_ids").is_none());
        assert!(v["product_id"].is_string());
        let only = info_value(42, &r, Lang::En, Some(&["name".to_string()])).to_json();
        assert!(
            only.get("name").is_some() && only.get("price").is_none() && only.get("sku").is_some()
        );
    }
}
