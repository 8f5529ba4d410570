//! Magento 2 REST as a 2.4 shop answers it: store-view paths, OAuth 1.0a
//! (HMAC-SHA256 only) or bearer, ACL per route, `searchCriteria` parsed the
//! way PHP reads a query string, `fields` projection, and the error bodies
//! (`{"message", "parameters"}` with the placeholders left in).

use super::{Inner, bump, lock, read, write};
use crate::magento::oauth;
use crate::sim::catalog::{self, Dir, Field, Filter, Lang, Op, Query, Row};
use crate::sim::faults::Fault;
use crate::sim::server::{MAX_SHOP_BODY, Resp, json, json_bytes, read_body};
use hyper::body::Incoming;
use hyper::{Method, Request};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// ACL resource of the catalog routes.
pub const ACL_PRODUCTS: &str = "Magento_Catalog::products";
/// ACL resource of the store routes.
pub const ACL_STORE: &str = "Magento_Backend::store";

/// OAuth clock drift Magento allows, in seconds.
pub const MAX_DRIFT: u64 = 600;
/// Nonces remembered at most.
pub const MAX_NONCES: usize = 100_000;
/// Longest nonce accepted.
const MAX_NONCE_LEN: usize = 256;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

fn error(status: u16, message: &str, parameters: Option<Value>) -> Resp {
    let body = match parameters {
        Some(p) => json!({ "message": message, "parameters": p }),
        None => json!({ "message": message }),
    };
    json(status, &body)
}

fn fail<T>(r: Resp) -> Result<T, Box<Resp>> {
    Err(Box::new(r))
}

fn no_route() -> Resp {
    error(404, "Request does not match any route.", None)
}

fn not_authorized(resource: &str) -> Resp {
    error(
        401,
        "The consumer isn't authorized to access %resources.",
        Some(json!({ "resources": resource })),
    )
}

fn required(field: &str) -> Resp {
    error(
        400,
        "\"%fieldName\" is required. Enter and try again.",
        Some(json!({ "fieldName": field })),
    )
}

fn bad_type(value: &str, ty: &str) -> Resp {
    error(
        400,
        "The \"%value\" value's type is invalid. The \"%type\" type was expected. Verify and try again.",
        Some(json!({ "value": value, "type": ty })),
    )
}

fn product_missing() -> Resp {
    error(
        404,
        "The product that was requested doesn't exist. Verify the product and try again.",
        None,
    )
}

// ---------------------------------------------------------------------------
// Nonces
// ---------------------------------------------------------------------------

/// The OAuth nonces seen recently: bounded in count ([`MAX_NONCES`]) and in
/// age (a nonce older than twice the allowed drift can no longer come with
/// an acceptable timestamp).
#[derive(Debug, Default)]
pub struct NonceCache {
    seen: HashSet<String>,
    order: VecDeque<(u64, String)>,
}

