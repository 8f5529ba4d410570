//! The control socket's request handling: raw bytes through the real
//! connection code and router (an in-memory connection, a store in a temp
//! dir), and the JSON bodies of the mutating routes.

use cobbyd::fuzzing::{self, ControlHarness, parse_answer};
use cobbyd::routes::MAX_BODY;
use proptest::prelude::*;
use serde_json::{Value, json};

fn request(method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

fn answer(h: &ControlHarness, req: &[u8]) -> fuzzing::RawAnswer {
    let bytes = h.exchange(req).expect("an answer within 30 s");
    parse_answer(&bytes).expect("an answer, not a close")
}

/// Routes with a JSON body, as (method, path).
const MUTATING: [(&str, &str); 3] = [
    ("POST", "/v1/shops"),
    ("PUT", "/v1/shops/acme/credentials"),
    ("POST", "/v1/shops/acme/sync"),
];

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"
        ])
        .prop_map(str::to_string),
        "[A-Za-z]{1,8}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "/health",
            "/metrics",
            "/v1/status",
            "/v1/status?shop=acme",
            "/v1/config",
            "/v1/shops",
            "/v1/shops/acme",
            "/v1/shops/acme?purge=true",
            "/v1/shops/acme?purge=maybe",
            "/v1/shops/acme/test",
            "/v1/shops/acme/credentials",
            "/v1/shops/acme/sync",
            "/v1/shops/acme/runs",
            "/v1/shops/acme/products?format=csv",
            "/v1/shops/acme/products?format=xml&store_code=%ff",
            "/v1/shops/%ZZ",
            "/v1/shops/a%00b",
            "/",
            "//",
            "/v1/shops/acme/../..",
            "*",
        ])
        .prop_map(str::to_string),
        "/[a-zA-Z0-9/%?=&._~-]{0,40}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        ".{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "name",
                    "platform",
                    "url",
                    "store_codes",
                    "auth",
                    "credentials",
                    "no_verify",
                    "full",
                    "api_user",
                    "api_key",
                    "access_token",
                    "x",
                ]),
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// add-shop bodies close to valid ones (no network: unverified, or an
/// address that refuses at once).
fn add_body() -> impl Strategy<Value = Value> {
    (
        prop_oneof!["[a-z][a-z0-9-]{0,10}", ".{0,8}"],
        prop::sample::select(vec!["magento1", "magento2", "magento3", ""]),
        prop::sample::select(vec![
            "http://127.0.0.1:1", "https://127.0.0.1:1/shop", "ftp://x", "not a url",
            "http://u:p@127.0.0.1:1", "http://127.0.0.1:1/?q=1", " http://127.0.0.1:1",
        ]),
        prop::collection::vec(prop_oneof!["[a-z_]{1,8}", ".{0,6}"], 0..3),
        prop::sample::select(vec!["oauth", "bearer", "basic"]),
        json_value(),
        any::<bool>(),
    )
        .prop_map(|(name, platform, url, codes, auth, creds, no_verify)| {
            let creds = match creds {
                Value::Object(_) => creds,
                _ => json!({"api_user": "u", "api_key": "k", "consumer_key": "a", "consumer_secret": "b",
                            "access_token": "c", "access_token_secret": "d"}),
            };
            json!({"name": name, "platform": platform, "url": url, "store_codes": codes,
                   "auth": auth, "credentials": creds, "no_verify": no_verify,
                   // So that bodies get past the https rule to the rest.
                   "allow_insecure_http": true})
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_an_answer_or_a_close(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let h = ControlHarness::new().unwrap();
        fuzzing::check_control(&h, &data);
    }

    /// Well-formed requests to every route with every method, and damaged
    /// copies of them.
    #[test]
    fn requests_get_well_formed_answers(m in method(), p in path(), body in json_value(),
                                        cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(),
                                        byte in any::<u8>()) {
        let h = ControlHarness::new().unwrap();
        let req = request(&m, &p, &[("Content-Type", "application/json".into())], body.to_string().as_bytes());
        fuzzing::check_control(&h, &req);
        let a = answer(&h, &req);
        // Errors from the API itself are JSON {"error": {kind, message}}.
        if (400..500).contains(&a.status) && m != "HEAD" {
            let body = body_of(&a);
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{} {} -> {}: not JSON ({e}): {:?}", m, p, a.status,
                                                          String::from_utf8_lossy(&body))))?;
            prop_assert!(v["error"]["kind"].is_string() && v["error"]["message"].is_string(), "{v}");
        }
        let mut damaged = req.clone();
        let i = flip.index(damaged.len());
        damaged[i] = byte;
        fuzzing::check_control(&h, &damaged);
        damaged.truncate(cut.index(damaged.len()));
        fuzzing::check_control(&h, &damaged);
    }

    /// A body over the cap gets 413, on every route that reads one, with
    /// Content-Length or chunked.
    #[test]
    fn bodies_over_the_cap_get_413(route in 0usize..3, extra in 1usize..(960 * 1024), chunked in any::<bool>()) {
        let h = ControlHarness::new().unwrap();
        let (m, p) = MUTATING[route];
        let body = vec![b' '; MAX_BODY + extra];
        let req = if chunked {
            let mut r = format!("{m} {p} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
            for c in body.chunks(16 * 1024) {
                r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                r.extend_from_slice(c);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        } else {
            request(m, p, &[], &body)
        };
        let a = answer(&h, &req);
        prop_assert_eq!(a.status, 413);
    }

    /// JSON bodies of the mutating routes: a 2xx or a 4xx JSON error that
    /// names the problem, never a 500.
    #[test]
    fn mutating_bodies(route in 0usize..3, body in prop_oneof![json_value(), add_body()]) {
        let h = ControlHarness::new().unwrap();
        // A shop to act on, registered without a probe.
        let add = json!({"name": "acme", "platform": "magento1", "url": "http://127.0.0.1:1",
                         "credentials": {"api_user": "u", "api_key": "k"}, "no_verify": true,
                         "allow_insecure_http": true});
        let a = answer_keep(&h, &request("POST", "/v1/shops", &[], add.to_string().as_bytes()));
        prop_assert_eq!(a.status, 201);
        let (m, p) = MUTATING[route];
        let a = answer(&h, &request(m, p, &[], body.to_string().as_bytes()));
        prop_assert!(a.status < 500, "{} for {}", a.status, body);
        if a.status >= 400 {
            let v: Value = serde_json::from_slice(&body_of(&a)).unwrap();
            prop_assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty(), "{v}");
        }
    }
}

fn answer_keep(h: &ControlHarness, req: &[u8]) -> fuzzing::RawAnswer {
    let bytes = h.exchange_keep(req, true).expect("an answer within 30 s");
    parse_answer(&bytes).expect("an answer, not a close")
}

/// The body of an answer (de-chunked when chunked).
fn body_of(a: &fuzzing::RawAnswer) -> Vec<u8> {
    if a.header("transfer-encoding") != Some("chunked") {
        let n: usize = a
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(a.rest.len());
        return a.rest[..n.min(a.rest.len())].to_vec();
    }
    let mut out = Vec::new();
    let mut rest = &a.rest[..];
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&rest[i + 2..i + 2 + n]);
        rest = &rest[i + 4 + n..];
    }
    out
}

/// Headers sent one byte short, or never finished, end with a close, not
/// a hang (the client closes its side).
#[test]
fn truncated_requests_close() {
    let h = ControlHarness::new().unwrap();
    let full = request("POST", "/v1/shops/acme/sync", &[], b"{\"full\":true}");
    for n in [1, 10, full.len() / 2, full.len() - 1] {
        fuzzing::check_control(&h, &full[..n]);
    }
}
