//! End-to-end checks of the Magento simulator over real HTTP on 127.0.0.1.

use cobbyd::magento::{oauth, xmlrpc};
use cobbyd::sim::{Fault, SimConfig, SimHandle};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static NONCE: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn nonce() -> String {
    format!("n{}x{}", NONCE.fetch_add(1, Ordering::Relaxed), now())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn start(products: usize) -> SimHandle {
    SimHandle::start(SimConfig {
        products,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn q(pairs: &[(&str, &str)]) -> String {
    let v: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    oauth::query_string(&v)
}

/// GET `path_and_query`, OAuth-signed with the simulator's credentials
/// (secrets overridable to test refusals).
async fn signed(
    sim: &SimHandle,
    path_and_query: &str,
    consumer_secret: Option<&str>,
) -> (u16, String, Value) {
    let c = sim.credentials();
    let url = url::Url::parse(&format!("{}{}", sim.url(), path_and_query)).unwrap();
    let hdr = oauth::authorization_header(
        "GET",
        &url,
        &c.consumer_key,
        consumer_secret.unwrap_or(&c.consumer_secret),
        &c.access_token,
        &c.access_token_secret,
        now(),
        &nonce(),
    );
    send(client().get(url.as_str()).header("Authorization", hdr)).await
}

async fn send(rb: reqwest::RequestBuilder) -> (u16, String, Value) {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, ctype, v)
}

#[tokio::test]
async fn m2_oauth_paging_and_errors() {
    let sim = start(700).await;

    // A full cursor walk, (updated_at, entity_id) ascending, finds every SKU.
    let mut skus = Vec::new();
    for page in 1.. {
        let query = q(&[
            ("searchCriteria[sortOrders][0][field]", "updated_at"),
            ("searchCriteria[sortOrders][0][direction]", "ASC"),
            ("searchCriteria[sortOrders][1][field]", "entity_id"),
            ("searchCriteria[sortOrders][1][direction]", "ASC"),
            ("searchCriteria[pageSize]", "200"),
            ("searchCriteria[currentPage]", &page.to_string()),
        ]);
        let (status, ctype, v) = signed(&sim, &format!("/rest/V1/products?{query}"), None).await;
        assert_eq!(status, 200, "{v}");
        assert!(ctype.starts_with("application/json"));
        assert_eq!(v["total_count"], 700);
        let items = v["items"].as_array().unwrap();
        if items.is_empty() {
            assert_eq!(page, 5, "2.4: past the last page is empty");
            break;
        }
        skus.extend(items.iter().map(|i| i["sku"].as_str().unwrap().to_string()));
    }
    let mut expected = sim.skus();
    skus.sort();
    expected.sort();
    assert_eq!(skus, expected);

    // Items are exactly what m2_items says.
    let sku = expected[3].clone();
    let query = q(&[
        ("searchCriteria[filter_groups][0][filters][0][field]", "sku"),
        ("searchCriteria[filter_groups][0][filters][0][value]", &sku),
    ]);
    let (_, _, v) = signed(
        &sim,
        &format!("/index.php/rest/default/V1/products?{query}"),
        None,
    )
    .await;
    let want = sim
        .m2_items("default")
        .into_iter()
        .find(|i| i["sku"] == sku.as_str())
        .unwrap();
    assert_eq!(v["items"], json!([want]));
    assert_eq!(
        sim.m2_item(&sku.to_ascii_uppercase(), "default"),
        Some(want)
    );

    // An awkward SKU by path, '+' sent as %2B.
    let awkward = expected
        .iter()
        .find(|s| s.contains('+') || s.contains('/') || s.contains(' '))
        .unwrap();
    let path = format!("/rest/fr/V1/products/{}", oauth::encode(awkward));
    let (status, _, v) = signed(&sim, &path, None).await;
    assert_eq!(status, 200, "{awkward}: {v}");
    assert_eq!(v["sku"], awkward.as_str());
    assert!(v["extension_attributes"]["stock_item"].is_object());

    // fields projection.
    let (_, _, v) = signed(&sim, &format!("{path}?fields=sku,updated_at"), None).await;
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    let query = q(&[("searchCriteria[pageSize]", "1"), ("fields", "total_count")]);
    let (_, _, v) = signed(&sim, &format!("/rest/V1/products?{query}"), None).await;
    assert_eq!(v, json!({"total_count": 700}));

    // storeConfigs.
    let (status, _, v) = signed(&sim, "/rest/V1/store/storeConfigs", None).await;
    assert_eq!(status, 200);
    assert_eq!(v[1]["code"], "fr");

    // Errors.
    let (status, _, v) = signed(&sim, "/rest/V1/products", None).await;
    assert_eq!(
        (status, v["parameters"]["fieldName"].clone()),
        (400, json!("searchCriteria"))
    );
    let (status, _, v) = signed(&sim, "/rest/V1/products?searchCriteria[pageSize]=301", None).await;
    assert_eq!((status, v["parameters"]["max"].clone()), (400, json!(300)));
    let (status, _, v) = signed(&sim, "/rest/all/V1/store/storeConfigs", None).await;
    assert_eq!(status, 400, "{v}");
    let (status, _, v) = signed(&sim, "/rest/xx/V1/store/storeConfigs", None).await;
    assert_eq!(
        (status, v["message"].clone()),
        (404, json!("Request does not match any route."))
    );
    let (status, _, v) = signed(&sim, "/rest/V1/products/no-such-sku", None).await;
    assert_eq!(status, 404, "{v}");
    let (status, _, v) = signed(&sim, "/rest/V1/store/storeConfigs", Some("wrong")).await;
    assert_eq!(
        (status, v["message"].clone()),
        (
            401,
            json!("The signature is invalid. Verify and try again.")
        )
    );
    // The '+' trap: a space sent as '+' no longer matches the signature.
    let c = sim.credentials().clone();
    let url = url::Url::parse(&format!(
        "{}/rest/V1/products?searchCriteria[filter_groups][0][filters][0][field]=updated_at&searchCriteria[filter_groups][0][filters][0][value]=2020-01-01+00:00:00",
        sim.url()
    ))
    .unwrap();
    let mut spaced = url.clone();
    spaced.set_query(Some(&url.query().unwrap().replace('+', "%20")));
    let hdr = oauth::authorization_header(
        "GET",
        &spaced,
        &c.consumer_key,
        &c.consumer_secret,
        &c.access_token,
        &c.access_token_secret,
        now(),
        &nonce(),
    );
    let (status, _, _) = send(
        client()
            .get(url.as_str())
            .header("Authorization", hdr.clone()),
    )
    .await;
    assert_eq!(status, 401);
    // Same nonce again, now on the right URL: the nonce is spent.
    let (status, _, v) = send(client().get(spaced.as_str()).header("Authorization", hdr)).await;
    assert_eq!(
        (status, v["message"].clone()),
        (401, json!("An error occurred validating the nonce"))
    );

    // HMAC-SHA1 is refused.
    let sha1 = format!(
        "OAuth oauth_consumer_key=\"{}\",oauth_nonce=\"{}\",oauth_signature=\"abc\",oauth_signature_method=\"HMAC-SHA1\",oauth_timestamp=\"{}\",oauth_token=\"{}\",oauth_version=\"1.0\"",
        c.consumer_key,
        nonce(),
        now(),
        c.access_token
    );
    let (status, _, v) = send(
        client()
            .get(format!("{}/rest/V1/store/storeConfigs", sim.url()))
            .header("Authorization", sha1),
    )
    .await;
    assert_eq!(
        v,
        json!({"message": "Signature method %1 is not supported", "parameters": ["HMAC-SHA1"]})
    );
    assert_eq!(status, 400);

    // Bearer: refused until enabled.
    let bearer = || {
        client()
            .get(format!(
                "{}/rest/V1/products?searchCriteria[pageSize]=1",
                sim.url()
            ))
            .bearer_auth(&c.access_token)
    };
    let (status, _, v) = send(bearer()).await;
    assert_eq!(
        (status, v["parameters"]["resources"].clone()),
        (401, json!("Magento_Catalog::products"))
    );
    sim.set_bearer_enabled(true);
    let (status, _, _) = send(bearer()).await;
    assert_eq!(status, 200);

    // A revoked resource names itself.
    sim.revoke("Magento_Catalog::products");
    let (status, _, v) = send(bearer()).await;
    assert_eq!(
        (
            status,
            v["message"].clone(),
            v["parameters"]["resources"].clone()
        ),
        (
            401,
            json!("The consumer isn't authorized to access %resources."),
            json!("Magento_Catalog::products")
        )
    );
    sim.grant("Magento_Catalog::products");
    let counters = sim.counters();
    assert!(counters.m2_product_pages >= 5);
    assert!(counters.auth_failures >= 5);
    assert!(counters.by_route.contains_key("GET /V1/products"));
    sim.shutdown().await;
}

#[tokio::test]
async fn faults_and_control_api() {
    let sim = SimHandle::start(SimConfig {
        products: 50,
        bearer_enabled: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let token = sim.credentials().access_token.clone();
    let get = || {
        client()
            .get(format!(
                "{}/rest/V1/products?searchCriteria[pageSize]=5",
                sim.url()
            ))
            .bearer_auth(&token)
    };
    let control = |path: &str, body: Value| {
        client()
            .post(format!("{}{}", sim.control_url(), path))
            .body(body.to_string())
    };

    // Maintenance through the control API.
    let (status, _, _) = send(control("/fault", json!({"mode": "maintenance"}))).await;
    assert_eq!(status, 200);
    let (status, ctype, _) = send(get()).await;
    assert_eq!(status, 503);
    assert!(ctype.starts_with("text/html"));

    sim.set_fault(Fault::Html200);
    let (status, ctype, _) = send(get()).await;
    assert_eq!((status, ctype.starts_with("text/html")), (200, true));

    sim.set_fault(Fault::RateLimited { retry_after_s: 7 });
    let r = get().send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    sim.set_fault(Fault::Garbage);
    let r = get().send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&body).is_err());

    sim.set_fault(Fault::Truncated);
    let r = get().send().await.unwrap();
    assert!(
        r.bytes().await.is_err(),
        "a truncated body must fail to read"
    );

    sim.set_fault(Fault::Slow(Duration::from_millis(120)));
    let t = std::time::Instant::now();
    let (status, _, _) = send(get()).await;
    assert!(status == 200 && t.elapsed() >= Duration::from_millis(120));

    sim.set_fault(Fault::Flaky { every: 2 });
    let (a, _, _) = send(get()).await;
    let (b, _, v) = send(get()).await;
    assert_eq!((a, b), (200, 500));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("Internal Error.")
    );

    // Down: connection refused, control still answers, back on the same port.
    sim.set_fault(Fault::Down);
    let err = get().send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let (status, _, v) = send(client().get(format!("{}/health", sim.control_url()))).await;
    assert_eq!((status, v), (200, json!({"status": "ok"})));
    let (status, _, _) = send(control("/fault", json!({"mode": "none"}))).await;
    assert_eq!(status, 200);
    let (status, _, _) = send(get()).await;
    assert_eq!(status, 200);

    // Mutations through the control API.
    let (_, _, v) = send(control("/products/touch", json!({"count": 3}))).await;
    assert_eq!(v["skus"].as_array().unwrap().len(), 3);
    let (_, _, v) = send(control("/products/delete", json!({"count": 2}))).await;
    assert_eq!(v["skus"].as_array().unwrap().len(), 2);
    let (_, _, v) = send(control("/products/create", json!({"count": 4}))).await;
    assert_eq!(v["skus"].as_array().unwrap().len(), 4);
    assert_eq!(sim.product_count(), 52);

    let (_, _, v) = send(client().get(format!("{}/counters", sim.control_url()))).await;
    assert!(v["faults_injected"].as_u64().unwrap() >= 7, "{v}");
    assert!(v["requests"].as_u64().unwrap() >= 8);
    sim.shutdown().await;
}

async fn rpc(
    sim: &SimHandle,
    method: &str,
    params: &[xmlrpc::Value],
) -> Result<xmlrpc::Value, xmlrpc::Fault> {
    let body = xmlrpc::encode_call(method, params).unwrap();
    let r = client()
        .post(format!("{}/api/xmlrpc/", sim.url()))
        .header("Content-Type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    xmlrpc::decode_response(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn m1_sessions_calls_and_multicall() {
    use xmlrpc::Value as V;
    let sim = SimHandle::start(SimConfig {
        products: 300,
        session_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let c = sim.credentials().clone();

    let bad = rpc(&sim, "login", &[V::str(&c.api_user), V::str("wrong")]).await;
    assert_eq!(bad.unwrap_err().code, 2);
    let sid = rpc(&sim, "login", &[V::str(&c.api_user), V::str(&c.api_key)])
        .await
        .unwrap();
    let sid = sid.as_str().unwrap().to_string();
    assert_eq!(sid.len(), 32);
    let s = || V::str(&sid);

    let info = rpc(
        &sim,
        "call",
        &[s(), V::str("core_magento.info"), V::Array(vec![])],
    )
    .await
    .unwrap();
    assert!(info.get("magento_version").is_some());

    // list by id range, no paging.
    let filters = V::Struct(vec![(
        "product_id".into(),
        V::Struct(vec![
            ("from".into(), V::str("1")),
            ("to".into(), V::str("100")),
        ]),
    )]);
    let list = rpc(
        &sim,
        "call",
        &[s(), V::str("catalog_product.list"), V::Array(vec![filters])],
    )
    .await
    .unwrap();
    let V::Array(items) = list else { panic!() };
    assert!(items.len() > 90 && items.len() <= 100);
    assert!(matches!(items[0].get("product_id"), Some(V::String(_))));

    // info by SKU, and a digits-only SKU needs identifierType "sku".
    let all = sim.m1_items("default");
    let digits = all
        .iter()
        .find(|i| {
            i["sku"]
                .as_str()
                .unwrap()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .unwrap();
    let dsku = digits["sku"].as_str().unwrap();
    let by_sku = rpc(
        &sim,
        "call",
        &[
            s(),
            V::str("catalog_product.info"),
            V::Array(vec![
                V::str(dsku),
                V::str(""),
                V::Array(vec![]),
                V::str("sku"),
            ]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(&by_sku.to_json(), digits);
    let as_id = rpc(
        &sim,
        "call",
        &[
            s(),
            V::str("catalog_product.info"),
            V::Array(vec![V::str(dsku)]),
        ],
    )
    .await;
    assert!(
        matches!(as_id, Err(ref f) if f.code == 101)
            || as_id.is_ok_and(|v| v.get("sku").and_then(V::as_str) != Some(dsku))
    );

    // multiCall with one failing item.
    let calls = V::Array(vec![
        V::Array(vec![
            V::str("catalog_product.info"),
            V::Array(vec![V::str(all[0]["sku"].as_str().unwrap()), V::str("fr")]),
        ]),
        V::Array(vec![
            V::str("catalog_product.info"),
            V::Array(vec![V::str("no such sku")]),
        ]),
        V::Array(vec![V::str("catalog_product.nope"), V::Array(vec![])]),
    ]);
    let out = rpc(
        &sim,
        "multiCall",
        &[s(), calls, V::Struct(vec![("break".into(), V::Int(0))])],
    )
    .await
    .unwrap();
    let V::Array(out) = out else { panic!() };
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].to_json(), sim.m1_items("fr")[0]);
    assert_eq!(out[1].get("faultCode"), Some(&V::Int(101)));
    assert_eq!(out[1].get("isFault"), Some(&V::Bool(true)));
    assert_eq!(out[2].get("faultCode"), Some(&V::Int(3)));

    // ACL, unknown store, nil.
    sim.revoke("catalog/product");
    let denied = rpc(
        &sim,
        "call",
        &[s(), V::str("catalog_product.list"), V::Array(vec![])],
    )
    .await;
    assert_eq!(denied.unwrap_err().code, 2);
    sim.grant("catalog/product");
    let store = rpc(
        &sim,
        "call",
        &[
            s(),
            V::str("catalog_product.list"),
            V::Array(vec![V::Struct(vec![]), V::str("xx")]),
        ],
    )
    .await;
    assert_eq!(store.unwrap_err().code, 100);
    let nil = "<?xml version=\"1.0\"?><methodCall><methodName>call</methodName><params><param><value><nil/></value></param></params></methodCall>";
    let r = client()
        .post(format!("{}/index.php/api/xmlrpc/", sim.url()))
        .body(nil)
        .send()
        .await
        .unwrap();
    let f = xmlrpc::decode_response(&r.bytes().await.unwrap())
        .unwrap()
        .unwrap_err();
    assert_eq!(f.code, 636);

    // Expiry.
    sim.expire_sessions();
    let expired = rpc(
        &sim,
        "call",
        &[s(), V::str("core_magento.info"), V::Array(vec![])],
    )
    .await;
    assert_eq!(expired.unwrap_err().code, 5);

    // Maintenance covers XML-RPC.
    sim.set_fault(Fault::Maintenance);
    let r = client()
        .post(format!("{}/api/xmlrpc/", sim.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    sim.set_fault(Fault::None);

    let k = sim.counters();
    assert_eq!(k.m1_logins, 2);
    assert_eq!(k.m1_multicalls, 1);
    assert_eq!(k.m1_multicall_items, 3);
    assert!(k.by_route.contains_key("xmlrpc call catalog_product.list"));
    sim.shutdown().await;
}

#[tokio::test]
async fn index_php_only_and_legacy_paging() {
    let sim = SimHandle::start(SimConfig {
        products: 30,
        bearer_enabled: true,
        index_php_only: true,
        legacy_last_page: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let token = sim.credentials().access_token.clone();
    let get = |prefix: &str, page: u32| {
        client()
            .get(format!(
                "{}{prefix}/V1/products?searchCriteria[pageSize]=20&searchCriteria[currentPage]={page}",
                sim.url()
            ))
            .bearer_auth(&token)
    };
    let (status, ctype, _) = send(get("/rest", 1)).await;
    assert_eq!((status, ctype.starts_with("text/html")), (200, true));
    let (_, _, last) = send(get("/index.php/rest", 2)).await;
    assert_eq!(last["items"].as_array().unwrap().len(), 10);
    let (_, _, again) = send(get("/index.php/rest", 3)).await;
    assert_eq!(again["items"], last["items"], "2.3: the last page again");
    sim.shutdown().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Throughput of full 200-item pages from a 1,000,000-product catalog.
/// Run on demand: `cargo test --release --test sim_smoke -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_1m() {
    let before = rss_kib();
    let t = std::time::Instant::now();
    let sim = SimHandle::start(SimConfig {
        products: 1_000_000,
        bearer_enabled: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    println!(
        "generated 1M products in {:?}, RSS +{} MiB",
        t.elapsed(),
        (rss_kib() - before) / 1024
    );
    let token = sim.credentials().access_token.clone();
    let c = client();
    let pages = 250u32; // 50,000 products
    let conc = 2u32;
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let c = c.clone();
        let url = sim.url();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0usize;
            let mut page = 1 + w;
            while page <= pages {
                let r = c
                    .get(format!(
                        "{url}/rest/V1/products?searchCriteria[sortOrders][0][field]=updated_at&searchCriteria[sortOrders][0][direction]=ASC&searchCriteria[sortOrders][1][field]=entity_id&searchCriteria[sortOrders][1][direction]=ASC&searchCriteria[pageSize]=200&searchCriteria[currentPage]={}",
                        page + 2000
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                bytes += r.bytes().await.unwrap().len();
                page += conc;
            }
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{} products in {:.2}s: {:.0} products/s, {:.1} MiB/s (client and server share 2 workers)",
        pages * 200,
        secs,
        f64::from(pages * 200) / secs,
        bytes as f64 / secs / 1048576.0
    );
    println!("RSS now {} MiB", rss_kib() / 1024);
    sim.shutdown().await;
}