impl NonceCache {
    /// Records a nonce; false when it was already used (or is too long).
    pub fn insert(&mut self, nonce: &str, now: u64) -> bool {
        while let Some((t, _)) = self.order.front() {
            if t.saturating_add(2 * MAX_DRIFT) < now || self.order.len() >= MAX_NONCES {
                if let Some((_, n)) = self.order.pop_front() {
                    self.seen.remove(&n);
                }
            } else {
                break;
            }
        }
        if nonce.len() > MAX_NONCE_LEN || self.seen.contains(nonce) {
            return false;
        }
        self.seen.insert(nonce.to_string());
        self.order.push_back((now, nonce.to_string()));
        true
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when none is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks the `Authorization` header of a request for a route protected by
/// `resource`. `Err` carries the answer to send.
fn authenticate(inner: &Inner, req: &Request<Incoming>, resource: &str) -> Result<(), Box<Resp>> {
    let accepted = super::read(&inner.accepted).clone();
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let scheme_is = |s: &str| {
        header
            .get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    };
    if scheme_is("bearer ") {
        let token = header[7..].trim();
        if inner.bearer.load(std::sync::atomic::Ordering::Relaxed)
            && accepted.iter().any(|c| token == c.access_token)
        {
            return Ok(());
        }
        return fail(not_authorized(resource));
    }
    if !scheme_is("oauth ") {
        // Missing or another scheme: an anonymous request.
        return fail(not_authorized(resource));
    }
    let Ok(p) = oauth::parse_authorization(header) else {
        return fail(not_authorized(resource));
    };
    if let Some(v) = p.version.as_deref() {
        if v != "1.0" {
            return fail(error(
                400,
                "OAuth version %1 is not supported",
                Some(json!([v])),
            ));
        }
    }
    if p.signature_method != oauth::SIGNATURE_METHOD {
        return fail(error(
            400,
            "Signature method %1 is not supported",
            Some(json!([p.signature_method])),
        ));
    }
    let Some(creds) = accepted.iter().find(|c| c.consumer_key == p.consumer_key) else {
        return fail(error(
            401,
            "A consumer having the specified key does not exist",
            None,
        ));
    };
    if p.token != creds.access_token {
        return fail(error(401, "Specified token does not exist", None));
    }
    let now = unix_now();
    let nonce_error = || error(401, "An error occurred validating the nonce", None);
    if p.timestamp.abs_diff(now) > MAX_DRIFT {
        return fail(nonce_error());
    }
    if !lock(&inner.nonces).insert(&p.nonce, now) {
        return fail(nonce_error());
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{}", inner.port));
    let pq = req
        .uri()
        .path_and_query()
        .map(|x| x.as_str())
        .unwrap_or("/");
    let scheme = if inner.tls.is_some() { "https" } else { "http" };
    let ok = url::Url::parse(&format!("{scheme}://{host}{pq}")).is_ok_and(|url| {
        oauth::verify(
            req.method().as_str(),
            &url,
            &p,
            &creds.consumer_secret,
            &creds.access_token_secret,
        )
    });
    if !ok {
        return fail(error(
            401,
            "The signature is invalid. Verify and try again.",
            None,
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Query strings, PHP style
// ---------------------------------------------------------------------------

/// PHP `urldecode`: `+` is a space, then `%XX`.
pub fn urldecode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// A parsed query string, nested the way PHP builds `$_GET` from
/// `a[b][c]=v`. Member order is insertion order, as in a PHP array.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A value.
    Leaf(String),
    /// An array.
    Map(Vec<(String, Node)>),
}

/// Pairs read at most from one query string.
const MAX_QUERY_PAIRS: usize = 1000;
/// Deepest bracket nesting read.
const MAX_QUERY_DEPTH: usize = 12;

impl Node {
    /// Parses a raw query string.
    pub fn parse_query(raw: &str) -> Node {
        let mut root = Node::Map(Vec::new());
        for piece in raw
            .split('&')
            .filter(|p| !p.is_empty())
            .take(MAX_QUERY_PAIRS)
        {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let key = urldecode(k);
            let value = urldecode(v);
            let Some(path) = key_path(&key) else {
                continue;
            };
            root.insert(&path, value);
        }
        root
    }

    fn insert(&mut self, path: &[String], value: String) {
        let Node::Map(members) = self else {
            *self = Node::Map(Vec::new());
            return self.insert(path, value);
        };
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let name = if first.is_empty() {
            // `a[]=`: the next integer key.
            let next = members
                .iter()
                .filter_map(|(k, _)| k.parse::<i64>().ok())
                .max()
                .map_or(0, |m| m + 1);
            next.to_string()
        } else {
            first.clone()
        };
        if rest.is_empty() {
            match members.iter_mut().find(|(k, _)| *k == name) {
                Some(slot) => slot.1 = Node::Leaf(value),
                None => members.push((name, Node::Leaf(value))),
            }
            return;
        }
        let idx = match members.iter().position(|(k, _)| *k == name) {
            Some(i) => i,
            None => {
                members.push((name, Node::Map(Vec::new())));
                members.len() - 1
            }
        };
        members[idx].1.insert(rest, value);
    }

    /// The member `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Node::Leaf(_) => None,
        }
    }

    /// The first of several spellings (`filter_groups` / `filterGroups`).
    fn get_any(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().find_map(|k| self.get(k))
    }

    /// The text of a leaf.
    pub fn leaf(&self) -> Option<&str> {
        match self {
            Node::Leaf(s) => Some(s),
            Node::Map(_) => None,
        }
    }

    fn members(&self) -> &[(String, Node)] {
        match self {
            Node::Map(m) => m,
            Node::Leaf(_) => &[],
        }
    }
}

/// `a[b][c]` → `["a", "b", "c"]`; `None` for an empty base name.
fn key_path(key: &str) -> Option<Vec<String>> {
    let (base, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if base.is_empty() {
        return None;
    }
    let mut path = vec![base.to_string()];
    while let Some(r) = rest.strip_prefix('[') {
        let Some(end) = r.find(']') else {
            break;
        };
        if path.len() >= MAX_QUERY_DEPTH {
            break;
        }
        path.push(r[..end].to_string());
        rest = &r[end + 1..];
    }
    Some(path)
}

// ---------------------------------------------------------------------------
// searchCriteria
// ---------------------------------------------------------------------------

/// A parsed `GET /V1/products` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Criteria {
    /// The query (language and paging mode set by the caller).
    pub query: Query,
    /// `search_criteria` as the answer echoes it.
    pub echo: Value,
}

fn int_of(node: &Node) -> Result<i64, Box<Resp>> {
    let s = node.leaf().unwrap_or("");
    s.trim()
        .parse::<i64>()
        .map_err(|_| Box::new(bad_type(s, "int")))
}

/// Reads `searchCriteria` from a parsed query. `Err` is the 400 to answer.
pub fn parse_criteria(root: &Node, max_page_size: u32) -> Result<Criteria, Box<Resp>> {
    let Some(sc) = root.get("searchCriteria") else {
        return fail(required("searchCriteria"));
    };
    let mut query = Query::default();
    let mut echo = serde_json::Map::new();
    let mut groups_echo = Vec::new();
    for (_, g) in sc
        .get_any(&["filter_groups", "filterGroups"])
        .map(Node::members)
        .unwrap_or(&[])
    {
        let mut group = Vec::new();
        let mut filters_echo = Vec::new();
        for (_, f) in g.get("filters").map(Node::members).unwrap_or(&[]) {
            let Some(field_name) = f.get("field").and_then(Node::leaf) else {
                return fail(required("field"));
            };
            let value = f.get("value").and_then(Node::leaf).unwrap_or("");
            let ctype = f
                .get_any(&["condition_type", "conditionType"])
                .and_then(Node::leaf);
            let mut fe = serde_json::Map::new();
            fe.insert("field".into(), field_name.into());
            if f.get("value").is_some() {
                fe.insert("value".into(), value.into());
            }
            if let Some(c) = ctype {
                fe.insert("condition_type".into(), c.into());
            }
            filters_echo.push(Value::Object(fe));
            let Some(field) = Field::from_m2(field_name) else {
                return fail(error(
                    400,
                    "Invalid attribute name: %1",
                    Some(json!([field_name])),
                ));
            };
            let op_name = ctype.filter(|c| !c.is_empty()).unwrap_or("eq");
            let Some(op) = Op::parse(op_name) else {
                return fail(error(
                    400,
                    "Invalid condition type: %1",
                    Some(json!([op_name])),
                ));
            };
            let values: Vec<String> = if matches!(op, Op::In | Op::Nin) {
                value.split(',').map(|v| v.trim().to_string()).collect()
            } else {
                vec![value.to_string()]
            };
            group.push(Filter::new(field, op, &values));
        }
        groups_echo.push(json!({ "filters": filters_echo }));
        if !group.is_empty() {
            query.groups.push(group);
        }
    }
    echo.insert("filter_groups".into(), Value::Array(groups_echo));
    if let Some(sorts) = sc.get_any(&["sortOrders", "sort_orders"]) {
        let mut sorts_echo = Vec::new();
        for (_, s) in sorts.members() {
            let Some(field_name) = s.get("field").and_then(Node::leaf) else {
                continue;
            };
            let dir_name = s.get("direction").and_then(Node::leaf);
            let mut se = serde_json::Map::new();
            se.insert("field".into(), field_name.into());
            if let Some(d) = dir_name {
                se.insert("direction".into(), d.into());
            }
            sorts_echo.push(Value::Object(se));
            // Magento sorts descending unless told ASC.
            let dir = match dir_name {
                Some(d) if d.eq_ignore_ascii_case("asc") => Dir::Asc,
                _ => Dir::Desc,
            };
            // An unknown sort attribute is ignored, as the EAV collection does.
            if let Some(field) = Field::from_m2(field_name) {
                query.sort.push((field, dir));
            }
        }
        echo.insert("sort_orders".into(), Value::Array(sorts_echo));
    }
    if let Some(ps) = sc.get_any(&["pageSize", "page_size"]) {
        let n = int_of(ps)?;
        if n > i64::from(max_page_size) {
            return fail(error(
                400,
                "Maximum SearchCriteria pageSize is %max",
                Some(json!({ "max": max_page_size })),
            ));
        }
        echo.insert("page_size".into(), n.into());
        query.page_size = u32::try_from(n).ok().filter(|n| *n > 0);
    }
    if let Some(cp) = sc.get_any(&["currentPage", "current_page"]) {
        let n = int_of(cp)?;
        echo.insert("current_page".into(), n.into());
        query.current_page = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    }
    Ok(Criteria {
        query,
        echo: Value::Object(echo),
    })
}

// ---------------------------------------------------------------------------
// fields=
// ---------------------------------------------------------------------------

/// A `fields` projection: names, each with an optional nested projection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields(pub Vec<(String, Option<Fields>)>);

/// Parses `items[sku,extension_attributes[website_ids]],total_count`.
pub fn parse_fields(s: &str) -> Fields {
    fn list(chars: &[char], pos: &mut usize, depth: usize) -> Fields {
        let mut out: Vec<(String, Option<Fields>)> = Vec::new();
        let mut name = String::new();
        while *pos < chars.len() {
            let c = chars[*pos];
            *pos += 1;
            match c {
                ',' => {
                    if !name.trim().is_empty() {
                        out.push((name.trim().to_string(), None));
                    }
                    name.clear();
                }
                '[' => {
                    let sub = if depth < 16 {
                        list(chars, pos, depth + 1)
                    } else {
                        Fields::default()
                    };
                    out.push((name.trim().to_string(), Some(sub)));
                    name.clear();
                    // Skip to the separator after the closing bracket.
                    while *pos < chars.len() && chars[*pos] != ',' && chars[*pos] != ']' {
                        *pos += 1;
                    }
                    if *pos < chars.len() && chars[*pos] == ',' {
                        *pos += 1;
                    }
                }
                ']' => break,
                c => name.push(c),
            }
        }
        if !name.trim().is_empty() {
            out.push((name.trim().to_string(), None));
        }
        Fields(out)
    }
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    list(&chars, &mut pos, 0)
}

/// Keeps only the projected members (arrays are projected element-wise).
pub fn project(v: Value, f: &Fields) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.into_iter().map(|x| project(x, f)).collect()),
        Value::Object(mut m) => {
            let mut out = serde_json::Map::new();
            for (name, sub) in &f.0 {
                if let Some(x) = m.remove(name) {
                    let x = match sub {
                        Some(s) if !s.0.is_empty() => project(x, s),
                        _ => x,
                    };
                    out.insert(name.clone(), x);
                }
            }
            Value::Object(out)
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Items
// ---------------------------------------------------------------------------

/// `extension_attributes.category_links[]`.
#[derive(Debug, Clone, Serialize)]
pub struct CategoryLink {
    /// Position in the category.
    pub position: u32,
    /// Category id, a string as Magento sends it.
    pub category_id: String,
}

/// `extension_attributes.stock_item` (single-product answers only).
#[derive(Debug, Clone, Serialize)]
pub struct StockItem {
    item_id: u32,
    product_id: u32,
    stock_id: u32,
    qty: u32,
    is_in_stock: bool,
}

/// `extension_attributes`.
#[derive(Debug, Clone, Serialize)]
pub struct ExtensionAttributes {
    /// Websites the product is in.
    pub website_ids: Vec<u32>,
    /// Categories.
    pub category_links: Vec<CategoryLink>,
    /// Stock, on `GET /V1/products/{sku}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stock_item: Option<StockItem>,
}

/// A custom attribute value: a string, or an array for `category_ids`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// Most attributes.
    Text(String),
    /// `category_ids`.
    List(Vec<String>),
    /// JSON text sent as it is ([`SimHandle::set_raw_attribute`]): what a
    /// broken extension may put in an answer (nesting 100,000 deep, a
    /// lone surrogate `"\ud800"`, control characters).
    ///
    /// [`SimHandle::set_raw_attribute`]: crate::sim::SimHandle::set_raw_attribute
    Raw(Box<serde_json::value::RawValue>),
}

/// `custom_attributes[]`.
#[derive(Debug, Clone, Serialize)]
pub struct CustomAttribute {
    /// Attribute code.
    pub attribute_code: std::borrow::Cow<'static, str>,
    /// Value.
    pub value: AttrValue,
}

/// A product as `GET /V1/products` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Entity id.
    pub id: u32,
    /// SKU.
    pub sku: String,
    /// Name in the store view's language.
    pub name: String,
    /// Attribute set.
    pub attribute_set_id: u8,
    /// Price.
    pub price: f64,
    /// 1 enabled, 2 disabled.
    pub status: u8,
    /// Visibility.
    pub visibility: u8,
    /// `simple`, `configurable`, `virtual`.
    pub type_id: &'static str,
    /// `YYYY-MM-DD HH:MM:SS`.
    pub created_at: String,
    /// `YYYY-MM-DD HH:MM:SS`.
    pub updated_at: String,
    /// Absent for virtual products.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Websites, categories (and stock on single answers).
    pub extension_attributes: ExtensionAttributes,
    /// Always empty here.
    pub product_links: [u8; 0],
    /// Always empty here.
    pub options: [u8; 0],
    /// Always empty here.
    pub media_gallery_entries: [u8; 0],
    /// Always empty here.
    pub tier_prices: [u8; 0],
    /// EAV attributes, values as strings.
    pub custom_attributes: Vec<CustomAttribute>,
}

impl Item {
    /// Renders a row in a store view's language; `single` adds what the
    /// single-product route adds (stock).
    pub fn new(seed: u64, r: &Row, lang: Lang, single: bool) -> Item {
        let cats = catalog::categories_for(seed, r.id);
        let name = catalog::name_for(seed, r.id, lang);
        let mut attrs = Vec::with_capacity(10);
        let description = catalog::description_for(seed, r.id, lang);
        if !description.is_empty() {
            attrs.push(CustomAttribute {
                attribute_code: "description".into(),
                value: AttrValue::Text(description),
            });
        }
        attrs.push(CustomAttribute {
            attribute_code: "meta_title".into(),
            value: AttrValue::Text(name.clone()),
        });
        attrs.push(CustomAttribute {
            attribute_code: "url_key".into(),
            value: AttrValue::Text(catalog::url_key_for(seed, r.id)),
        });
        attrs.push(CustomAttribute {
            attribute_code: "category_ids".into(),
            value: AttrValue::List(cats.iter().map(u32::to_string).collect()),
        });
        attrs.push(CustomAttribute {
            attribute_code: "options_container".into(),
            value: AttrValue::Text("container2".into()),
        });
        attrs.push(CustomAttribute {
            attribute_code: "required_options".into(),
            value: AttrValue::Text("0".into()),
        });
        attrs.push(CustomAttribute {
            attribute_code: "has_options".into(),
            value: AttrValue::Text("0".into()),
        });
        attrs.push(CustomAttribute {
            attribute_code: "tax_class_id".into(),
            value: AttrValue::Text("2".into()),
        });
        if let Some(c) = catalog::color_for(seed, r.id) {
            attrs.push(CustomAttribute {
                attribute_code: "color".into(),
                value: AttrValue::Text(c.to_string()),
            });
        }
        Item {
            id: r.id,
            sku: catalog::sku_for(seed, r.id),
            name,
            attribute_set_id: r.set_id,
            price: r.price_cents_now() as f64 / 100.0,
            status: r.status,
            visibility: r.visibility,
            type_id: r.type_id(),
            created_at: catalog::fmt_ts(r.created_at),
            updated_at: catalog::fmt_ts(r.updated_at),
            weight: r.weight_kg(),
            extension_attributes: ExtensionAttributes {
                website_ids: catalog::websites_for(seed, r.id),
                category_links: cats
                    .iter()
                    .enumerate()
                    .map(|(i, c)| CategoryLink {
                        position: i as u32,
                        category_id: c.to_string(),
                    })
                    .collect(),
                stock_item: single.then(|| StockItem {
                    item_id: r.id,
                    product_id: r.id,
                    stock_id: 1,
                    qty: (r.weight_g % 200) * u32::from(r.status == 1),
                    is_in_stock: r.status == 1,
                }),
            },
            product_links: [],
            options: [],
            media_gallery_entries: [],
            tier_prices: [],
            custom_attributes: attrs,
        }
    }
}

#[derive(Serialize)]
struct ListAnswer<'a> {
    items: &'a [Item],
    search_criteria: &'a Value,
    total_count: usize,
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    StoreConfigs,
    StoreViews,
    Products,
    Product(String),
    PutProduct(String),
}

impl Route {
    fn resource(&self) -> &'static str {
        match self {
            Route::StoreConfigs | Route::StoreViews => ACL_STORE,
            _ => ACL_PRODUCTS,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Route::StoreConfigs => "GET /V1/store/storeConfigs",
            Route::StoreViews => "GET /V1/store/storeViews",
            Route::Products => "GET /V1/products",
            Route::Product(_) => "GET /V1/products/{sku}",
            Route::PutProduct(_) => "PUT /V1/products/{sku}",
        }
    }
}

