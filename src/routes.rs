//! The control API's routes (documented in docs/control-api.md). JSON in and out;
//! errors as `{"error": {"kind": ..., "message": ...}}`. Request bodies are
//! capped at 64 KiB and must arrive within 10 s.

use crate::daemon::{Daemon, Phase};
use crate::queue::{JobKind, now_ms};
use crate::registry::{ShopClient, client_options};
use crate::shop::{self, AuthMode, Credentials, Platform, ShopRecord};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// An oversized body up to this size is read and dropped before the 413.
const DRAIN_MAX: usize = 1024 * 1024;
/// A request body must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

type D = State<Arc<Daemon>>;

/// Header of a CSV export: how many products are exported with a problem
/// marked in their `_export_problem` column.
pub const EXPORT_PROBLEMS: &str = "cobbyd-export-problems";
/// Header of a CSV export: the first SKUs of those, percent-encoded,
/// comma-separated.
pub const EXPORT_PROBLEM_SKUS: &str = "cobbyd-export-problem-skus";

/// The full control API.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/config", get(config))
        .route("/v1/shops", get(list_shops).post(add_shop))
        .route("/v1/shops/{name}", get(show_shop).delete(remove_shop))
        .route("/v1/shops/{name}/test", post(test_shop))
        .route("/v1/shops/{name}/credentials", put(rotate))
        .route("/v1/shops/{name}/sync", post(start_sync))
        .route("/v1/shops/{name}/runs", get(runs))
        .route("/v1/shops/{name}/runs/{id}", get(run_by_id))
        .route("/v1/shops/{name}/requests/{id}", get(request_by_id))
        .route(
            "/v1/shops/{name}/products",
            get(products).delete(purge_retained),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; docs/control-api.md lists the API",
            )
        })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(daemon)
}

/// Longest rejection text kept when it is rewrapped as JSON.
const MAX_REJECTION: usize = 4096;

/// axum's own refusals (a path or query that does not deserialize, a method
/// the route does not take) are plain text or empty: rewrapped in the API's
/// `{"error": {kind, message}}` so that every error reads alike.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_REJECTION)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (kind, fallback) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not take that method; docs/control-api.md lists the API",
        ),
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "request too large"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("invalid", "invalid request"),
    };
    let message = if text.is_empty() {
        fallback.to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, kind, message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// Only `/metrics`, for the optional TCP listener.
pub fn metrics_router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(daemon)
}

/// An API error: status, a machine-readable kind, a message for people,
/// and optional details (e.g. the probe's diagnosis).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            details: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("control API: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }

    fn no_shop(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no shop named {name:?}; `cobbyd shop list` shows the registered ones"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"kind": self.kind, "message": self.message});
        if let Some(d) = self.details {
            err["details"] = d;
        }
        (self.status, axum::Json(json!({ "error": err }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unwritable(p) => {
                let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, "storage", p.message);
                err.details = Some(json!({"kind": p.kind, "hint": p.hint}));
                err
            }
            e => ApiError::internal(e),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok_json(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, axum::Json(v)).into_response())
}

/// Reads a JSON body within the size and time bounds.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        // Read and drop a moderately oversized body before answering, so the
        // client sees the 413 instead of a connection reset (closing with
        // unread data makes the kernel send RST, which discards our answer).
        // Anything bigger is cut off with the connection.
        if declared.is_some_and(|len| len <= DRAIN_MAX as u64) {
            let _ = tokio::time::timeout(
                BODY_TIMEOUT,
                axum::body::to_bytes(req.into_body(), DRAIN_MAX),
            )
            .await;
        }
        return Err(too_large());
    }
    let body = req.into_body();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "request body too slow",
            ));
        }
        Ok(Err(e)) if is_length_limit(&e) => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("request body: {e}"),
            ));
        }
        Ok(Ok(b)) => b,
    };
    if bytes.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::invalid(format!("empty body: {e}")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("request body: {e}")))
}

