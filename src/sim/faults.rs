//! Fault modes: how the simulated shop misbehaves on request, and the
//! answers each mode gives. Every request a fault answers (or delays)
//! increments `faults_injected`.

use crate::sim::server::{Resp, html, json_bytes, stream_body};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use std::time::Duration;

/// A fault mode of the shop listener (the control listener never faults).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// The shop listener stops accepting: new connections are refused, and
    /// open ones are shut down before `set_fault` returns. As with a real web
    /// server that stops, a client reusing a pooled keep-alive connection
    /// sees that one request fail with "connection closed before message
    /// completed"; its next connection is refused. The control listener
    /// still answers.
    Down,
    /// 503 with an HTML maintenance page on every shop route, XML-RPC
    /// included.
    Maintenance,
    /// 200 `text/html` storefront page on the API routes (a URL whose
    /// rewrite swallows `/rest/`).
    Html200,
    /// Every answer is delayed this long.
    Slow(Duration),
    /// Every `every`-th request answers 500 Internal Error.
    Flaky {
        /// Period (0 never fails).
        every: u32,
    },
    /// `Content-Length` announces more than is sent, then the connection
    /// closes.
    Truncated,
    /// 200 with a body that does not parse: invalid JSON on REST, invalid XML
    /// on XML-RPC.
    Garbage,
    /// 429 with `Retry-After`.
    RateLimited {
        /// Seconds announced in `Retry-After`.
        retry_after_s: u64,
    },
    /// The API routes answer with a redirect to `to` followed by the
    /// request's own path and query (a shop moved to another host, or a
    /// web server that sends `/rest/` elsewhere). The storefront is left
    /// alone.
    Redirect {
        /// A 3xx status: 301, 302, 303, 307 or 308 (307 and 308 ask the
        /// client to send a POST body again).
        status: u16,
        /// Base URL of the target, e.g. `http://127.0.0.2:8080`.
        to: String,
    },
    /// The API routes fail with the shop's own error text: Magento 2
    /// answers 500 `{"message": message}`, Magento 1 an XML-RPC fault 1
    /// with `message` as its `faultString`. For text a shop controls
    /// (control characters, CR/LF, bidi overrides) reaching status, the
    /// CLI and the log.
    Message {
        /// The error text, sent as it is.
        message: std::borrow::Cow<'static, str>,
    },
    /// Magento 2 listings (`GET /V1/products`) answer `total_count` as at
    /// most `total`, while their pages stay as full as the catalog makes
    /// them: a listing that claims fewer products than it sends (a broken
    /// collection plugin or a cache in front of the count query).
    ShortTotal {
        /// The largest `total_count` answered.
        total: u64,
    },
    /// Magento 2 listings hold only the `items` products with the lowest
    /// ids; `total_count` still counts the whole match (a listing cut
    /// short by a proxy or a half-updated module: "10 of 300").
    PartialListing {
        /// Products the listings still hold.
        items: u64,
    },
    /// Magento 2 listings always answer a full page of products with new
    /// ids past the query's lower `entity_id` bound (or past every id
    /// answered so far), updated now, with this `total_count`: a catalog
    /// without end.
    Endless {
        /// The `total_count` answered.
        total: u64,
    },
    /// Magento 1: `catalog_product.info` (alone or in a `multiCall`)
    /// answers fault `code` for every product whose id is a multiple of
    /// `every` (1: all), although `catalog_product.list` lists them: fault 1
    /// is a transient internal error, 101 "Product not exists." (a
    /// half-updated module, a broken flat index).
    M1InfoFault {
        /// The fault code (1, 101, ...).
        code: i64,
        /// Which ids fault (0 never).
        every: u32,
    },
    /// Magento 1: `catalog_product.info` answers the product with the next
    /// id (or the first one) for every id that is a multiple of `every`: an
    /// answer for another `product_id` than asked.
    M1InfoWrongId {
        /// Which ids are answered wrongly (0 never).
        every: u32,
    },
    /// Magento 1: `catalog_product.list` ignores its `product_id` filter and
    /// answers the whole catalog whatever range is asked (other filters
    /// still apply).
    M1ListIgnoresRange,
    /// Magento 1: `login` answers a session id of `bytes` characters (real
    /// ones are 32 hex characters). Switching it on ends every open session,
    /// so that the next call logs in.
    M1HugeSession {
        /// Length of the session id.
        bytes: u64,
    },
}