fn route(method: &Method, segs: &[&str]) -> Option<Route> {
    Some(match (method, segs) {
        (&Method::GET, ["store", "storeConfigs"]) => Route::StoreConfigs,
        (&Method::GET, ["store", "storeViews"]) => Route::StoreViews,
        (&Method::GET, ["products"]) => Route::Products,
        // Magento decodes the path like urldecode: `+` is a space.
        (&Method::GET, ["products", sku]) if !sku.is_empty() => Route::Product(urldecode(sku)),
        (&Method::PUT, ["products", sku]) if !sku.is_empty() => Route::PutProduct(urldecode(sku)),
        _ => return None,
    })
}

/// Answers a request under `/rest/` (`rest` is the raw path after it).
pub(super) async fn handle(inner: &Arc<Inner>, req: Request<Incoming>, rest: String) -> Resp {
    let c = &inner.counters;
    let segs: Vec<&str> = rest.split('/').collect();
    let (store, after) = match segs.as_slice() {
        ["V1", after @ ..] => (inner.default_store().to_string(), after),
        [code, "V1", after @ ..] => ((*code).to_string(), after),
        _ => {
            c.route("REST no route");
            return no_route();
        }
    };
    let known = store == "all" || inner.cfg.store_codes.contains(&store);
    let Some(route) = route(req.method(), after).filter(|_| known) else {
        c.route("REST no route");
        return no_route();
    };
    c.route(route.label());
    match route {
        Route::Products => bump(&c.m2_product_pages),
        Route::StoreConfigs => bump(&c.m2_store_configs),
        _ => {}
    }
    let resource = route.resource();
    if let Err(resp) = authenticate(inner, &req, resource) {
        bump(&c.auth_failures);
        return *resp;
    }
    if lock(&inner.revoked).contains(resource) {
        bump(&c.auth_failures);
        return not_authorized(resource);
    }
    if store == "all" && req.method() == Method::GET {
        return error(
            400,
            "Cannot perform GET operation with store code 'all'",
            None,
        );
    }
    let lang = Lang::for_store(if store == "all" {
        inner.default_store()
    } else {
        &store
    });
    match route {
        Route::StoreConfigs => json(200, &store_configs(inner)),
        Route::StoreViews => json(200, &store_views(inner)),
        Route::Products => list_products(inner, req.uri().query().unwrap_or(""), lang).await,
        Route::Product(sku) => {
            let found = read(&inner.catalog).find_sku(&sku);
            let Some(r) = found else {
                return product_missing();
            };
            let item = inner.m2_item(&r, lang, true);
            let fields = Node::parse_query(req.uri().query().unwrap_or(""))
                .get("fields")
                .and_then(Node::leaf)
                .filter(|f| !f.trim().is_empty())
                .map(parse_fields);
            match fields {
                None => json(200, &item),
                Some(f) => match serde_json::to_value(&item) {
                    Ok(v) => json(200, &project(v, &f)),
                    Err(_) => error(500, "Internal Error.", None),
                },
            }
        }
        Route::PutProduct(sku) => put_product(inner, req, &sku, lang).await,
    }
}