/// Whether reading a body failed on the size cap (and not, say, on the
/// connection's body deadline).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Refuses mutations while draining. Handlers read their body before
/// calling this: answering with unread request bytes makes the kernel reset
/// the connection, and the client loses the answer.
fn refuse_while_stopping(d: &Daemon) -> Result<(), ApiError> {
    if d.stopping() {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the daemon is shutting down",
        ))
    } else {
        Ok(())
    }
}

/// Most unhealthy shops `/health` names.
const HEALTH_NAMES: usize = 20;

/// 200 `{"status":"ok"}` while serving with every shop healthy, 200
/// `{"status":"degraded","unhealthy_shops":N,"shops":[..]}` while serving
/// with some shop unhealthy (its probe failed, or its last sync did:
/// `sync::shop_healthy`, as in status); 503 while starting or draining,
/// and 503 `{"status":"degraded","storage":{..}}` while the state directory
/// cannot be written (status still answers; no job runs).
async fn health(State(d): D) -> Response {
    match d.phase() {
        Phase::Running => match d.store.problem() {
            None => {
                let unhealthy: Vec<String> = d
                    .registry
                    .names()
                    .into_iter()
                    .filter(|n| !crate::sync::shop_healthy(&d.sync_env(), n))
                    .collect();
                let body = if unhealthy.is_empty() {
                    json!({"status": "ok"})
                } else {
                    json!({
                        "status": "degraded",
                        "unhealthy_shops": unhealthy.len(),
                        "shops": unhealthy.iter().take(HEALTH_NAMES).collect::<Vec<_>>(),
                    })
                };
                (StatusCode::OK, axum::Json(body)).into_response()
            }
            Some(p) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "degraded", "storage": p})),
            )
                .into_response(),
        },
        p => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": p.as_str()})),
        )
            .into_response(),
    }
}

async fn metrics(State(d): D) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        d.metrics.render(&d.metrics_snapshot()),
    )
        .into_response()
}

async fn config(State(d): D) -> ApiResult {
    let cfg = serde_json::to_value(&*d.config()).map_err(ApiError::internal)?;
    ok_json(StatusCode::OK, cfg)
}

/// The daemon part of the status.
fn daemon_json(d: &Daemon) -> Value {
    let cfg = d.config();
    let path = d
        .config_path
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|p| p.display().to_string());
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": d.started.elapsed().as_secs(),
        "state": d.phase().as_str(),
        "state_dir": cfg.daemon.state_dir.display().to_string(),
        "socket": cfg.daemon.socket.display().to_string(),
        "config_path": path,
        "queue_depth": d.queue.depth(),
    })
}

/// One shop as status shows it.
pub fn shop_json(d: &Daemon, rec: &ShopRecord) -> Value {
    let h = d.health.get(&rec.name);
    let mut v = json!({
        "name": rec.name,
        "platform": rec.platform,
        "url": rec.url,
        "store_codes": rec.store_codes,
        "auth": rec.auth,
        "insecure_http": rec.insecure_http(),
        "tls_ca_file": rec.tls_ca_file,
        "state": h.state,
        "state_since": h.state_since,
        "last_probe": h.last_probe,
        "last_ok": h.last_ok,
        "next_probe": h.next_probe,
        "latency_ms": h.last_latency_ms,
        "version": h.version,
        "consecutive_failures": h.consecutive_failures,
        "retry_delays_ms": h.retry_delays_ms,
        "problem": h.problem,
    });
    // Inserted, not written inside `json!`, which would deep-copy it.
    v["sync"] = d.syncs.status_json(&d.sync_env(), rec);
    // The probe passed and the last sync did not fail (the rule of
    // `sync::shop_healthy`, from the values above).
    v["healthy"] =
        json!(h.state == crate::health::ShopState::Healthy && v["sync"]["problem"].is_null());
    v
}

#[derive(Deserialize)]
struct StatusQuery {
    shop: Option<String>,
}

