//! The Magento simulator: a fake shop that speaks Magento 2 REST and
//! Magento 1 XML-RPC over real HTTP on 127.0.0.1, with the quirks real shops
//! have (paging, auth errors, HTML answers, maintenance, session expiry), a deterministic catalog of up to millions of
//! products, and fault modes a test can switch at any moment.
//!
//! Tests, `cobbyd demo` and the benchmarks all use it. Start one with
//! [`SimHandle::start`]; steer it through the handle or through the control
//! listener (a second port, JSON, see [`control`]) which keeps answering
//! while the shop is down.
//!
//! Layout: [`catalog`] holds the products and the query engine, [`m2`] the
//! REST API and OAuth verification, [`m1`] the XML-RPC API and sessions,
//! [`faults`] the fault modes, [`control`] the control API, and `server` the
//! listeners and connection handling.

pub mod catalog;
pub mod control;
pub mod faults;
pub mod m1;
pub mod m2;
mod server;
pub mod tls;

use crate::sim::catalog::Catalog;
pub use crate::sim::faults::Fault;
pub use crate::sim::tls::SimTls;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Locks a std mutex, recovering the data of a poisoned one (every critical
/// section here leaves the data consistent, so a panic elsewhere does not
/// make it unusable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// How to build a simulated shop.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Products generated at start (default 10,000).
    pub products: usize,
    /// Seed of the deterministic catalog.
    pub seed: u64,
    /// Shop listener port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Control listener port on 127.0.0.1; 0 picks a free one. It keeps
    /// answering while the shop is [`Fault::Down`].
    pub control_port: u16,
    /// The integration (M2) and API user (M1) the shop accepts.
    pub credentials: SimCredentials,
    /// `oauth/consumer/enable_integration_as_bearer` (default false).
    pub bearer_enabled: bool,
    /// Only `/index.php/rest/...` and `/index.php/api/xmlrpc/` route; the
    /// plain forms answer the 200 HTML storefront (URL rewrites off).
    pub index_php_only: bool,
    /// Magento 2.3 paging: past the last page, the last page again (default
    /// false: 2.4, `items: []`).
    pub legacy_last_page: bool,
    /// Largest `searchCriteria[pageSize]` (default 300); above it, 400
    /// `Maximum SearchCriteria pageSize is %max`.
    pub max_page_size: u32,
    /// Store view codes; the first is the default store view. `fr` renders
    /// French names and descriptions; every view shares SKUs, ids and
    /// `updated_at`.
    pub store_codes: Vec<String>,
    /// Magento 1 API session idle timeout (default 3600 s).
    pub session_timeout: Duration,
    /// Serve the shop over HTTPS with this certificate and key (default:
    /// plain HTTP). [`SimHandle::url`] then says `https://`.
    pub tls: Option<SimTls>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            products: 10_000,
            seed: 42,
            port: 0,
            control_port: 0,
            credentials: SimCredentials::default(),
            bearer_enabled: false,
            index_php_only: false,
            legacy_last_page: false,
            max_page_size: 300,
            store_codes: vec!["default".to_string(), "fr".to_string()],
            session_timeout: Duration::from_secs(3600),
            tls: None,
        }
    }
}

/// The credentials the simulated shop accepts. They are fake, but `Debug`
/// redacts them anyway so that habits stay good.
#[derive(Clone, PartialEq, Eq)]
pub struct SimCredentials {
    /// M2 integration consumer key.
    pub consumer_key: String,
    /// M2 integration consumer secret.
    pub consumer_secret: String,
    /// M2 integration access token (also the bearer token).
    pub access_token: String,
    /// M2 integration access token secret.
    pub access_token_secret: String,
    /// M1 API user name.
    pub api_user: String,
    /// M1 API key.
    pub api_key: String,
}