async fn list_products(inner: &Arc<Inner>, raw_query: &str, lang: Lang) -> Resp {
    let root = Node::parse_query(raw_query);
    let crit = match parse_criteria(&root, inner.cfg.max_page_size) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let fields = root
        .get("fields")
        .and_then(Node::leaf)
        .filter(|f| !f.trim().is_empty())
        .map(parse_fields);
    let mut query = crit.query;
    query.lang = lang;
    query.legacy_last_page = inner.cfg.legacy_last_page;
    let salt = inner.next_salt();
    let fault = lock(&inner.fault).clone();
    if matches!(
        fault,
        Fault::ShortTotal { .. } | Fault::PartialListing { .. } | Fault::Endless { .. }
    ) {
        bump(&inner.counters.faults_injected);
    }
    let inner2 = inner.clone();
    // Query and render off the async workers: a page without pageSize may be
    // the whole catalog.
    let out = tokio::task::spawn_blocking(move || {
        let catalog = read(&inner2.catalog);
        let (rows, total) = match fault {
            Fault::Endless { total } => {
                let size = u64::from(query.page_size.unwrap_or(300).max(1));
                let floor = catalog::id_floor(&query).unwrap_or(1).max(1);
                let floor = u64::try_from(floor).unwrap_or(1);
                let past = (catalog.ids().last().copied().unwrap_or(0) as u64).saturating_add(1);
                let next = inner2.endless_next.load(Ordering::Relaxed).max(past);
                let start = next.max(floor);
                inner2
                    .endless_next
                    .store(start.saturating_add(size), Ordering::Relaxed);
                let ts = catalog::now_secs();
                let rows: Vec<catalog::Row> = (start..start.saturating_add(size))
                    .filter_map(|id| u32::try_from(id).ok())
                    .map(|id| catalog.phantom(id, ts))
                    .collect();
                (rows, usize::try_from(total).unwrap_or(usize::MAX))
            }
            _ => {
                let page = catalog.query(&query, salt);
                let mut rows = page.rows;
                let mut total = page.total;
                if let Fault::ShortTotal { total: t } = fault {
                    total = total.min(usize::try_from(t).unwrap_or(usize::MAX));
                }
                if let Fault::PartialListing { items } = fault {
                    let last = catalog.nth_id(items);
                    rows.retain(|r| r.id <= last);
                }
                (rows, total)
            }
        };
        drop(catalog);
        let items: Vec<Item> = rows
            .iter()
            .map(|r| inner2.m2_item(r, lang, false))
            .collect();
        let answer = ListAnswer {
            items: &items,
            search_criteria: &crit.echo,
            total_count: total,
        };
        match fields {
            None => serde_json::to_vec(&answer),
            Some(f) => {
                serde_json::to_value(&answer).and_then(|v| serde_json::to_vec(&project(v, &f)))
            }
        }
    })
    .await;
    match out {
        Ok(Ok(body)) => json_bytes(200, body),
        _ => error(500, "Internal Error.", None),
    }
}