async fn status(State(d): D, Query(q): Query<StatusQuery>) -> ApiResult {
    let shops: Vec<Value> = match &q.shop {
        Some(name) => {
            let rec = d
                .registry
                .get(name)
                .ok_or_else(|| ApiError::no_shop(name))?;
            vec![shop_json(&d, &rec)]
        }
        None => d.registry.list().iter().map(|r| shop_json(&d, r)).collect(),
    };
    let mut v = json!({ "daemon": daemon_json(&d), "storage": d.store.problem() });
    v["shops"] = Value::Array(shops);
    ok_json(StatusCode::OK, v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    retained: bool,
}

async fn list_shops(State(d): D, Query(q): Query<ListQuery>) -> ApiResult {
    if q.retained {
        let mut retained = Vec::new();
        for (name, codes) in retained_mirrors(&d)? {
            let mut stores = Vec::new();
            for code in codes {
                let mirror = crate::mirror::Mirror::open(&d.store, &name, &code)?;
                stores.push(json!({"store_code": code, "products": mirror.recount()}));
            }
            retained.push(json!({"name": name, "stores": stores}));
        }
        return ok_json(StatusCode::OK, json!({ "retained": retained }));
    }
    let shops: Vec<Value> = d
        .registry
        .list()
        .iter()
        .map(ShopRecord::public_json)
        .collect();
    ok_json(StatusCode::OK, json!({ "shops": shops }))
}

/// The mirrors `shop remove` without `--purge` kept: the store views of
/// every shop that has mirror trees but is neither registered nor being
/// removed, by name, their store codes sorted.
fn retained_mirrors(d: &Daemon) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let removing: Vec<String> = d
        .store
        .pending_removals()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut by_shop: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (shop, code) in d.store.mirror_views() {
        if d.registry.get(&shop).is_none() && !removing.contains(&shop) {
            by_shop.entry(shop).or_default().push(code);
        }
    }
    Ok(by_shop
        .into_iter()
        .map(|(shop, mut codes)| {
            codes.sort();
            (shop, codes)
        })
        .collect())
}

/// The store codes of a retained mirror, or `None` when there is none.
fn retained(d: &Daemon, name: &str) -> Result<Option<Vec<String>>, ApiError> {
    Ok(retained_mirrors(d)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, codes)| codes))
}

/// Drops a retained mirror the way `shop remove --purge` drops a
/// registered shop's: one transaction takes its checkpoints and sets the
/// removal marker (`Queue::unregister`, which finds nothing else of a
/// removed shop), then the trees go (`Store::finish_removal`); a crash in
/// between is finished at the next start.
async fn purge_mirror(d: &Daemon, name: &str) -> Result<(), ApiError> {
    d.queue.unregister(name, true)?;
    d.store.finish_removal(name, true).await?;
    d.store.flush().await?;
    tracing::info!(shop = %name, "retained mirror purged");
    Ok(())
}

/// `shop purge NAME`: drops the mirror a removal without `--purge` kept.
async fn purge_retained(State(d): D, Path(name): Path<String>) -> ApiResult {
    refuse_while_stopping(&d)?;
    shop::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let _guard = d.admin.lock().await;
    if d.registry.get(&name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "registered",
            format!(
                "{name} is a registered shop, not a kept mirror: `cobbyd shop remove {name} --purge` removes it with its products"
            ),
        ));
    }
    if retained(&d, &name)?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no kept mirror named {name:?}; `cobbyd shop list --retained` shows the mirrors removed shops left"
            ),
        ));
    }
    purge_mirror(&d, &name).await?;
    ok_json(StatusCode::OK, json!({"purged": name}))
}

