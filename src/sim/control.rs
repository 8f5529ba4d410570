//! The control API: JSON over HTTP on its own 127.0.0.1 port, mirroring
//! [`SimHandle`](super::SimHandle) so that a test in another process (or a
//! person with curl) can steer the simulator. It keeps answering while the
//! shop is down.
//!
//! | route | body | answer |
//! | --- | --- | --- |
//! | `GET /health` | | `{"status":"ok"}` |
//! | `GET /counters` | | [`Counters`](super::Counters) |
//! | `POST /counters/reset` | | `{"ok":true}` |
//! | `GET /fault` | | the current mode |
//! | `POST /fault` | `{"mode":"none"\|"down"\|"maintenance"\|"html200"\|"slow","ms":N\|"flaky","every":N\|"truncated"\|"garbage"\|"rate_limited","retry_after_s":N\|"redirect","status":307,"to":URL\|"m1_info_fault","code":N,"every":N\|"m1_info_wrong_id","every":N\|"m1_list_ignores_range"\|"m1_huge_session","bytes":N\|"short_total","total":N\|"partial_listing","items":N\|"endless","total":N\|"message","message":TEXT}` | the mode set |
//! | `POST /acl/revoke`, `POST /acl/grant` | `{"resource":"Magento_Catalog::products"}` | `{"ok":true}` |
//! | `POST /bearer` | `{"enabled":true}` | `{"ok":true}` |
//! | `POST /sessions/expire` | | `{"ok":true}` |
//! | `POST /products/touch`, `/products/delete`, `/products/create` | `{"count":k}` | `{"skus":[...]}` |
//! | `POST /products/touch_skus` | `{"skus":[...]}` | `{"ok":true}` |
//! | `POST /products/delete_skus` | `{"skus":[...]}` | `{"skus":[...]}` (those that existed) |
//! | `POST /products/set_updated_at` | `{"skus":[...],"updated_at":"YYYY-MM-DD HH:MM:SS"}` | `{"ok":true}` |
//! | `POST /products/set_raw_attribute` | `{"sku":..,"attribute_code":..,"raw":"<JSON text>"}` | `{"ok":true}` (M2 answers carry it as is) |
//! | `POST /products/change_silently` | `{"count":k}` | `{"skus":[...]}` (price changed, `updated_at` not) |
//! | `POST /products/render_updated_at` | `{"skus":[...],"updated_at":"any text"}` | `{"ok":true}` |
//! | `POST /products/render_id_zero` | | `{"sku":"..."}` (the lowest id renders as 0) |
//! | `POST /products/duplicate_sku` | `{"count":k}` | `{"sku":"..."}` (k more ids render it) |
//! | `POST /products/clear_quirks` | | `{"ok":true}` |
//! | `GET /products/count` | | `{"count":N}` |
//!
//! Errors: `{"error":{"kind":..,"message":..}}` with 400 or 404.

use super::{Inner, SimHandle};
use crate::sim::faults::Fault;
use crate::sim::server::{MAX_CONTROL_BODY, Resp, json, read_body};
use hyper::body::Incoming;
use hyper::{Method, Request};
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest `count` one control call may ask for.
const MAX_COUNT: u64 = 10_000_000;

fn bad(kind: &str, message: &str) -> Resp {
    json(400, &json!({"error": {"kind": kind, "message": message}}))
}

fn boxed_bad(kind: &str, message: &str) -> Box<Resp> {
    Box::new(bad(kind, message))
}

fn ok() -> Resp {
    json(200, &json!({"ok": true}))
}