async fn put_product(inner: &Arc<Inner>, req: Request<Incoming>, sku: &str, lang: Lang) -> Resp {
    let Some(body) = read_body(req.into_body(), MAX_SHOP_BODY).await else {
        return error(413, "Request entity too large", None);
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "Decoding error.", None);
    };
    let Some(p) = v.get("product").filter(|p| p.is_object()) else {
        return required("product");
    };
    let price = p
        .get("price")
        .and_then(Value::as_f64)
        .map(|x| (x * 100.0).round().max(0.0) as u32);
    let small = |k: &str| {
        p.get(k)
            .and_then(Value::as_u64)
            .and_then(|x| u8::try_from(x).ok())
    };
    let row = {
        let mut c = write(&inner.catalog);
        let Some(r) = c.find_sku(sku) else {
            return product_missing();
        };
        c.update(
            r.id,
            price,
            small("status"),
            small("visibility"),
            catalog::now_secs(),
        );
        c.get(r.id)
    };
    match row {
        Some(r) => json(200, &inner.m2_item(&r, lang, true)),
        None => product_missing(),
    }
}

fn base_urls(inner: &Inner) -> Value {
    let scheme = if inner.tls.is_some() { "https" } else { "http" };
    let base = format!("{scheme}://127.0.0.1:{}/", inner.port);
    json!({
        "base_url": base,
        "base_link_url": base,
        "base_static_url": format!("{base}static/version1700000000/"),
        "base_media_url": format!("{base}media/"),
        "secure_base_url": base,
        "secure_base_link_url": base,
        "secure_base_static_url": format!("{base}static/version1700000000/"),
        "secure_base_media_url": format!("{base}media/"),
    })
}