async fn show_shop(State(d): D, Path(name): Path<String>) -> ApiResult {
    let rec = d
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::no_shop(&name))?;
    let mut v = rec.public_json();
    v["status"] = shop_json(&d, &rec);
    ok_json(StatusCode::OK, v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddShop {
    name: String,
    platform: Platform,
    url: String,
    #[serde(default)]
    store_codes: Vec<String>,
    #[serde(default)]
    auth: AuthMode,
    credentials: toml::Table,
    #[serde(default)]
    no_verify: bool,
    /// Accept a plain `http://` URL.
    #[serde(default)]
    allow_insecure_http: bool,
    /// Absolute path of a PEM bundle of extra trusted roots.
    #[serde(default)]
    tls_ca_file: Option<std::path::PathBuf>,
}

/// The probe's diagnosis as error details, its hint fitting what was
/// being done.
fn diagnosis(
    err: &crate::magento::ShopError,
    shop: &ShopRecord,
    doing: crate::health::Doing,
) -> Value {
    json!({
        "kind": err.kind,
        "message": err.message,
        "hint": crate::health::hint_while(err.kind, shop, doing),
        "http_status": err.status,
    })
}

/// Probes a record with a fresh client (not the cached one: the record may
/// be a candidate that is not registered yet).
async fn probe_candidate(d: &Daemon, rec: &ShopRecord) -> crate::probe::Outcome {
    let client = ShopClient::new(rec, &client_options(&d.config()))?;
    crate::scheduler::probe_with(d, &client, rec).await
}

async fn add_shop(State(d): D, req: Request) -> ApiResult {
    let body: AddShop = read_json(req).await?;
    refuse_while_stopping(&d)?;
    shop::validate_name(&body.name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let url = shop::validate_url(&body.url).map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut store_codes = body.store_codes;
    if store_codes.is_empty() {
        store_codes.push("default".into());
    }
    for c in &store_codes {
        shop::validate_store_code(c).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    store_codes.dedup();
    if store_codes.len() > 32 {
        return Err(ApiError::invalid(
            "store_code: at most 32 store views per shop",
        ));
    }
    let auth = if body.platform == Platform::Magento1 {
        AuthMode::Oauth
    } else {
        body.auth
    };
    let credentials = Credentials::from_table(&body.credentials, body.platform, auth)
        .map_err(|e| ApiError::invalid(format!("credentials: {e}")))?;
    shop::check_transport(&url, body.allow_insecure_http, body.tls_ca_file.as_deref())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(path) = &body.tls_ca_file {
        // Read and checked now, so that a bad file is refused here rather
        // than found at the first probe; read again whenever the shop's
        // client is built.
        crate::tls::load_ca_file(path)
            .map_err(|e| ApiError::invalid(format!("tls_ca_file: {e}")))?;
    }
    let exists = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!(
                "a shop named {:?} exists; use `cobbyd shop rotate` to change its credentials",
                body.name
            ),
        )
    };
    if d.registry.get(&body.name).is_some() {
        return Err(exists());
    }
    let now = crate::probe::rfc3339(chrono::Utc::now());
    let insecure = shop::is_plain_http(&url);
    let rec = ShopRecord {
        name: body.name.clone(),
        platform: body.platform,
        url,
        store_codes,
        auth,
        credentials,
        allow_insecure_http: body.allow_insecure_http && insecure,
        tls_ca_file: body.tls_ca_file,
        created_at: now.clone(),
        updated_at: now,
    };
    // The probe runs outside the admin lock: a shop that never answers must
    // not hold back the additions and removals of other shops. The name is
    // checked again under the lock, so two additions of one name still
    // register it once.
    let outcome = if body.no_verify {
        None
    } else {
        Some(probe_candidate(&d, &rec).await)
    };
    if let Some(Err(e)) = &outcome {
        let mut err = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "shop_failed",
            format!("the connection test failed, nothing was saved: {e}"),
        );
        err.details = Some(diagnosis(e, &rec, crate::health::Doing::Adding));
        return Err(err);
    }
    refuse_while_stopping(&d)?;
    let _guard = d.admin.lock().await;
    if d.registry.get(&body.name).is_some() {
        return Err(exists());
    }
    // The record and its jobs in one transaction: a crash never leaves a
    // registered shop without its jobs. A shop that answers gets its first
    // sync right away.
    // A removal of this name that a failure left unfinished is finished
    // first: its marker must not outlive the new registration.
    if let Some((_, purge)) = d
        .store
        .pending_removals()?
        .into_iter()
        .find(|(n, _)| *n == rec.name)
    {
        d.store.finish_removal(&rec.name, purge).await?;
    }
    d.syncs.registered(&rec.name);
    let mut jobs = d.first_jobs(&rec.name);
    if outcome.is_some() {
        jobs[1].1 = now_ms();
    }
    // Known in memory before its jobs exist: the scheduler may lease the
    // first sync the moment it is stored, and a job whose shop it does not
    // know is treated as the job of a removed shop.
    d.registry.remember(rec.clone());
    if let Err(e) = d
        .queue
        .register(&rec.name, &crate::registry::Registry::encode(&rec)?, &jobs)
    {
        d.registry.forget(&rec.name);
        return Err(e.into());
    }
    if let Some(outcome) = &outcome {
        let delay = crate::scheduler::record_outcome(&d, &rec, outcome, &d.config().probe);
        d.queue.schedule(
            &rec.name,
            JobKind::Probe,
            now_ms() + delay.as_millis() as u64,
        )?;
    }
    d.store.flush().await?;
    tracing::info!(shop = %rec.name, platform = %rec.platform, url = %rec.url, verified = !body.no_verify, "shop added");
    if rec.insecure_http() {
        tracing::warn!(shop = %rec.name, "{}", shop::INSECURE_HTTP_NOTE);
    }
    d.changed.notify_one();
    ok_json(StatusCode::CREATED, shop_json(&d, &rec))
}