/// Answers one control request.
pub(super) async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Resp {
    let sim = SimHandle {
        inner: inner.clone(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body: Value = if method == Method::POST {
        match read_body(req.into_body(), MAX_CONTROL_BODY).await {
            None => return bad("too_large", "request body over 64 KiB"),
            Some(b) if b.iter().all(u8::is_ascii_whitespace) => json!({}),
            Some(b) => match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(e) => return bad("bad_json", &e.to_string()),
            },
        }
    } else {
        Value::Null
    };
    let count = || -> Result<usize, Box<Resp>> {
        body.get("count")
            .and_then(Value::as_u64)
            .filter(|n| *n <= MAX_COUNT)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| boxed_bad("bad_request", "expected {\"count\": k}"))
    };
    let skus = || -> Result<Vec<String>, Box<Resp>> {
        body.get("skus")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .ok_or_else(|| boxed_bad("bad_request", "expected {\"skus\": [...]}"))
    };
    let resource = || -> Result<String, Box<Resp>> {
        body.get("resource")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| boxed_bad("bad_request", "expected {\"resource\": ...}"))
    };
    let r = match (&method, path.as_str()) {
        (&Method::GET, "/health") => Ok(json(200, &json!({"status": "ok"}))),
        (&Method::GET, "/counters") => Ok(json(200, &sim.counters())),
        (&Method::POST, "/counters/reset") => {
            sim.reset_counters();
            Ok(ok())
        }
        (&Method::GET, "/fault") => Ok(json(200, &sim.fault().to_json())),
        (&Method::POST, "/fault") => match Fault::from_json(&body) {
            Ok(f) => {
                let shown = f.to_json();
                sim.set_fault(f);
                Ok(json(200, &shown))
            }
            Err(e) => Err(boxed_bad("bad_request", &e)),
        },
        (&Method::POST, "/acl/revoke") => resource().map(|r| {
            sim.revoke(&r);
            ok()
        }),
        (&Method::POST, "/acl/grant") => resource().map(|r| {
            sim.grant(&r);
            ok()
        }),
        (&Method::POST, "/bearer") => match body.get("enabled").and_then(Value::as_bool) {
            Some(on) => {
                sim.set_bearer_enabled(on);
                Ok(ok())
            }
            None => Err(boxed_bad("bad_request", "expected {\"enabled\": bool}")),
        },
        (&Method::POST, "/sessions/expire") => {
            sim.expire_sessions();
            Ok(ok())
        }
        (&Method::POST, "/products/touch") => {
            count().map(|n| json(200, &json!({"skus": sim.touch(n)})))
        }
        (&Method::POST, "/products/delete") => {
            count().map(|n| json(200, &json!({"skus": sim.delete(n)})))
        }
        (&Method::POST, "/products/create") => {
            count().map(|n| json(200, &json!({"skus": sim.create(n)})))
        }
        (&Method::POST, "/products/touch_skus") => skus().map(|s| {
            sim.touch_skus(&s);
            ok()
        }),
        (&Method::POST, "/products/delete_skus") => {
            skus().map(|s| json(200, &json!({"skus": sim.delete_skus(&s)})))
        }
        (&Method::POST, "/products/set_raw_attribute") => {
            let field = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| boxed_bad("bad_request", &format!("expected \"{k}\"")))
            };
            match (field("sku"), field("attribute_code"), field("raw")) {
                (Ok(sku), Ok(code), Ok(raw)) => match sim.set_raw_attribute(sku, code, raw) {
                    Ok(()) => Ok(ok()),
                    Err(e) => Err(boxed_bad("bad_request", &e)),
                },
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
            }
        }
        (&Method::POST, "/products/set_updated_at") => skus().and_then(|s| {
            let ts = body
                .get("updated_at")
                .and_then(Value::as_str)
                .ok_or_else(|| boxed_bad("bad_request", "expected \"updated_at\""))?;
            if crate::sim::catalog::parse_ts(ts).is_none() {
                return Err(boxed_bad(
                    "bad_request",
                    "updated_at is not YYYY-MM-DD HH:MM:SS",
                ));
            }
            sim.set_updated_at(&s, ts);
            Ok(ok())
        }),
        (&Method::POST, "/products/change_silently") => {
            count().map(|n| json(200, &json!({"skus": sim.change_silently(n)})))
        }
        (&Method::POST, "/products/render_updated_at") => skus().and_then(|s| {
            let ts = body
                .get("updated_at")
                .and_then(Value::as_str)
                .filter(|t| t.len() <= 255)
                .ok_or_else(|| boxed_bad("bad_request", "expected \"updated_at\" (text)"))?;
            sim.render_updated_at(&s, ts);
            Ok(ok())
        }),
        (&Method::POST, "/products/render_id_zero") => {
            Ok(json(200, &json!({"sku": sim.render_id_zero()})))
        }
        (&Method::POST, "/products/duplicate_sku") => {
            count().map(|n| json(200, &json!({"sku": sim.duplicate_sku(n)})))
        }
        (&Method::POST, "/products/clear_quirks") => {
            sim.clear_quirks();
            Ok(ok())
        }
        (&Method::GET, "/products/count") => Ok(json(200, &json!({"count": sim.product_count()}))),
        _ => Ok(json(
            404,
            &json!({"error": {"kind": "not_found", "message": format!("no route {method} {path}")}}),
        )),
    };
    r.unwrap_or_else(|e| *e)
}