impl Default for SimCredentials {
    fn default() -> Self {
        SimCredentials {
            consumer_key: "k3v7sim0consumer0key0f2a9c4e1b8d".to_string(),
            consumer_secret: "s9d2sim0consumer0secret0a7e3b6c1".to_string(),
            access_token: "t4q8sim0access0token00c5d9e2f7a3".to_string(),
            access_token_secret: "x1m6sim0token0secret000b4e8a2d9f".to_string(),
            api_user: "cobbyd_sim".to_string(),
            api_key: "a8c2sim0api0key00000000d7f1e5b3c".to_string(),
        }
    }
}

impl fmt::Debug for SimCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimCredentials")
            .field("consumer_key", &self.consumer_key)
            .field("consumer_secret", &"****")
            .field("access_token", &"****")
            .field("access_token_secret", &"****")
            .field("api_user", &self.api_user)
            .field("api_key", &"****")
            .finish()
    }
}

fn toml_str(s: &str) -> String {
    // A TOML basic string is a JSON string for the characters used here.
    serde_json::Value::String(s.to_string()).to_string()
}

impl SimCredentials {
    /// A Magento 2 OAuth credentials file, in the format `cobbyd shop add
    /// --credentials-file` reads.
    pub fn m2_oauth_toml(&self) -> String {
        format!(
            "consumer_key = {}\nconsumer_secret = {}\naccess_token = {}\naccess_token_secret = {}\n",
            toml_str(&self.consumer_key),
            toml_str(&self.consumer_secret),
            toml_str(&self.access_token),
            toml_str(&self.access_token_secret)
        )
    }

    /// A Magento 2 bearer credentials file (`access_token` only).
    pub fn m2_bearer_toml(&self) -> String {
        format!("access_token = {}\n", toml_str(&self.access_token))
    }

    /// A Magento 1 credentials file (`api_user`, `api_key`).
    pub fn m1_toml(&self) -> String {
        format!(
            "api_user = {}\napi_key = {}\n",
            toml_str(&self.api_user),
            toml_str(&self.api_key)
        )
    }
}

/// Request counters, as `GET /counters` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    /// Every request the shop listener received.
    pub requests: u64,
    /// `GET /V1/products` requests handled (any store view).
    pub m2_product_pages: u64,
    /// `GET /V1/store/storeConfigs` requests handled.
    pub m2_store_configs: u64,
    /// M1 `login` calls.
    pub m1_logins: u64,
    /// M1 `call` calls.
    pub m1_calls: u64,
    /// M1 `multiCall` calls.
    pub m1_multicalls: u64,
    /// Calls inside M1 `multiCall`s.
    pub m1_multicall_items: u64,
    /// Refused credentials, signatures and permissions (M2 401 and the
    /// SHA1 400; M1 fault 2).
    pub auth_failures: u64,
    /// Requests by route, e.g. `GET /V1/products`,
    /// `xmlrpc call catalog_product.list`.
    pub by_route: BTreeMap<String, u64>,
    /// Requests answered by a fault mode instead of the shop.
    pub faults_injected: u64,
    /// The most shop requests that were in flight at once (a fault's delay
    /// included): how concurrently a client reads.
    #[serde(default)]
    pub max_in_flight: u64,
}

#[derive(Default)]
struct CounterCells {
    requests: AtomicU64,
    m2_product_pages: AtomicU64,
    m2_store_configs: AtomicU64,
    m1_logins: AtomicU64,
    m1_calls: AtomicU64,
    m1_multicalls: AtomicU64,
    m1_multicall_items: AtomicU64,
    auth_failures: AtomicU64,
    faults_injected: AtomicU64,
    by_route: Mutex<BTreeMap<String, u64>>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts a shop request as in flight while it lives.
struct InFlight<'a>(&'a CounterCells);