impl Fault {
    /// The control-API name of the mode.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Down => "down",
            Fault::Maintenance => "maintenance",
            Fault::Html200 => "html200",
            Fault::Slow(_) => "slow",
            Fault::Flaky { .. } => "flaky",
            Fault::Truncated => "truncated",
            Fault::Garbage => "garbage",
            Fault::RateLimited { .. } => "rate_limited",
            Fault::Redirect { .. } => "redirect",
            Fault::Message { .. } => "message",
            Fault::ShortTotal { .. } => "short_total",
            Fault::PartialListing { .. } => "partial_listing",
            Fault::Endless { .. } => "endless",
            Fault::M1InfoFault { .. } => "m1_info_fault",
            Fault::M1InfoWrongId { .. } => "m1_info_wrong_id",
            Fault::M1ListIgnoresRange => "m1_list_ignores_range",
            Fault::M1HugeSession { .. } => "m1_huge_session",
        }
    }

    /// Reads the control-API form: `{"mode": "slow", "ms": 200}`,
    /// `{"mode": "flaky", "every": 3}`, `{"mode": "rate_limited",
    /// "retry_after_s": 5}`, `{"mode": "redirect", "status": 307, "to":
    /// "http://127.0.0.2:8080"}`, `{"mode": "short_total", "total": 3}`,
    /// `{"mode": "partial_listing", "items": 10}`, `{"mode": "endless",
    /// "total": 1000000000000}`, `{"mode": "m1_info_fault", "code": 101,
    /// "every": 1}`, `{"mode": "m1_info_wrong_id", "every": 2}`,
    /// `{"mode": "m1_list_ignores_range"}`, `{"mode": "m1_huge_session",
    /// "bytes": 52428800}`, `{"mode": "message", "message": "..."}`, or a
    /// bare mode name.
    pub fn from_json(v: &serde_json::Value) -> Result<Fault, String> {
        let mode = v
            .get("mode")
            .and_then(|m| m.as_str())
            .ok_or_else(|| "expected {\"mode\": ...}".to_string())?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        Ok(match mode {
            "none" => Fault::None,
            "down" => Fault::Down,
            "maintenance" => Fault::Maintenance,
            "html200" => Fault::Html200,
            "slow" => Fault::Slow(Duration::from_millis(
                num("ms").ok_or("slow needs \"ms\"")?.min(600_000),
            )),
            "flaky" => Fault::Flaky {
                every: u32::try_from(num("every").ok_or("flaky needs \"every\"")?)
                    .map_err(|_| "\"every\" is too large".to_string())?,
            },
            "truncated" => Fault::Truncated,
            "garbage" => Fault::Garbage,
            "rate_limited" => Fault::RateLimited {
                retry_after_s: num("retry_after_s").unwrap_or(1),
            },
            "redirect" => {
                let status = num("status").unwrap_or(302);
                if !(300..=399).contains(&status) {
                    return Err("redirect needs a 3xx \"status\"".into());
                }
                let to = v
                    .get("to")
                    .and_then(|t| t.as_str())
                    .ok_or("redirect needs \"to\" (a base URL)")?;
                if url::Url::parse(to).is_err() {
                    return Err(format!("\"to\" is not a URL: {to:?}"));
                }
                Fault::Redirect {
                    status: status as u16,
                    to: to.to_string(),
                }
            }
            "message" => Fault::Message {
                message: v
                    .get("message")
                    .and_then(|m| m.as_str())
                    .ok_or("message needs \"message\" (the error text)")?
                    .to_string()
                    .into(),
            },
            "short_total" => Fault::ShortTotal {
                total: num("total").ok_or("short_total needs \"total\"")?,
            },
            "partial_listing" => Fault::PartialListing {
                items: num("items").ok_or("partial_listing needs \"items\"")?,
            },
            "endless" => Fault::Endless {
                total: num("total").unwrap_or(1_000_000_000_000),
            },
            "m1_info_fault" => Fault::M1InfoFault {
                code: v
                    .get("code")
                    .and_then(serde_json::Value::as_i64)
                    .ok_or("m1_info_fault needs \"code\"")?,
                every: u32::try_from(num("every").unwrap_or(1))
                    .map_err(|_| "\"every\" is too large".to_string())?,
            },
            "m1_info_wrong_id" => Fault::M1InfoWrongId {
                every: u32::try_from(num("every").unwrap_or(1))
                    .map_err(|_| "\"every\" is too large".to_string())?,
            },
            "m1_list_ignores_range" => Fault::M1ListIgnoresRange,
            "m1_huge_session" => Fault::M1HugeSession {
                // At most 256 MiB: the simulator builds it in memory.
                bytes: num("bytes").unwrap_or(50 * 1024 * 1024).min(256 << 20),
            },
            other => return Err(format!("unknown fault mode {other:?}")),
        })
    }

    /// The control-API form.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "mode": self.name() });
        match self {
            Fault::Slow(d) => v["ms"] = (d.as_millis() as u64).into(),
            Fault::Flaky { every } => v["every"] = (*every).into(),
            Fault::RateLimited { retry_after_s } => v["retry_after_s"] = (*retry_after_s).into(),
            Fault::Redirect { status, to } => {
                v["status"] = (*status).into();
                v["to"] = to.as_str().into();
            }
            Fault::Message { message } => v["message"] = message.as_ref().into(),
            Fault::ShortTotal { total } | Fault::Endless { total } => v["total"] = (*total).into(),
            Fault::PartialListing { items } => v["items"] = (*items).into(),
            Fault::M1InfoFault { code, every } => {
                v["code"] = (*code).into();
                v["every"] = (*every).into();
            }
            Fault::M1InfoWrongId { every } => v["every"] = (*every).into(),
            Fault::M1HugeSession { bytes } => v["bytes"] = (*bytes).into(),
            _ => {}
        }
        v
    }
}