async fn remove_shop(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult {
    refuse_while_stopping(&d)?;
    let _guard = d.admin.lock().await;
    if d.registry.get(&name).is_none() {
        // A shop removed before without --purge: --purge now drops what
        // was kept.
        if retained(&d, &name)?.is_some() {
            if q.purge {
                purge_mirror(&d, &name).await?;
                return ok_json(
                    StatusCode::OK,
                    json!({"removed": name, "purged": true, "jobs_removed": 0, "was_retained": true}),
                );
            }
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "{name} was removed already; its products were kept: `cobbyd shop purge {name}` drops them"
                ),
            ));
        }
        return Err(ApiError::no_shop(&name));
    }
    // Forgotten in memory first, so that nothing new starts for the shop;
    // its running sync stops (its request in flight dropped) and a probe in
    // flight ends, before this answers. Then the stored record goes
    // with its jobs, health, runs (and checkpoints with --purge) in one
    // transaction, and the trees are dropped after it (a crash before that
    // is finished at the next start): a crash at any point leaves the shop
    // registered with all it had, or gone without a trace.
    let Some(rec) = d.registry.forget(&name) else {
        return Err(ApiError::no_shop(&name));
    };
    d.syncs
        .cancel(&name, d.config().daemon.shutdown_timeout)
        .await;
    let jobs = match d.queue.unregister(&name, q.purge) {
        Ok(n) => n,
        Err(e) => {
            d.registry.remember(rec);
            return Err(e.into());
        }
    };
    d.health.forget(&name);
    d.store.finish_removal(&name, q.purge).await?;
    d.store.flush().await?;
    tracing::info!(shop = %name, purge = q.purge, jobs, "shop removed");
    d.changed.notify_one();
    ok_json(
        StatusCode::OK,
        json!({"removed": name, "purged": q.purge, "jobs_removed": jobs}),
    )
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    purge: bool,
}

async fn test_shop(State(d): D, Path(name): Path<String>) -> ApiResult {
    refuse_while_stopping(&d)?;
    let rec = d
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::no_shop(&name))?;
    let outcome = crate::scheduler::probe_once(&d, &rec).await;
    let delay = crate::scheduler::record_outcome(&d, &rec, &outcome, &d.config().probe);
    d.queue
        .schedule(&name, JobKind::Probe, now_ms() + delay.as_millis() as u64)?;
    d.store.flush().await?;
    let mut v = shop_json(&d, &rec);
    v["ok"] = json!(outcome.is_ok());
    if let Ok((info, latency)) = &outcome {
        v["latency_ms"] = json!(latency.as_millis() as u64);
        v["api_base"] = json!(info.api_base);
        v["product_count"] = json!(info.product_count);
    }
    ok_json(StatusCode::OK, v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    credentials: toml::Table,
}