impl<'a> InFlight<'a> {
    fn new(c: &'a CounterCells) -> InFlight<'a> {
        let n = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_in_flight.fetch_max(n, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CounterCells {
    fn route(&self, name: &str) {
        let mut m = lock(&self.by_route);
        let len = m.len();
        match m.get_mut(name) {
            Some(n) => *n += 1,
            // Bounded: route names come from a fixed set of labels plus the
            // M1 method paths, which are capped in length and count.
            None if len < 1000 => {
                m.insert(name.to_string(), 1);
            }
            None => {}
        }
    }

    fn snapshot(&self) -> Counters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            requests: g(&self.requests),
            m2_product_pages: g(&self.m2_product_pages),
            m2_store_configs: g(&self.m2_store_configs),
            m1_logins: g(&self.m1_logins),
            m1_calls: g(&self.m1_calls),
            m1_multicalls: g(&self.m1_multicalls),
            m1_multicall_items: g(&self.m1_multicall_items),
            auth_failures: g(&self.auth_failures),
            by_route: lock(&self.by_route).clone(),
            faults_injected: g(&self.faults_injected),
            max_in_flight: g(&self.max_in_flight),
        }
    }

    fn reset(&self) {
        for a in [
            &self.requests,
            &self.m2_product_pages,
            &self.m2_store_configs,
            &self.m1_logins,
            &self.m1_calls,
            &self.m1_multicalls,
            &self.m1_multicall_items,
            &self.auth_failures,
            &self.faults_injected,
            &self.max_in_flight,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        lock(&self.by_route).clear();
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// How one product is rendered differently from its row on Magento 2 (the
/// SKU also on Magento 1): a shop whose data is broken (see
/// [`SimHandle::render_updated_at`], [`SimHandle::render_id_zero`],
/// [`SimHandle::duplicate_sku`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quirk {
    /// Rendered as this `id`.
    pub id: Option<u32>,
    /// Rendered with this SKU.
    pub sku: Option<String>,
    /// Rendered with this `updated_at`.
    pub updated_at: Option<String>,
}

impl Quirk {
    /// Applies the quirk to a rendered item.
    pub fn apply(&self, item: &mut m2::Item) {
        if let Some(id) = self.id {
            item.id = id;
        }
        if let Some(s) = &self.sku {
            item.sku.clone_from(s);
        }
        if let Some(u) = &self.updated_at {
            item.updated_at.clone_from(u);
        }
    }
}

/// Most products one simulator renders with a quirk.
const MAX_QUIRKS: usize = 100_000;

/// State shared by the handle, the listeners and every request.
/// A custom attribute code and its value as raw JSON text.
type RawAttribute = (String, Box<serde_json::value::RawValue>);

struct Inner {
    cfg: SimConfig,
    /// The credentials accepted now (`cfg.credentials` at start; tests of
    /// rotation change them with [`SimHandle::accept_credentials`]).
    accepted: RwLock<Vec<SimCredentials>>,
    port: u16,
    control_port: u16,
    catalog: RwLock<Catalog>,
    fault: Mutex<Fault>,
    /// Requests seen by `Fault::Flaky` (its own count, reset on set_fault).
    flaky_seen: AtomicU64,
    /// Custom attributes sent as raw JSON text, by product id
    /// ([`SimHandle::set_raw_attribute`]).
    raw_attributes: Mutex<BTreeMap<u32, Vec<RawAttribute>>>,
    bearer: AtomicBool,
    revoked: Mutex<BTreeSet<String>>,
    nonces: Mutex<m2::NonceCache>,
    sessions: Mutex<m1::Sessions>,
    counters: CounterCells,
    /// Varies the order of tied rows from request to request.
    salt: AtomicU64,
    listeners: Mutex<server::Listeners>,
    /// Set when the shop listener speaks TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Products rendered differently from their rows (M2), by row id.
    quirks: RwLock<HashMap<u32, Quirk>>,
    /// The next id `Fault::Endless` answers (past every id it answered).
    endless_next: AtomicU64,
}

impl Inner {
    /// Adds a product's raw custom attributes to its Magento 2 item.
    fn add_raw_attributes(&self, item: &mut m2::Item) {
        let raw = lock(&self.raw_attributes);
        if let Some(attrs) = raw.get(&item.id) {
            for (code, value) in attrs {
                item.custom_attributes
                    .retain(|a| a.attribute_code != code.as_str());
                item.custom_attributes.push(m2::CustomAttribute {
                    attribute_code: code.clone().into(),
                    value: m2::AttrValue::Raw(value.clone()),
                });
            }
        }
    }

    fn is_revoked(&self, resource: &str) -> bool {
        let r = lock(&self.revoked);
        r.iter()
            .any(|x| resource == x || resource.starts_with(&format!("{x}/")))
    }

    fn next_salt(&self) -> u64 {
        catalog::mix(self.salt.fetch_add(1, Ordering::Relaxed))
    }

    /// Renders a row as Magento 2 does, quirks applied.
    fn m2_item(&self, r: &catalog::Row, lang: catalog::Lang, single: bool) -> m2::Item {
        let mut item = m2::Item::new(self.cfg.seed, r, lang, single);
        if let Some(q) = read(&self.quirks).get(&r.id) {
            q.apply(&mut item);
        }
        self.add_raw_attributes(&mut item);
        item
    }

    fn default_store(&self) -> &str {
        self.cfg
            .store_codes
            .first()
            .map(String::as_str)
            .unwrap_or("default")
    }
}

/// A running simulated shop. Cheap to clone; every method takes `&self`.
#[derive(Clone)]
pub struct SimHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("url", &self.url())
            .field("control_url", &self.control_url())
            .finish()
    }
}

impl SimHandle {
    /// Generates the catalog, binds both listeners on 127.0.0.1 and starts
    /// serving. Must run inside a Tokio runtime, which serves the listeners.
    pub async fn start(mut cfg: SimConfig) -> std::io::Result<SimHandle> {
        if cfg.store_codes.is_empty() {
            cfg.store_codes.push("default".to_string());
        }
        let tls = cfg.tls.as_ref().map(SimTls::acceptor).transpose()?;
        let products = cfg.products;
        let seed = cfg.seed;
        let catalog = tokio::task::spawn_blocking(move || Catalog::generate(seed, products))
            .await
            .map_err(std::io::Error::other)?;
        let shop = std::net::TcpListener::bind(("127.0.0.1", cfg.port))?;
        let control = std::net::TcpListener::bind(("127.0.0.1", cfg.control_port))?;
        let port = shop.local_addr()?.port();
        let control_port = control.local_addr()?.port();
        let inner = Arc::new(Inner {
            bearer: AtomicBool::new(cfg.bearer_enabled),
            accepted: RwLock::new(vec![cfg.credentials.clone()]),
            sessions: Mutex::new(m1::Sessions::new(cfg.session_timeout)),
            cfg,
            port,
            control_port,
            catalog: RwLock::new(catalog),
            fault: Mutex::new(Fault::None),
            flaky_seen: AtomicU64::new(0),
            raw_attributes: Mutex::new(BTreeMap::new()),
            revoked: Mutex::new(BTreeSet::new()),
            nonces: Mutex::new(m2::NonceCache::default()),
            counters: CounterCells::default(),
            salt: AtomicU64::new(1),
            listeners: Mutex::new(server::Listeners::new(tokio::runtime::Handle::current())),
            tls,
            quirks: RwLock::new(HashMap::new()),
            endless_next: AtomicU64::new(0),
        });
        server::start_control(&inner, control)?;
        server::start_shop(&inner, shop)?;
        Ok(SimHandle { inner })
    }

    /// The shop base URL, `http://127.0.0.1:PORT` (M2 at `/rest/...`, M1 at
    /// `/api/xmlrpc/`); `https://` when the config has [`SimConfig::tls`].
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.inner.port)
    }