/// The maintenance page Magento serves (`pub/errors/503.php`).
pub const MAINTENANCE_HTML: &str = "<!doctype html>\n<html><head><title>Error 503: Service Unavailable</title></head>\n<body><h1>Service Temporarily Unavailable</h1>\n<p>The server is temporarily unable to service your request due to maintenance downtime or capacity problems. Please try again later.</p></body></html>\n";

/// A storefront home page.
pub const STOREFRONT_HTML: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>Home page</title>\n<script type=\"text/x-magento-init\">{\"*\":{\"Magento_PageCache/js/form-key-provider\":{}}}</script></head>\n<body class=\"cms-index-index page-layout-1column\"><div class=\"page-wrapper\"><header class=\"page-header\"><a class=\"logo\" href=\"/\">Simulated Shop</a></header>\n<main id=\"maincontent\"><h1>Welcome to the simulated shop</h1></main></div></body></html>\n";

/// Magento's 404 CMS page.
pub const NOT_FOUND_HTML: &str = "<!doctype html>\n<html><head><title>404 Not Found</title></head><body><h1>Whoops, our bad...</h1><p>The page you requested was not found.</p></body></html>\n";

/// 503 maintenance.
pub fn maintenance() -> Resp {
    html(503, MAINTENANCE_HTML)
}

/// 200 storefront HTML.
pub fn storefront() -> Resp {
    html(200, STOREFRONT_HTML)
}

/// 500 Internal Error: JSON on REST, the PHP error page on XML-RPC.
pub fn internal_error(xmlrpc: bool, report: u64) -> Resp {
    if xmlrpc {
        html(
            500,
            "<!doctype html>\n<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1></body></html>\n",
        )
    } else {
        let body = serde_json::json!({
            "message": format!(
                "Internal Error. Details are available in Magento log file. Report ID: webapi-{:013x}",
                report & 0xF_FFFF_FFFF_FFFF
            )
        });
        json_bytes(500, body.to_string().into_bytes())
    }
}