async fn rotate(State(d): D, Path(name): Path<String>, req: Request) -> ApiResult {
    let body: Rotate = read_json(req).await?;
    refuse_while_stopping(&d)?;
    let _guard = d.admin.lock().await;
    let old = d
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::no_shop(&name))?;
    let credentials = Credentials::from_table(&body.credentials, old.platform, old.auth)
        .map_err(|e| ApiError::invalid(format!("credentials: {e}")))?;
    let mut rec = old.clone();
    rec.credentials = credentials;
    rec.updated_at = crate::probe::rfc3339(chrono::Utc::now());
    let outcome = probe_candidate(&d, &rec).await;
    if let Err(e) = &outcome {
        let mut err = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "shop_failed",
            format!(
                "the new credentials failed the connection test; the old ones stay in use: {e}"
            ),
        );
        err.details = Some(diagnosis(e, &rec, crate::health::Doing::Rotating));
        return Err(err);
    }
    // One sled insert replaces the record: readers see old or new, never a mix.
    d.registry.put(rec.clone())?;
    let was = d.health.get(&name).state;
    let delay = crate::scheduler::record_outcome(&d, &rec, &outcome, &d.config().probe);
    d.queue
        .schedule(&name, JobKind::Probe, now_ms() + delay.as_millis() as u64)?;
    if !was.may_sync() {
        d.queue.schedule_at(&name, JobKind::Sync, now_ms(), true)?;
    }
    d.store.flush().await?;
    tracing::info!(shop = %name, "credentials rotated");
    d.changed.notify_one();
    ok_json(StatusCode::OK, shop_json(&d, &rec))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SyncRequest {
    #[serde(default)]
    full: bool,
    /// One full run may delete more than `sync.max_delete_share`.
    #[serde(default)]
    allow_mass_delete: bool,
}

async fn start_sync(State(d): D, Path(name): Path<String>, req: Request) -> ApiResult {
    let body: SyncRequest = read_json(req).await?;
    refuse_while_stopping(&d)?;
    let rec = d
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::no_shop(&name))?;
    let state = d.health.get(&name).state;
    if !state.may_sync() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "shop_unhealthy",
            format!(
                "{name} is {}: fix the connection first (`cobbyd status {name}` shows why)",
                state.as_str()
            ),
        ));
    }
    if body.allow_mass_delete && !body.full {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "allow_mass_delete needs full: only a full reconcile deletes products".to_string(),
        ));
    }
    let kind = if body.full {
        JobKind::FullSync
    } else {
        JobKind::Sync
    };
    if body.allow_mass_delete {
        d.syncs.allow_mass_delete(&rec.name);
    }
    let requested_at = crate::probe::rfc3339(chrono::Utc::now());
    let request_id = d.store.next_request_id()?;
    let placed = d
        .syncs
        .add_request(
            &rec.name,
            crate::sync::SyncRequest {
                request_id,
                kind: kind.as_str(),
                requested_at: requested_at.clone(),
            },
        )
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "{name} has {} sync requests waiting already; they are all answered by its next run",
                    crate::sync::MAX_PENDING_REQUESTS
                ),
            )
        })?;
    let (job, run_id) = match placed {
        crate::sync::Placed::Queued => (
            Some(d.queue.schedule_at(&rec.name, kind, now_ms(), true)?.seq),
            None,
        ),
        crate::sync::Placed::Running(run) => (None, Some(run)),
    };
    d.store.flush().await?;
    let state = if run_id.is_some() {
        "running"
    } else {
        "queued"
    };
    ok_json(
        StatusCode::ACCEPTED,
        json!({
            "shop": name, "kind": kind.as_str(), "request_id": request_id, "state": state,
            "run_id": run_id, "job": job, "requested_at": requested_at, "requested_at_ms": now_ms(),
            "request_url": format!("/v1/shops/{}/requests/{request_id}", crate::magento::oauth::encode(&name)),
        }),
    )
}

#[derive(Deserialize)]
struct RunsQuery {
    /// A sync request id: answer where that request stands instead.
    request: Option<u64>,
}

async fn runs(State(d): D, Path(name): Path<String>, Query(q): Query<RunsQuery>) -> ApiResult {
    if d.registry.get(&name).is_none() {
        return Err(ApiError::no_shop(&name));
    }
    if let Some(id) = q.request {
        return request_state(&d, &name, id);
    }
    let runs = crate::sync::recent_runs(&d.store, &name, 100)?;
    let running = d.syncs.running_json(&name);
    ok_json(StatusCode::OK, json!({ "runs": runs, "running": running }))
}