    /// The shop base URL with another host name for 127.0.0.1 (e.g.
    /// `localhost`, the name a test certificate is made out to).
    pub fn url_with_host(&self, host: &str) -> String {
        self.url().replacen("127.0.0.1", host, 1)
    }

    /// The control API base URL.
    pub fn control_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.inner.control_port)
    }

    /// The credentials the shop accepts.
    pub fn credentials(&self) -> &SimCredentials {
        &self.inner.cfg.credentials
    }

    /// Replaces the credentials the shop accepts (a key rotation in the
    /// shop's admin): from now on only these sets authenticate.
    pub fn accept_credentials(&self, sets: Vec<SimCredentials>) {
        *write(&self.inner.accepted) = sets;
    }

    /// The configuration it was started with (ports as asked, not as bound).
    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    /// Switches the fault mode. [`Fault::Down`] closes the listening socket
    /// before returning (new connections are refused) and drops open
    /// connections; any other mode re-binds the same port.
    pub fn set_fault(&self, f: Fault) {
        set_fault(&self.inner, f);
    }

    /// The current fault mode.
    pub fn fault(&self) -> Fault {
        lock(&self.inner.fault).clone()
    }

    /// Takes an ACL resource away from the integration / API role:
    /// `Magento_Catalog::products`, `Magento_Backend::store` (M2);
    /// `catalog/product`, `core/magento` (M1, prefixes of the method ACLs).
    pub fn revoke(&self, resource: &str) {
        lock(&self.inner.revoked).insert(resource.to_string());
    }

    /// Gives a revoked resource back.
    pub fn grant(&self, resource: &str) {
        lock(&self.inner.revoked).remove(resource);
    }

    /// `oauth/consumer/enable_integration_as_bearer`.
    pub fn set_bearer_enabled(&self, on: bool) {
        self.inner.bearer.store(on, Ordering::Relaxed);
    }

    /// Ends every M1 session: the next call with one faults 5.
    pub fn expire_sessions(&self) {
        lock(&self.inner.sessions).clear();
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.inner.counters.snapshot()
    }

    /// Zeroes the counters.
    pub fn reset_counters(&self) {
        self.inner.counters.reset();
    }

    /// Sets `updated_at` to now (one shared second) on `count` products spread
    /// over the catalog, changing their price too; returns their SKUs.
    pub fn touch(&self, count: usize) -> Vec<String> {
        let mut c = write(&self.inner.catalog);
        let ids = c.spread(count);
        c.set_updated(&ids, catalog::now_secs());
        ids.iter().map(|id| c.sku(*id)).collect()
    }

    /// Sets `updated_at` to now on the products with these SKUs (unknown ones
    /// are ignored).
    pub fn touch_skus(&self, skus: &[String]) {
        self.set_updated_at_secs(skus, catalog::now_secs());
    }

    /// Deletes `count` products spread over the catalog; returns their SKUs.
    pub fn delete(&self, count: usize) -> Vec<String> {
        let mut c = write(&self.inner.catalog);
        let ids = c.spread(count);
        let gone = c.delete(&ids);
        gone.iter().map(|id| c.sku(*id)).collect()
    }

    /// Deletes the products with these SKUs; returns the SKUs that existed.
    pub fn delete_skus(&self, skus: &[String]) -> Vec<String> {
        let mut c = write(&self.inner.catalog);
        let ids: Vec<u32> = skus
            .iter()
            .filter_map(|s| c.find_sku(s).map(|r| r.id))
            .collect();
        let gone = c.delete(&ids);
        gone.iter().map(|id| c.sku(*id)).collect()
    }

    /// Creates `count` products with new ids, created and updated now;
    /// returns their SKUs.
    pub fn create(&self, count: usize) -> Vec<String> {
        let mut c = write(&self.inner.catalog);
        let ids = c.create(count, catalog::now_secs());
        ids.iter().map(|id| c.sku(*id)).collect()
    }

    /// Sets `updated_at` (`"YYYY-MM-DD HH:MM:SS"`, UTC) on the products with
    /// these SKUs. An unparseable timestamp changes nothing.
    /// Makes the Magento 2 answers carry a custom attribute `code` of the
    /// product `sku` whose value is `raw`, JSON text sent exactly as given
    /// (it must be one JSON value to serde_json's lenient reading: nesting is
    /// not limited and a lone surrogate `"\ud800"` passes), replacing an
    /// attribute of that code. For answers that a broken extension or a
    /// hostile shop could send. Magento 1 answers are not changed.
    pub fn set_raw_attribute(&self, sku: &str, code: &str, raw: &str) -> Result<(), String> {
        let id = read(&self.inner.catalog)
            .find_sku(sku)
            .map(|r| r.id)
            .ok_or_else(|| format!("no product with SKU {sku:?}"))?;
        let value = serde_json::value::RawValue::from_string(raw.to_string())
            .map_err(|e| format!("raw is not one JSON value: {e}"))?;
        let mut all = lock(&self.inner.raw_attributes);
        let attrs = all.entry(id).or_default();
        attrs.retain(|(c, _)| c != code);
        attrs.push((code.to_string(), value));
        Ok(())
    }

    pub fn set_updated_at(&self, skus: &[String], ts: &str) {
        if let Some(secs) = catalog::parse_ts(ts).and_then(|s| u32::try_from(s).ok()) {
            self.set_updated_at_secs(skus, secs);
        }
    }

    fn set_updated_at_secs(&self, skus: &[String], secs: u32) {
        let mut c = write(&self.inner.catalog);
        let ids: Vec<u32> = skus
            .iter()
            .filter_map(|s| c.find_sku(s).map(|r| r.id))
            .collect();
        c.set_updated(&ids, secs);
    }

    /// Changes the price of `count` products spread over the catalog without
    /// touching their `updated_at` (a stock or mass-attribute update);
    /// returns their SKUs.
    pub fn change_silently(&self, count: usize) -> Vec<String> {
        let mut c = write(&self.inner.catalog);
        let ids = c.spread(count);
        c.change_silently(&ids);
        ids.iter().map(|id| c.sku(*id)).collect()
    }

    /// Magento 2 renders these products with `updated_at` exactly `value`,
    /// whatever it is (`"9999-12-31 23:59:59"`, `"zzzz-not-a-date"`). A
    /// value that reads as a time past what the catalog holds sorts and
    /// filters after every other product (as such a row would in MySQL);
    /// any other value leaves sorting and filtering on the real time.
    pub fn render_updated_at(&self, skus: &[String], value: &str) {
        let ids = self.ids_of(skus);
        let past_end = catalog::parse_ts(value).is_some_and(|t| t > i64::from(u32::MAX - 1));
        if past_end {
            let mut c = write(&self.inner.catalog);
            for id in &ids {
                c.set_updated_last(*id);
            }
        }
        self.quirk(&ids, |q| q.updated_at = Some(value.to_string()));
    }

    /// Magento 2 renders the product with the lowest id with `id` 0 (it
    /// still sorts and filters first); returns its SKU.
    pub fn render_id_zero(&self) -> String {
        let (sku, id) = {
            let c = read(&self.inner.catalog);
            let id = c.ids().first().copied().unwrap_or(1);
            (c.sku(id), id)
        };
        self.quirk(&[id], |q| q.id = Some(0));
        sku
    }

    /// Both APIs render the `count` products with the lowest ids after the
    /// first under the first one's SKU (one SKU on many ids); returns that
    /// SKU.
    pub fn duplicate_sku(&self, count: usize) -> String {
        let (sku, ids) = {
            let c = read(&self.inner.catalog);
            let ids: Vec<u32> = c
                .ids()
                .iter()
                .take(count.saturating_add(1))
                .copied()
                .collect();
            (ids.first().map(|id| c.sku(*id)).unwrap_or_default(), ids)
        };
        self.quirk(ids.get(1..).unwrap_or(&[]), |q| q.sku = Some(sku.clone()));
        sku
    }

    /// Forgets every rendering quirk (the rows keep their times).
    pub fn clear_quirks(&self) {
        write(&self.inner.quirks).clear();
    }

    fn ids_of(&self, skus: &[String]) -> Vec<u32> {
        let c = read(&self.inner.catalog);
        skus.iter()
            .filter_map(|s| c.find_sku(s).map(|r| r.id))
            .collect()
    }

    fn quirk(&self, ids: &[u32], f: impl Fn(&mut Quirk)) {
        let mut q = write(&self.inner.quirks);
        for id in ids {
            if q.len() >= MAX_QUIRKS && !q.contains_key(id) {
                break;
            }
            f(q.entry(*id).or_default());
        }
    }

    /// Every product exactly as `GET /V1/products` returns the item in this
    /// store view (full, no `fields`), sorted by SKU. Builds every item in
    /// memory (about 3 KiB each): for very large catalogs use
    /// [`SimHandle::m2_item`] with [`SimHandle::skus`].
    pub fn m2_items(&self, store_code: &str) -> Vec<serde_json::Value> {
        let (_, rows) = self.all_rows();
        let lang = catalog::Lang::for_store(store_code);
        let mut items: Vec<(String, serde_json::Value)> = rows
            .iter()
            .map(|r| {
                let item = self.inner.m2_item(r, lang, false);
                (
                    item.sku.clone(),
                    serde_json::to_value(&item).unwrap_or_default(),
                )
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// Every product as `catalog_product.info` returns it in this store view
    /// (converted with `xmlrpc::Value::to_json`), sorted by SKU.
    pub fn m1_items(&self, store_code: &str) -> Vec<serde_json::Value> {
        let (seed, rows) = self.all_rows();
        let lang = catalog::Lang::for_store(store_code);
        let mut items: Vec<(String, serde_json::Value)> = rows
            .iter()
            .map(|r| {
                (
                    catalog::sku_for(seed, r.id),
                    m1::info_value(seed, r, lang, None).to_json(),
                )
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// One product as `GET /V1/products` lists it (no stock item), by SKU
    /// (case-insensitive); for catalogs too big for [`SimHandle::m2_items`].
    pub fn m2_item(&self, sku: &str, store_code: &str) -> Option<serde_json::Value> {
        let row = read(&self.inner.catalog).find_sku(sku)?;
        let item = self
            .inner
            .m2_item(&row, catalog::Lang::for_store(store_code), false);
        serde_json::to_value(&item).ok()
    }

    /// One product as `catalog_product.info` returns it, by SKU.
    pub fn m1_item(&self, sku: &str, store_code: &str) -> Option<serde_json::Value> {
        let row = read(&self.inner.catalog).find_sku(sku)?;
        Some(
            m1::info_value(
                self.inner.cfg.seed,
                &row,
                catalog::Lang::for_store(store_code),
                None,
            )
            .to_json(),
        )
    }

    fn all_rows(&self) -> (u64, Vec<catalog::Row>) {
        let c = read(&self.inner.catalog);
        let rows = c.ids().iter().filter_map(|id| c.get(*id)).collect();
        (c.seed(), rows)
    }

    /// Every SKU, sorted.
    pub fn skus(&self) -> Vec<String> {
        let c = read(&self.inner.catalog);
        let mut v: Vec<String> = c.ids().iter().map(|id| c.sku(*id)).collect();
        v.sort();
        v
    }

    /// Number of products.
    pub fn product_count(&self) -> usize {
        read(&self.inner.catalog).len()
    }

    /// Stops both listeners and drops every connection.
    pub async fn shutdown(self) {
        server::shutdown(&self.inner).await;
    }
}

fn set_fault(inner: &Arc<Inner>, f: Fault) {
    let down = matches!(f, Fault::Down);
    if matches!(f, Fault::M1HugeSession { .. }) {
        lock(&inner.sessions).clear();
    }
    *lock(&inner.fault) = f;
    inner.flaky_seen.store(0, Ordering::Relaxed);
    if down {
        server::shop_down(inner);
    } else if let Err(e) = server::shop_up(inner) {
        tracing::warn!(error = %e, port = inner.port, "simulator: cannot re-bind the shop port");
    }
}

/// `cobbyd simulate`: runs a simulated shop until Ctrl-C or SIGTERM.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Products in the generated catalog.
    #[arg(long, default_value_t = 10_000)]
    pub products: usize,
    /// Seed of the catalog (same seed, same catalog).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Shop port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Control API port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub control_port: u16,
    /// Accept the access token as a bearer token
    /// (`enable_integration_as_bearer`).
    #[arg(long)]
    pub bearer: bool,
    /// Route only `/index.php/rest` and `/index.php/api/xmlrpc` (rewrites off).
    #[arg(long)]
    pub index_php_only: bool,
    /// Past the last page, answer the last page again (Magento 2.3).
    #[arg(long)]
    pub legacy_last_page: bool,
    /// Write m2-oauth.toml, m2-bearer.toml and m1.toml (mode 0600) here.
    #[arg(long, value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Serve the shop over HTTPS with this certificate chain (PEM, leaf
    /// first); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Writes the three credential files into `dir` (created if missing), mode
/// 0600; returns their paths.
pub fn write_credentials(dir: &Path, creds: &SimCredentials) -> std::io::Result<Vec<PathBuf>> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (name, text) in [
        ("m2-oauth.toml", creds.m2_oauth_toml()),
        ("m2-bearer.toml", creds.m2_bearer_toml()),
        ("m1.toml", creds.m1_toml()),
    ] {
        let path = dir.join(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(text.as_bytes())?;
        out.push(path);
    }
    Ok(out)
}

/// Runs `cobbyd simulate`: starts the shop, prints its URLs (never the
/// secrets: those go to the credential files), serves until Ctrl-C or
/// SIGTERM.
pub async fn run_simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(SimTls::from_files(cert, key)?),
        _ => None,
    };
    let cfg = SimConfig {
        products: args.products,
        seed: args.seed,
        port: args.port,
        control_port: args.control_port,
        bearer_enabled: args.bearer,
        index_php_only: args.index_php_only,
        legacy_last_page: args.legacy_last_page,
        tls,
        ..SimConfig::default()
    };
    let sim = SimHandle::start(cfg).await?;
    println!("shop:    {}", sim.url());
    println!("control: {}", sim.control_url());
    println!("products: {}", sim.product_count());
    if let Some(dir) = &args.credentials_dir {
        for p in write_credentials(dir, sim.credentials())? {
            println!("credentials: {}", p.display());
        }
    } else {
        println!("credentials: not written (pass --credentials-dir DIR)");
    }
    wait_for_signal().await?;
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = SimCredentials::default();
        let paths = write_credentials(dir.path(), &creds).unwrap();
        assert_eq!(paths.len(), 3);
        for p in &paths {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        let m2: toml::Table = std::fs::read_to_string(&paths[0]).unwrap().parse().unwrap();
        assert_eq!(
            m2["consumer_secret"].as_str(),
            Some(creds.consumer_secret.as_str())
        );
        assert_eq!(m2.len(), 4);
        let bearer: toml::Table = creds.m2_bearer_toml().parse().unwrap();
        assert_eq!(
            bearer["access_token"].as_str(),
            Some(creds.access_token.as_str())
        );
        let m1: toml::Table = creds.m1_toml().parse().unwrap();
        assert_eq!(m1["api_key"].as_str(), Some(creds.api_key.as_str()));
        for v in [
            &creds.consumer_key,
            &creds.consumer_secret,
            &creds.access_token,
            &creds.access_token_secret,
            &creds.api_key,
        ] {
            assert_eq!(v.len(), 32);
        }
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains(&creds.consumer_secret) && !dbg.contains(&creds.api_key));
    }
}