fn store_configs(inner: &Inner) -> Value {
    let urls = base_urls(inner);
    let list: Vec<Value> = inner
        .cfg
        .store_codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            let mut v = json!({
                "id": i + 1,
                "code": code,
                "website_id": 1,
                "locale": if Lang::for_store(code) == Lang::Fr { "fr_FR" } else { "en_US" },
                "base_currency_code": "EUR",
                "default_display_currency_code": "EUR",
                "timezone": "UTC",
                "weight_unit": "kgs",
            });
            if let (Value::Object(m), Value::Object(u)) = (&mut v, &urls) {
                m.extend(u.clone());
            }
            v
        })
        .collect();
    Value::Array(list)
}

fn store_views(inner: &Inner) -> Value {
    let mut list = vec![json!({
        "id": 0, "code": "admin", "name": "Admin", "website_id": 0, "store_group_id": 0, "is_active": 1
    })];
    for (i, code) in inner.cfg.store_codes.iter().enumerate() {
        list.push(json!({
            "id": i + 1,
            "code": code,
            "name": if i == 0 { "Default Store View".to_string() } else { format!("{code} Store View") },
            "website_id": 1,
            "store_group_id": 1,
            "is_active": 1,
        }));
    }
    Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crit(q: &str) -> Result<Criteria, u16> {
        parse_criteria(&Node::parse_query(q), 300).map_err(|r| r.status().as_u16())
    }

    #[test]
    fn php_query_parsing() {
        let n = Node::parse_query("a[b][0]=x&a[b][1]=y+z&a[c]=%2B&d&e[]=1&e[]=2");
        assert_eq!(
            n.get("a").and_then(|a| a.get("c")).and_then(Node::leaf),
            Some("+")
        );
        let b = n
            .get("a")
            .and_then(|a| a.get("b"))
            .map(Node::members)
            .unwrap_or(&[]);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].1.leaf(), Some("y z"));
        assert_eq!(n.get("d").and_then(Node::leaf), Some(""));
        let e = n.get("e").map(Node::members).unwrap_or(&[]);
        assert_eq!(
            e.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["0", "1"]
        );
    }

    #[test]
    fn criteria_parsing() {
        let c = crit(
            "searchCriteria[filter_groups][0][filters][0][field]=updated_at\
             &searchCriteria[filter_groups][0][filters][0][value]=2024-01-02%2003:04:05\
             &searchCriteria[filter_groups][0][filters][0][condition_type]=gteq\
             &searchCriteria[sortOrders][0][field]=updated_at&searchCriteria[sortOrders][0][direction]=ASC\
             &searchCriteria[sortOrders][1][field]=entity_id\
             &searchCriteria[pageSize]=200&searchCriteria[currentPage]=3",
        )
        .unwrap();
        assert_eq!(c.query.groups.len(), 1);
        assert_eq!(c.query.groups[0][0].field, Field::UpdatedAt);
        // No direction means DESC.
        assert_eq!(
            c.query.sort,
            vec![(Field::UpdatedAt, Dir::Asc), (Field::EntityId, Dir::Desc)]
        );
        assert_eq!((c.query.page_size, c.query.current_page), (Some(200), 3));
        assert_eq!(
            c.echo["filter_groups"][0]["filters"][0]["value"],
            "2024-01-02 03:04:05"
        );
        assert_eq!(c.echo["sort_orders"][1], json!({"field": "entity_id"}));
        assert_eq!(c.echo["page_size"], 200);

        // Missing criteria, empty criteria, limits, bad input.
        assert_eq!(crit("fields=total_count"), Err(400));
        let empty = crit("searchCriteria=").unwrap();
        assert!(empty.query.groups.is_empty() && empty.query.page_size.is_none());
        assert_eq!(empty.echo, json!({"filter_groups": []}));
        assert_eq!(crit("searchCriteria[pageSize]=301"), Err(400));
        assert!(crit("searchCriteria[pageSize]=300").is_ok());
        assert_eq!(crit("searchCriteria[pageSize]=abc"), Err(400));
        assert_eq!(
            crit(
                "searchCriteria[filter_groups][0][filters][0][field]=nope&searchCriteria[filter_groups][0][filters][0][value]=1"
            ),
            Err(400)
        );
        assert_eq!(
            crit(
                "searchCriteria[filter_groups][0][filters][0][field]=sku&searchCriteria[filter_groups][0][filters][0][condition_type]=regexp"
            ),
            Err(400)
        );
        // in splits on commas; no condition type means eq.
        let c = crit(
            "searchCriteria[filter_groups][0][filters][0][field]=entity_id&searchCriteria[filter_groups][0][filters][0][value]=1,2&searchCriteria[filter_groups][0][filters][0][condition_type]=in\
             &searchCriteria[filter_groups][1][filters][0][field]=sku&searchCriteria[filter_groups][1][filters][0][value]=A%2BB",
        )
        .unwrap();
        assert_eq!(c.query.groups.len(), 2);
        assert!(matches!(&c.query.groups[0][0].cond, catalog::Cond::In(v) if v.len() == 2));
        assert_eq!(
            c.query.groups[1][0].cond,
            catalog::Cond::Eq(catalog::Operand::Text("a+b".into()))
        );
    }

    #[test]
    fn fields_projection() {
        let f = parse_fields("items[sku,extension_attributes[website_ids]],total_count");
        let v = json!({
            "items": [{"sku": "a", "id": 1, "extension_attributes": {"website_ids": [1], "category_links": []}}],
            "search_criteria": {},
            "total_count": 1
        });
        assert_eq!(
            project(v, &f),
            json!({"items": [{"sku": "a", "extension_attributes": {"website_ids": [1]}}], "total_count": 1})
        );
        assert_eq!(
            parse_fields("total_count").0,
            vec![("total_count".to_string(), None)]
        );
    }

    #[test]
    fn nonce_cache_is_bounded() {
        let mut n = NonceCache::default();
        assert!(n.insert("a", 1000));
        assert!(!n.insert("a", 1000));
        // Old nonces expire.
        assert!(n.insert("b", 1000 + 2 * MAX_DRIFT + 1));
        assert!(n.insert("a", 1000 + 2 * MAX_DRIFT + 1));
        for i in 0..MAX_NONCES + 10 {
            n.insert(&i.to_string(), 5000);
        }
        assert!(n.len() <= MAX_NONCES);
        assert!(!n.insert(&"x".repeat(300), 5000));
    }

    #[test]
    fn item_shape() {
        let c = catalog::Catalog::generate(42, 50);
        let r = c.get(c.ids()[0]).unwrap();
        let v = serde_json::to_value(Item::new(42, &r, Lang::En, false)).unwrap();
        for k in [
            "id",
            "sku",
            "name",
            "attribute_set_id",
            "price",
            "status",
            "visibility",
            "type_id",
            "created_at",
            "updated_at",
            "extension_attributes",
            "product_links",
            "options",
            "media_gallery_entries",
            "tier_prices",
            "custom_attributes",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["product_links"], json!([]));
        assert!(v["extension_attributes"].get("stock_item").is_none());
        let cats = v["custom_attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["attribute_code"] == "category_ids")
            .unwrap();
        assert!(cats["value"].is_array());
        let fr = serde_json::to_value(Item::new(42, &r, Lang::Fr, false)).unwrap();
        assert_ne!(fr["name"], v["name"]);
        assert_eq!(fr["sku"], v["sku"]);
        assert_eq!(fr["updated_at"], v["updated_at"]);
    }
}