fn request_state(d: &Daemon, name: &str, id: u64) -> ApiResult {
    match d.syncs.request_json(&d.store, name, id) {
        Some(mut v) => {
            // Whether a queued request can run at all.
            v["shop_state"] = json!(d.health.get(name).state);
            ok_json(StatusCode::OK, v)
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no sync request {id} for {name}: not waiting, and no kept run answers it (a request not yet run when the daemon restarted is forgotten; ask again with `cobbyd sync {name}`)"
            ),
        )),
    }
}

async fn request_by_id(State(d): D, Path((name, id)): Path<(String, u64)>) -> ApiResult {
    if d.registry.get(&name).is_none() {
        return Err(ApiError::no_shop(&name));
    }
    request_state(&d, &name, id)
}

async fn run_by_id(State(d): D, Path((name, id)): Path<(String, u64)>) -> ApiResult {
    if d.registry.get(&name).is_none() {
        return Err(ApiError::no_shop(&name));
    }
    match d.syncs.run_json(&d.store, &name, id) {
        Some(v) => ok_json(StatusCode::OK, v),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no run {id} of {name}: not running and not among the kept runs (`sync.keep_runs`)"
            ),
        )),
    }
}

#[derive(Deserialize)]
struct ProductsQuery {
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    store_code: Option<String>,
}

async fn products(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<ProductsQuery>,
) -> ApiResult {
    // A registered shop's store views, or those of the mirror a removal
    // without --purge kept.
    let store_codes = match d.registry.get(&name) {
        Some(rec) => rec.store_codes,
        None => match retained(&d, &name)? {
            Some(mut codes) => {
                // The view a shop mirrors when none is given comes first.
                if let Some(i) = codes.iter().position(|c| c == "default") {
                    let c = codes.remove(i);
                    codes.insert(0, c);
                }
                codes
            }
            None => return Err(ApiError::no_shop(&name)),
        },
    };
    let format = match q.format.as_deref().unwrap_or("jsonl") {
        "jsonl" => crate::export::Format::Jsonl,
        "csv" => crate::export::Format::Csv,
        other => {
            return Err(ApiError::invalid(format!(
                "format {other:?}: use jsonl or csv"
            )));
        }
    };
    let store_code = match q.store_code {
        Some(c) if store_codes.contains(&c) => c,
        Some(c) => {
            return Err(ApiError::invalid(format!(
                "store_code {c:?} is not mirrored for {name}; it has {}",
                store_codes.join(", ")
            )));
        }
        None => store_codes
            .first()
            .cloned()
            .unwrap_or_else(|| "default".into()),
    };
    let mirror = crate::mirror::Mirror::open(&d.store, &name, &store_code)?;
    let content_type = match format {
        crate::export::Format::Jsonl => "application/x-ndjson",
        crate::export::Format::Csv => "text/csv; charset=utf-8",
    };
    // A CSV export's first pass runs before the answer starts, so that the
    // answer's headers can say which products have a problem.
    let (mirror, plan) = if format == crate::export::Format::Csv {
        let (mirror, plan) = tokio::task::spawn_blocking(move || {
            let plan = crate::export::plan_csv(&mirror);
            (mirror, plan)
        })
        .await
        .map_err(ApiError::internal)?;
        (mirror, Some(plan.map_err(ApiError::internal)?))
    } else {
        (mirror, None)
    };
    let problems = plan.as_ref().map_or(0, |p| p.problems);
    let skus = plan.as_ref().map_or(String::new(), |p| {
        p.problem_skus
            .iter()
            .map(|s| crate::magento::oauth::encode(s))
            .collect::<Vec<_>>()
            .join(",")
    });
    let body = Body::from_stream(crate::export::stream(mirror, format, plan));
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    if problems > 0 {
        let h = resp.headers_mut();
        h.insert(EXPORT_PROBLEMS, problems.into());
        if let Ok(v) = header::HeaderValue::from_str(&skus) {
            h.insert(EXPORT_PROBLEM_SKUS, v);
        }
    }
    Ok(resp)
}