/// 429 with `Retry-After`.
pub fn rate_limited(retry_after_s: u64) -> Resp {
    let mut r = json_bytes(429, br#"{"message":"Too Many Requests"}"#.to_vec());
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, retry_after_s.into());
    r
}

/// The shop's own error with `message`: 500 JSON on REST, an XML-RPC
/// fault 1 on XML-RPC.
pub fn message(xmlrpc: bool, message: &str) -> Resp {
    if xmlrpc {
        crate::sim::server::xml(crate::magento::xmlrpc::encode_fault(1, message))
    } else {
        let body = serde_json::json!({ "message": message });
        json_bytes(500, body.to_string().into_bytes())
    }
}

/// A redirect to `to` plus the request's path and query.
pub fn redirect(status: u16, to: &str, path_and_query: &str) -> Resp {
    let location = format!("{}{path_and_query}", to.trim_end_matches('/'));
    let mut r = html(status, "<!doctype html>\n<html><body>Moved</body></html>\n");
    if let Ok(v) = hyper::header::HeaderValue::from_str(&location) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    r
}

/// 200 with a body that announces JSON (or XML) and does not parse.
pub fn garbage(xmlrpc: bool) -> Resp {
    if xmlrpc {
        let mut r = html(
            200,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<methodResponse><params><param><value><struct><member><name>sku</name><value><string>24-MB01</value></member></struct",
        );
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/xml; charset=UTF-8"),
        );
        r
    } else {
        json_bytes(
            200,
            b"{\"items\":[{\"id\":1,\"sku\":\"24-MB01\",\"name\":\"Joust Duffle Bag\",,\"price\":34 <br />\n<b>Fatal error</b>: Allowed memory size exhausted"
                .to_vec(),
        )
    }
}

/// Re-sends an answer with its full length announced but only the first
/// half of the body written, then closes the connection.
pub async fn truncate(resp: Resp) -> Resp {
    let (mut parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let announced = bytes.len().max(64);
    let half: Bytes = bytes.slice(..bytes.len() / 2);
    parts
        .headers
        .insert(hyper::header::CONTENT_LENGTH, announced.into());
    // Yield the half, pause so that it is flushed, then fail the body: hyper
    // closes the connection short of the announced length.
    let stream = futures_util::stream::unfold(0u8, move |state| {
        let half = half.clone();
        async move {
            match state {
                0 => Some((Ok(hyper::body::Frame::data(half)), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "simulated truncation",
                        )),
                        2,
                    ))
                }
                _ => None,
            }
        }
    });
    hyper::Response::from_parts(parts, stream_body(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_json_round_trip() {
        for f in [
            Fault::None,
            Fault::Down,
            Fault::Maintenance,
            Fault::Html200,
            Fault::Slow(Duration::from_millis(250)),
            Fault::Flaky { every: 3 },
            Fault::Truncated,
            Fault::Garbage,
            Fault::RateLimited { retry_after_s: 7 },
            Fault::Redirect {
                status: 308,
                to: "http://127.0.0.2:9".into(),
            },
            Fault::Message {
                message: "Internal\u{1b}[2J\r\n\u{202e}".into(),
            },
            Fault::ShortTotal { total: 3 },
            Fault::PartialListing { items: 10 },
            Fault::Endless { total: 7 },
            Fault::M1InfoFault {
                code: 101,
                every: 1,
            },
            Fault::M1InfoWrongId { every: 2 },
            Fault::M1ListIgnoresRange,
            Fault::M1HugeSession { bytes: 4096 },
        ] {
            assert_eq!(Fault::from_json(&f.to_json()), Ok(f));
        }
        assert!(Fault::from_json(&serde_json::json!({"mode": "explode"})).is_err());
        assert!(Fault::from_json(&serde_json::json!({"mode": "slow"})).is_err());
        let bad = serde_json::json!({"mode": "redirect", "status": 200, "to": "http://x"});
        assert!(Fault::from_json(&bad).is_err());
        let bad = serde_json::json!({"mode": "redirect", "status": 302});
        assert!(Fault::from_json(&bad).is_err());
    }
}
