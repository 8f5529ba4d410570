//! Shop connections and liveness: `shop add|list|show|test|rotate|remove`,
//! the health states a probe leads to (healthy, degraded, down, auth_failed,
//! misconfigured) with their problem kind and hint, backoff, crash recovery
//! of a leased probe, and that secrets never leak. Every case that applies to
//! both platforms runs for Magento 1 and Magento 2.

use crate::harness::*;
use cobbyd::sim::{Fault, SimConfig, SimCredentials};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Fast probes for tests: failures retry at 200 ms doubling to 2 s; a shop
/// unreachable for 1 s is down. Syncs stay out of the way (hourly).
fn fast(backoff_max: &str) -> String {
    format!(
        "[probe]\ninterval = \"300ms\"\ntimeout = \"10s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"{backoff_max}\"\ndown_after = \"1s\"\n\
         [sync]\ninterval = \"1h\"\nfull_interval = \"24h\"\nrequest_timeout = \"10s\"\n"
    )
}

const FAST: &str = "2s";

#[derive(Clone, Copy, Debug, PartialEq)]
enum P {
    M1,
    M2,
}

const BOTH: [P; 2] = [P::M1, P::M2];

impl P {
    fn platform(self) -> &'static str {
        match self {
            P::M1 => "magento1",
            P::M2 => "magento2",
        }
    }

    fn name(self, prefix: &str) -> String {
        format!(
            "{prefix}-{}",
            match self {
                P::M1 => "m1",
                P::M2 => "m2",
            }
        )
    }

    /// Good credentials (M2: OAuth).
    fn creds(self, sim: &Sim) -> String {
        match self {
            P::M1 => sim.credentials().m1_toml(),
            P::M2 => sim.credentials().m2_oauth_toml(),
        }
    }

    /// A wrong key: M1 api_key, M2 consumer_key. Same length and shape.
    fn wrong_key(self, sim: &Sim) -> String {
        let mut c = sim.credentials().clone();
        match self {
            P::M1 => c.api_key = "ffffffffwrongapikey0000000000000".into(),
            P::M2 => c.consumer_key = "ffffffffwrongconsumerkey00000000".into(),
        }
        toml_of(self, &c)
    }

    /// The ACL resource the catalog sync needs.
    fn catalog_resource(self) -> &'static str {
        match self {
            P::M1 => "catalog/product",
            P::M2 => "Magento_Catalog::products",
        }
    }
}

fn toml_of(p: P, c: &SimCredentials) -> String {
    match p {
        P::M1 => c.m1_toml(),
        P::M2 => c.m2_oauth_toml(),
    }
}

/// A credentials file, mode 0600.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn small_sim() -> Sim {
    Sim::start(40)
}

/// `shop add` with good credentials; asserts exit 0.
fn add_ok(d: &Daemon, name: &str, p: P, url: &str, creds: &str) {
    let out = d.add_shop(name, p.platform(), url, creds, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: {}\n{}",
        stderr(&out),
        d.log()
    );
    assert!(stdout(&out).contains("healthy"), "{}", stdout(&out));
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("?")
}

fn kind(s: &Value) -> &str {
    s["problem"]["kind"].as_str().unwrap_or("-")
}

fn wait_state(d: &Daemon, name: &str, want: &str) -> Value {
    d.wait_shop(name, want, |s| state(s) == want)
}

fn shop_names(d: &Daemon) -> Vec<String> {
    d.json("/v1/shops")["shops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// `cobbyd status` (table): exit 1, and the shop's hint is shown.
fn status_shows_hint(d: &Daemon, hint: &str) -> String {
    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(hint), "hint {hint:?} not in status:\n{text}");
    text
}

#[test]
fn good_credentials_make_a_healthy_shop_and_secrets_are_redacted() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        let name = p.name("good");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
        let s = d.shop(&name);
        assert_eq!(state(&s), "healthy", "{s:#}");
        assert!(s["problem"].is_null(), "{s:#}");
        assert_eq!(s["platform"], p.platform());
        assert_eq!(s["url"], sim.url());
        assert_eq!(s["store_codes"], serde_json::json!(["default"]));
    }
    let c = sim.credentials();
    let secrets = [
        &c.api_key,
        &c.consumer_key,
        &c.consumer_secret,
        &c.access_token,
        &c.access_token_secret,
    ];
    let list = d.cli(&["shop", "list"]);
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let list_json = d.cli(&["shop", "list", "--json"]);
    assert_eq!(list_json.status.code(), Some(0), "{}", stderr(&list_json));
    let v: Value = serde_json::from_slice(&list_json.stdout).unwrap();
    assert_eq!(v["shops"].as_array().unwrap().len(), 2, "{v:#}");
    for p in BOTH {
        assert!(stdout(&list).contains(&p.name("good")), "{}", stdout(&list));
        let show = d.cli(&["shop", "show", &p.name("good"), "--json"]);
        assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
        let v: Value = serde_json::from_slice(&show.stdout).unwrap();
        let creds = &v["credentials"];
        match p {
            P::M1 => {
                assert_eq!(creds["api_user"], c.api_user.as_str(), "{v:#}");
                assert_eq!(
                    creds["api_key"],
                    format!("****{}", &c.api_key[c.api_key.len() - 4..]),
                    "{v:#}"
                );
            }
            P::M2 => {
                assert_eq!(v["auth"], "oauth");
                for (k, val) in [
                    ("consumer_key", &c.consumer_key),
                    ("consumer_secret", &c.consumer_secret),
                    ("access_token", &c.access_token),
                    ("access_token_secret", &c.access_token_secret),
                ] {
                    assert_eq!(
                        creds[k],
                        format!("****{}", &val[val.len() - 4..]),
                        "{k}: {v:#}"
                    );
                }
            }
        }
        assert_eq!(v["status"]["state"], "healthy", "{v:#}");
        let show_text = d.cli(&["shop", "show", &p.name("good")]);
        assert_eq!(show_text.status.code(), Some(0), "{}", stderr(&show_text));
        for out in [&list, &list_json, &show, &show_text] {
            for s in secrets {
                assert!(
                    !stdout(out).contains(s.as_str()) && !stderr(out).contains(s.as_str()),
                    "secret shown"
                );
            }
        }
    }
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn wrong_credentials_are_refused_or_auth_failed_with_a_hint() {
    let sim = small_sim();
    // Auth failures wait backoff_max: keep it short so the probe repeats.
    let d = Daemon::start(&fast(FAST));
    let mut wrong_secret = sim.credentials().clone();
    wrong_secret.consumer_secret = "ffffffffwrongconsumersecret00000".into();
    let cases = [
        (
            P::M1,
            "key",
            P::M1.wrong_key(&sim),
            "unauthorized",
            "extra spaces are a classic",
        ),
        (
            P::M2,
            "key",
            P::M2.wrong_key(&sim),
            "unauthorized",
            "activated in System > Integrations",
        ),
        (
            P::M2,
            "secret",
            toml_of(P::M2, &wrong_secret),
            "bad_signature",
            "consumer secret or access token secret is wrong",
        ),
    ];
    for (p, what, creds, want_kind, hint_part) in &cases {
        let name = p.name(&format!("bad{what}"));
        // Refused without --no-verify: exit 1, message and hint, nothing saved.
        let out = d.add_shop(&name, p.platform(), &sim.url(), creds, &[]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("nothing was saved"), "{err}");
        assert!(err.contains(want_kind), "{err}");
        assert!(err.contains("\nhint: ") && err.contains(hint_part), "{err}");
        assert!(!shop_names(&d).contains(&name), "saved anyway");
        // Saved with --no-verify; the probe turns it auth_failed.
        let out = d.add_shop(&name, p.platform(), &sim.url(), creds, &["--no-verify"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let s = wait_state(&d, &name, "auth_failed");
        assert_eq!(kind(&s), *want_kind, "{s:#}");
        let hint = s["problem"]["hint"].as_str().unwrap();
        assert!(hint.contains(hint_part), "{hint}");
        assert!(s["problem"]["attempts"].as_u64().unwrap() >= 1, "{s:#}");
        assert!(s["problem"]["next_try"].is_string(), "{s:#}");
        status_shows_hint(&d, hint);
        // The JSON status exits 1 too.
        assert_eq!(d.cli(&["status", "--json"]).status.code(), Some(1));
    }
    // Auth failures retry at backoff_max, not faster.
    let s = d.shop(&P::M1.name("badkey"));
    for delay in s["retry_delays_ms"].as_array().unwrap() {
        assert_eq!(delay.as_u64(), Some(2000), "{s:#}");
    }
}

#[test]
fn invalid_input_is_refused_naming_the_field_and_never_the_value() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    let c = sim.credentials();
    for p in BOTH {
        let (key, mut spaced) = match p {
            P::M1 => ("api_key", c.clone()),
            P::M2 => ("consumer_secret", c.clone()),
        };
        let value = "zq7trailingspacevalue000000";
        match p {
            P::M1 => spaced.api_key = format!("{value} "),
            P::M2 => spaced.consumer_secret = format!("{value} "),
        }
        let out = d.add_shop(
            &p.name("spaced"),
            p.platform(),
            &sim.url(),
            &toml_of(p, &spaced),
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains(key) && err.contains("white space"), "{err}");
        assert!(
            !err.contains(value) && !stdout(&out).contains(value),
            "{err}"
        );
        // A leading space as well.
        match p {
            P::M1 => spaced.api_key = format!(" {value}"),
            P::M2 => spaced.consumer_secret = format!(" {value}"),
        }
        let out = d.add_shop(
            &p.name("spaced"),
            p.platform(),
            &sim.url(),
            &toml_of(p, &spaced),
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains(key) && stderr(&out).contains("white space"),
            "{}",
            stderr(&out)
        );
        // Empty values.
        let mut empty = c.clone();
        let empty_key = match p {
            P::M1 => {
                empty.api_user = String::new();
                "api_user"
            }
            P::M2 => {
                empty.access_token = String::new();
                "access_token"
            }
        };
        let out = d.add_shop(
            &p.name("empty"),
            p.platform(),
            &sim.url(),
            &toml_of(p, &empty),
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains(empty_key) && stderr(&out).contains("empty"),
            "{}",
            stderr(&out)
        );
        // A missing key.
        // A missing key (M1), a key of the other platform (M2).
        let out = d.add_shop(
            &p.name("missing"),
            p.platform(),
            &sim.url(),
            "api_user = \"x\"\n",
            &[],
        );
        assert_eq!(out.status.code(), Some(1));
        let (field, why) = match p {
            P::M1 => ("api_key", "missing"),
            P::M2 => ("api_user", "unknown key"),
        };
        assert!(
            stderr(&out).contains(field) && stderr(&out).contains(why),
            "{}",
            stderr(&out)
        );
        // Bad name, bad URLs.
        for (name, url, field) in [
            ("Acme!", sim.url(), "name"),
            ("acme", "ftp://shop.example.com".to_string(), "url"),
            (
                "acme",
                "https://user:pw@shop.example.com".to_string(),
                "url",
            ),
            ("acme", "shop.example.com".to_string(), "url"),
        ] {
            // From a file: the CLI refuses before reading credentials, so
            // it may exit before a stdin writer is done.
            let file = d.dir.path().join("creds.toml");
            write_private(&file, &p.creds(&sim));
            let out = d.cli(&[
                "shop",
                "add",
                name,
                "--platform",
                p.platform(),
                "--url",
                &url,
                "--credentials-file",
                file.to_str().unwrap(),
            ]);
            assert_eq!(out.status.code(), Some(1), "{name} {url}");
            let err = stderr(&out);
            assert!(err.contains(&format!("{field}:")), "{name} {url}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }
    // The daemon checks as well (a script may post to the socket directly).
    let body = serde_json::json!({
        "name": "direct", "platform": "magento1", "url": sim.url(),
        "credentials": {"api_user": "cobbyd_sim", "api_key": "zq7directvalue0000000000 "},
    });
    let (code, answer) = d.http("POST", "/v1/shops", Some(&body.to_string()));
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("api_key") && answer.contains("white space"),
        "{answer}"
    );
    assert!(!answer.contains("zq7directvalue"), "{answer}");
    let body = serde_json::json!({
        "name": "Acme!", "platform": "magento1", "url": sim.url(),
        "credentials": {"api_user": "cobbyd_sim", "api_key": sim.credentials().api_key},
    });
    let (code, answer) = d.http("POST", "/v1/shops", Some(&body.to_string()));
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("name:"), "{answer}");
    // Nothing was saved, and no request reached the shop.
    assert!(shop_names(&d).is_empty());
    assert_eq!(sim.counters().requests, 0, "{:?}", sim.counters());
}

#[test]
fn revoked_catalog_permission_is_forbidden_resource() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        let name = p.name("acl");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
    }
    for p in BOTH {
        sim.revoke(p.catalog_resource());
    }
    let mut hints = Vec::new();
    for p in BOTH {
        let name = p.name("acl");
        let s = wait_state(&d, &name, "auth_failed");
        assert_eq!(kind(&s), "forbidden_resource", "{s:#}");
        let msg = s["problem"]["message"].as_str().unwrap();
        let named = match p {
            P::M1 => "catalog_product",
            P::M2 => "Magento_Catalog::products",
        };
        assert!(msg.contains(named), "{msg}");
        let hint = s["problem"]["hint"].as_str().unwrap().to_string();
        assert!(hint.contains("lacks"), "{hint}");
        // `shop test` diagnoses it too.
        let out = d.cli(&["shop", "test", &name]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stdout(&out).contains("forbidden_resource") && stdout(&out).contains(&hint),
            "{}",
            stdout(&out)
        );
        hints.push(hint);
    }
    for h in &hints {
        status_shows_hint(&d, h);
    }
    // Granted again: healthy at the next probe.
    for p in BOTH {
        sim.grant(p.catalog_resource());
    }
    for p in BOTH {
        wait_state(&d, &p.name("acl"), "healthy");
    }
}

#[test]
fn wrong_url_and_html_answers_are_misconfigured() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        // Refused at add, saved with --no-verify.
        let name = p.name("path");
        let url = format!("{}/nonsense", sim.url());
        let out = d.add_shop(&name, p.platform(), &url, &p.creds(&sim), &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("hint: "), "{}", stderr(&out));
        let out = d.add_shop(&name, p.platform(), &url, &p.creds(&sim), &["--no-verify"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let s = wait_state(&d, &name, "misconfigured");
        assert!(["not_api", "http_status"].contains(&kind(&s)), "{s:#}");
        status_shows_hint(&d, s["problem"]["hint"].as_str().unwrap());
        // A registered shop whose API starts answering HTML.
        add_ok(&d, &p.name("html"), p, &sim.url(), &p.creds(&sim));
    }
    sim.set_fault(Fault::Html200);
    for p in BOTH {
        let s = wait_state(&d, &p.name("html"), "misconfigured");
        assert!(["not_api", "http_status"].contains(&kind(&s)), "{s:#}");
        let hint = s["problem"]["hint"].as_str().unwrap();
        assert!(hint.contains("routed"), "{hint}");
        status_shows_hint(&d, hint);
    }
    sim.set_fault(Fault::None);
    for p in BOTH {
        wait_state(&d, &p.name("html"), "healthy");
    }
}

#[test]
fn index_php_only_shops_are_healthy_through_the_fallback() {
    let sim = Sim::start_with(SimConfig {
        products: 40,
        index_php_only: true,
        ..Default::default()
    });
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        let name = p.name("idx");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
        let out = d.cli(&["shop", "test", &name, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["api_base"].as_str().unwrap().contains("index.php"),
            "{v:#}"
        );
    }
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn maintenance_is_degraded_never_auth_failed() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        add_ok(&d, &p.name("maint"), p, &sim.url(), &p.creds(&sim));
    }
    sim.set_fault(Fault::Maintenance);
    for p in BOTH {
        let name = p.name("maint");
        let s = d.wait_shop(&name, "maintenance seen twice", |s| {
            kind(s) == "maintenance" && s["problem"]["attempts"].as_u64() >= Some(2)
        });
        assert_eq!(state(&s), "degraded", "{s:#}");
        assert_eq!(s["problem"]["http_status"], 503, "{s:#}");
        let hint = s["problem"]["hint"].as_str().unwrap();
        assert!(hint.contains("maintenance"), "{hint}");
        status_shows_hint(&d, hint);
        // Never an auth failure, however long it lasts (2 s > down_after).
        std::thread::sleep(Duration::from_millis(300));
        let s = d.wait_shop(&name, "a few more attempts", |s| {
            s["problem"]["attempts"].as_u64() >= Some(4)
        });
        assert_eq!(state(&s), "degraded", "{s:#}");
        assert_eq!(kind(&s), "maintenance", "{s:#}");
    }
    sim.set_fault(Fault::None);
    for p in BOTH {
        wait_state(&d, &p.name("maint"), "healthy");
    }
}

#[test]
fn down_shop_backs_off_then_recovers() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        add_ok(&d, &p.name("down"), p, &sim.url(), &p.creds(&sim));
    }
    sim.set_fault(Fault::Down);
    // Watch both shops at once: each must pass through degraded to down.
    let mut seen_degraded = [false; 2];
    let t = Instant::now();
    let last = loop {
        let now: Vec<Value> = BOTH.iter().map(|p| d.shop(&p.name("down"))).collect();
        for (i, s) in now.iter().enumerate() {
            if state(s) == "degraded" {
                seen_degraded[i] = true;
                assert!(["connect", "protocol"].contains(&kind(s)), "{s:#}");
            }
            assert!(["healthy", "degraded", "down"].contains(&state(s)), "{s:#}");
        }
        let done = now.iter().all(|s| {
            state(s) == "down"
                && s["retry_delays_ms"]
                    .as_array()
                    .is_some_and(|a| a.len() >= 5)
        });
        if done {
            break now;
        }
        assert!(
            t.elapsed() < WAIT,
            "not down in time: {now:#?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(40));
    };
    assert_eq!(
        seen_degraded,
        [true, true],
        "down without being degraded first"
    );
    for s in &last {
        assert_eq!(kind(s), "connect", "{s:#}");
        let delays: Vec<u64> = s["retry_delays_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(delays.iter().all(|&ms| ms <= 2000), "{delays:?}");
        // Doubling with ±25% jitter: each of the first four exceeds the one
        // before; the cap is reached.
        assert!(delays.windows(2).take(3).all(|w| w[1] > w[0]), "{delays:?}");
        assert!(*delays.iter().max().unwrap() >= 1500, "{delays:?}");
        let hint = s["problem"]["hint"].as_str().unwrap();
        assert!(hint.contains("firewall"), "{hint}");
        status_shows_hint(&d, hint);
    }
    sim.set_fault(Fault::None);
    for p in BOTH {
        let s = wait_state(&d, &p.name("down"), "healthy");
        assert!(
            s["problem"].is_null() && s["retry_delays_ms"].as_array().unwrap().is_empty(),
            "{s:#}"
        );
        assert_eq!(s["consecutive_failures"], 0);
    }
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn m1_session_expiry_between_probes_logs_in_again() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    let name = P::M1.name("sess");
    add_ok(&d, &name, P::M1, &sim.url(), &P::M1.creds(&sim));
    let probes = || {
        sim.counters()
            .by_route
            .get("xmlrpc call core_magento.info")
            .copied()
            .unwrap_or(0)
    };
    // Let the first sync finish so its calls do not blur the counts.
    d.wait_shop(&name, "first sync", |s| !s["sync"]["last_run"].is_null());
    let logins = sim.counters().m1_logins;
    let before = probes();
    sim.expire_sessions();
    let t = Instant::now();
    while probes() < before + 3 {
        assert!(
            t.elapsed() < WAIT,
            "no probes after expiry: {:?}",
            sim.counters()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = d.shop(&name);
    assert_eq!(state(&s), "healthy", "{s:#}");
    assert_eq!(s["consecutive_failures"], 0, "{s:#}");
    assert!(
        sim.counters().m1_logins > logins,
        "no second login: {:?}",
        sim.counters()
    );
    // One login per expiry, not one per probe.
    assert!(
        sim.counters().m1_logins <= logins + 2,
        "{:?}",
        sim.counters()
    );
}

#[test]
fn m2_oauth_is_verified_and_bearer_needs_the_shop_setting() {
    let sim = small_sim();
    let d = Daemon::start(&fast(FAST));
    add_ok(&d, "oauth", P::M2, &sim.url(), &P::M2.creds(&sim));
    d.wait_shop("oauth", "a few probes", |s| s["last_probe"].is_string());
    let t = Instant::now();
    while sim.counters().m2_store_configs < 3 {
        assert!(t.elapsed() < WAIT, "{:?}", sim.counters());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state(&d.shop("oauth")), "healthy");
    assert_eq!(sim.counters().auth_failures, 0, "{:?}", sim.counters());
    // Bearer, disabled in the shop: refused with the unauthorized hint.
    let bearer = sim.credentials().m2_bearer_toml();
    let out = d.add_shop(
        "bearer",
        "magento2",
        &sim.url(),
        &bearer,
        &["--auth", "bearer"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("hint: "), "{}", stderr(&out));
    assert!(!shop_names(&d).contains(&"bearer".to_string()));
    // The OAuth file is not a bearer file.
    let out = d.add_shop(
        "bearer",
        "magento2",
        &sim.url(),
        &P::M2.creds(&sim),
        &["--auth", "bearer"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown key") && stderr(&out).contains("expected access_token"),
        "{}",
        stderr(&out)
    );
    sim.set_bearer_enabled(true);
    let out = d.add_shop(
        "bearer",
        "magento2",
        &sim.url(),
        &bearer,
        &["--auth", "bearer"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = wait_state(&d, "bearer", "healthy");
    assert_eq!(s["auth"], "bearer");
    assert_eq!(d.cli(&["shop", "test", "bearer"]).status.code(), Some(0));
    // The shop turns bearer off again: auth_failed.
    sim.set_bearer_enabled(false);
    let s = wait_state(&d, "bearer", "auth_failed");
    assert!(
        ["unauthorized", "forbidden_resource"].contains(&kind(&s)),
        "{s:#}"
    );
    assert_eq!(state(&d.shop("oauth")), "healthy");
}

#[test]
fn shop_test_exit_codes() {
    let sim = small_sim();
    // Slow retries: only `shop test` probes the failing shop soon.
    let d = Daemon::start(&fast("10m"));
    for p in BOTH {
        let name = p.name("t");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
        let out = d.cli(&["shop", "test", &name]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(stdout(&out).contains("OK"), "{}", stdout(&out));
    }
    let out = d.cli(&["shop", "test", "nosuchshop"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nosuchshop"), "{}", stderr(&out));
    sim.set_fault(Fault::Maintenance);
    for p in BOTH {
        let name = p.name("t");
        let out = d.cli(&["shop", "test", &name]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let text = stdout(&out);
        assert!(
            text.contains("degraded") && text.contains("maintenance"),
            "{text}"
        );
        assert!(
            text.contains("hint: ") && text.contains("maintenance mode"),
            "{text}"
        );
        // The test result is recorded.
        assert_eq!(kind(&d.shop(&name)), "maintenance");
    }
    sim.set_fault(Fault::None);
    for p in BOTH {
        let name = p.name("t");
        assert_eq!(d.cli(&["shop", "test", &name]).status.code(), Some(0));
        assert_eq!(state(&d.shop(&name)), "healthy");
    }
}

#[test]
fn rotate_keeps_old_credentials_on_failure_and_heals_at_once() {
    let sim = small_sim();
    // backoff_max 10 min: an auth_failed shop heals only through rotate.
    let d = Daemon::start(&fast("10m"));
    for p in BOTH {
        let name = p.name("rot");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
        // Bad new credentials: refused, the old ones stay.
        let bad = p.wrong_key(&sim);
        let out = d.cli_stdin(
            &["shop", "rotate", &name, "--credentials-file", "-"],
            Some(&bad),
        );
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stderr(&out).contains("old ones stay in use"),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("hint: "), "{}", stderr(&out));
        assert_eq!(state(&d.shop(&name)), "healthy");
        assert_eq!(d.cli(&["shop", "test", &name]).status.code(), Some(0));
        // A malformed file: refused before the daemon is asked.
        let out = d.cli_stdin(
            &["shop", "rotate", &name, "--credentials-file", "-"],
            Some("api_user = 1\n"),
        );
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(d.cli(&["shop", "test", &name]).status.code(), Some(0));
        // Good credentials: accepted.
        let out = d.cli_stdin(
            &["shop", "rotate", &name, "--credentials-file", "-"],
            Some(&p.creds(&sim)),
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

        // An auth_failed shop is healthy as soon as rotate returns.
        let broken = p.name("broken");
        let out = d.add_shop(&broken, p.platform(), &sim.url(), &bad, &["--no-verify"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        wait_state(&d, &broken, "auth_failed");
        let file = d.dir.path().join(format!("{broken}.toml"));
        write_private(&file, &p.creds(&sim));
        let out = d.cli(&[
            "shop",
            "rotate",
            &broken,
            "--credentials-file",
            file.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
        let s = d.shop(&broken);
        assert_eq!(state(&s), "healthy", "{s:#}");
        assert!(s["problem"].is_null(), "{s:#}");
        assert_eq!(d.cli(&["shop", "test", &broken]).status.code(), Some(0));
    }
    // Rotating an unknown shop.
    let file = d.dir.path().join("unknown.toml");
    write_private(&file, &P::M1.creds(&sim));
    let out = d.cli(&[
        "shop",
        "rotate",
        "nosuchshop",
        "--credentials-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nosuchshop"), "{}", stderr(&out));
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

#[test]
fn remove_stops_probing_drops_jobs_and_purge_drops_the_mirror() {
    let d = Daemon::start(&fast(FAST));
    for p in BOTH {
        // One shop per simulator, so the request counter is the shop's.
        let sim = small_sim();
        let name = p.name("rm");
        add_ok(&d, &name, p, &sim.url(), &p.creds(&sim));
        d.wait_shop(&name, "first sync", |s| {
            s["sync"]["last_run"]["outcome"] == "ok"
        });
        let products = |d: &Daemon| {
            let out = d.cli(&["products", &name]);
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            stdout(&out).lines().count()
        };
        assert_eq!(products(&d), 40);
        // Still probing.
        let n = sim.counters().requests;
        let t = Instant::now();
        while sim.counters().requests <= n {
            assert!(t.elapsed() < WAIT, "not probing");
            std::thread::sleep(Duration::from_millis(50));
        }

        let out = d.cli(&["shop", "remove", &name]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(!shop_names(&d).contains(&name));
        let status = d.status();
        assert!(status["shops"].as_array().unwrap().is_empty(), "{status:#}");
        assert_eq!(status["daemon"]["queue_depth"], 0, "jobs left: {status:#}");
        let (code, _) = d.http("GET", &format!("/v1/status?shop={name}"), None);
        assert_eq!(code, 404);
        assert_eq!(d.cli(&["status", &name]).status.code(), Some(1));
        // Let a probe in flight at removal end, then nothing more arrives.
        std::thread::sleep(Duration::from_millis(1000));
        let after = sim.counters().requests;
        std::thread::sleep(Duration::from_millis(2000));
        assert_eq!(
            sim.counters().requests,
            after,
            "still probing a removed shop"
        );

        // Without --purge the mirror stays: a re-added shop (credentials
        // refused, so it cannot sync) still lists it.
        let out = d.add_shop(
            &name,
            p.platform(),
            &sim.url(),
            &p.wrong_key(&sim),
            &["--no-verify"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(products(&d), 40);
        let out = d.cli(&["shop", "remove", &name, "--purge"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stdout(&out).contains("dropped"), "{}", stdout(&out));
        let out = d.add_shop(
            &name,
            p.platform(),
            &sim.url(),
            &p.wrong_key(&sim),
            &["--no-verify"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(products(&d), 0);
        let out = d.cli(&["shop", "remove", &name, "--purge"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let out = d.cli(&["shop", "remove", "nosuchshop"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sigkill_during_a_probe_requeues_the_leased_job() {
    let sim = small_sim();
    // A shop on another simulator that stays fast: its probes complete (and
    // flush the store) every few hundred ms, so the leases of the slow
    // probes are on disk when the daemon is killed.
    let ticker = small_sim();
    let mut d = Daemon::start(&fast(FAST));
    add_ok(&d, "ticker", P::M2, &ticker.url(), &P::M2.creds(&ticker));
    for p in BOTH {
        add_ok(&d, &p.name("kill"), p, &sim.url(), &p.creds(&sim));
        d.wait_shop(&p.name("kill"), "first sync", |s| {
            !s["sync"]["last_run"].is_null()
        });
    }
    sim.set_fault(Fault::Slow(Duration::from_secs(3)));
    let injected = sim.counters().faults_injected;
    let t = Instant::now();
    // Both shops have a probe held by the shop (one request each: the
    // second request of a probe comes 3 s after the first).
    while sim.counters().faults_injected < injected + 2 {
        assert!(t.elapsed() < WAIT, "no probe reached the slow shop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the ticker flush the leases, and make the last_probe stamp (second
    // precision) move by the next probe.
    let ticks = ticker.counters().requests;
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        ticker.counters().requests > ticks + 2,
        "the ticker shop is not probed"
    );
    let before: Vec<Value> = BOTH
        .iter()
        .map(|p| d.shop(&p.name("kill"))["last_probe"].clone())
        .collect();
    d.kill9();
    sim.set_fault(Fault::None);
    let log_before = d.log().len();
    d.restart();
    for (p, last) in BOTH.iter().zip(&before) {
        let s = d.wait_shop(&p.name("kill"), "probed again after restart", |s| {
            &s["last_probe"] != last && state(s) == "healthy"
        });
        assert!(s["problem"].is_null(), "{s:#}");
    }
    let log = d.log()[log_before..].to_string();
    let line = log
        .lines()
        .find(|l| l.contains("requeued jobs"))
        .unwrap_or_else(|| panic!("no requeued jobs in the log:\n{log}"));
    // Both held probes (and perhaps a ticker probe caught in flight).
    let recovered: u64 = line
        .split("recovered=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count: {line}"));
    assert!(recovered >= 2, "{line}");
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
}

/// Every process's argv on this machine, as one string per process.
fn all_argv() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            out.push(String::from_utf8_lossy(&raw).replace('\0', " "));
        }
    }
    out
}

#[test]
fn secrets_never_leak() {
    let creds = SimCredentials {
        consumer_key: "LEAKck0a1b2c3d4e5f6a7b8c9d0e1f2a".into(),
        consumer_secret: "LEAKcs0f1e2d3c4b5a6f7e8d9c0b1a2f".into(),
        access_token: "LEAKat09a8b7c6d5e4f3a2b1c0d9e8f7".into(),
        access_token_secret: "LEAKts1234abcd5678ef90abcd1234ef".into(),
        api_user: "cobbyd_leak".into(),
        api_key: "LEAKak5e4d3c2b1a0f9e8d7c6b5a4f3e".into(),
    };
    // Wrong values are secrets too (an operator's typo of the real key).
    let mut wrong = creds.clone();
    wrong.consumer_secret = "LEAKwrongcs000000000000000000000".into();
    wrong.api_key = "LEAKwrongak000000000000000000000".into();
    wrong.consumer_key = "LEAKwrongck000000000000000000000".into();
    let mut secrets: Vec<String> = vec![
        creds.consumer_key.clone(),
        creds.consumer_secret.clone(),
        creds.access_token.clone(),
        creds.access_token_secret.clone(),
        creds.api_key.clone(),
        wrong.consumer_secret.clone(),
        wrong.api_key.clone(),
        wrong.consumer_key.clone(),
    ];
    let sim = Sim::start_with(SimConfig {
        products: 40,
        credentials: creds.clone(),
        bearer_enabled: true,
        ..Default::default()
    });
    let d = Daemon::start(&fast(FAST));
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut keep = |what: &str, o: &std::process::Output| {
        outputs.push((format!("{what} stdout"), stdout(o)));
        outputs.push((format!("{what} stderr"), stderr(o)));
    };
    let url = sim.url();
    // Adds: good, refused, unverified bad; a slow shop while argv is read.
    sim.set_fault(Fault::Slow(Duration::from_millis(1500)));
    let argv_during_add = std::thread::scope(|s| {
        let h = s.spawn(|| d.add_shop("m2", "magento2", &url, &creds.m2_oauth_toml(), &[]));
        std::thread::sleep(Duration::from_millis(700));
        let argv = all_argv();
        let out = h.join().unwrap();
        (argv, out)
    });
    keep("add m2", &argv_during_add.1);
    assert_eq!(
        argv_during_add.1.status.code(),
        Some(0),
        "{}",
        stderr(&argv_during_add.1)
    );
    assert!(
        argv_during_add.0.iter().any(|a| a.contains("shop add m2")),
        "the CLI was not running"
    );
    sim.set_fault(Fault::None);
    for (what, o) in [
        (
            "add m1",
            d.add_shop("m1", "magento1", &url, &creds.m1_toml(), &[]),
        ),
        (
            "add bearer",
            d.add_shop(
                "bearer",
                "magento2",
                &url,
                &creds.m2_bearer_toml(),
                &["--auth", "bearer"],
            ),
        ),
        (
            "add bad m2",
            d.add_shop("badm2", "magento2", &url, &wrong.m2_oauth_toml(), &[]),
        ),
        (
            "add bad m1",
            d.add_shop("badm1", "magento1", &url, &wrong.m1_toml(), &[]),
        ),
        (
            "add bad m2 nv",
            d.add_shop(
                "badm2",
                "magento2",
                &url,
                &wrong.m2_oauth_toml(),
                &["--no-verify"],
            ),
        ),
        (
            "add bad m1 nv",
            d.add_shop(
                "badm1",
                "magento1",
                &url,
                &wrong.m1_toml(),
                &["--no-verify"],
            ),
        ),
    ] {
        keep(what, &o);
    }
    for n in ["m1", "m2", "bearer"] {
        wait_state(&d, n, "healthy");
    }
    wait_state(&d, "badm1", "auth_failed");
    wait_state(&d, "badm2", "auth_failed");
    // Rotations, good and bad.
    for (what, name, file) in [
        ("rotate m2 bad", "m2", wrong.m2_oauth_toml()),
        ("rotate m1 bad", "m1", wrong.m1_toml()),
        ("rotate m2 good", "m2", creds.m2_oauth_toml()),
        ("rotate m1 good", "m1", creds.m1_toml()),
        ("rotate badm1 good", "badm1", creds.m1_toml()),
    ] {
        let o = d.cli_stdin(
            &["shop", "rotate", name, "--credentials-file", "-"],
            Some(&file),
        );
        keep(what, &o);
    }
    // Failing probes of every kind.
    sim.revoke("Magento_Catalog::products");
    sim.revoke("catalog/product");
    wait_state(&d, "m2", "auth_failed");
    sim.grant("Magento_Catalog::products");
    sim.grant("catalog/product");
    sim.expire_sessions();
    for (f, kinds) in [
        (Fault::Maintenance, &["maintenance"][..]),
        (Fault::Html200, &["not_api", "http_status"]),
        (Fault::Garbage, &["protocol"]),
        (Fault::Down, &["connect", "protocol"]),
    ] {
        sim.set_fault(f);
        for n in ["m1", "m2"] {
            d.wait_shop(n, "a failing probe", |s| kinds.contains(&kind(s)));
        }
        for n in ["m1", "m2", "bearer"] {
            keep("test", &d.cli(&["shop", "test", n]));
        }
        keep("status", &d.cli(&["status"]));
    }
    sim.set_fault(Fault::None);
    wait_state(&d, "m2", "healthy");
    for args in [
        &["shop", "list"][..],
        &["shop", "list", "--json"],
        &["shop", "show", "m2"],
        &["shop", "show", "m2", "--json"],
        &["shop", "show", "m1", "--json"],
        &["shop", "show", "badm2", "--json"],
        &["status"],
        &["status", "--json"],
        &["shop", "test", "m2"],
        &["shop", "test", "badm2"],
        &["shop", "test", "badm2", "--json"],
    ] {
        let o = d.cli(args);
        keep(&args.join(" "), &o);
    }
    for path in [
        "/v1/status",
        "/v1/shops",
        "/v1/shops/m2",
        "/v1/shops/badm2",
        "/metrics",
        "/v1/config",
    ] {
        let (code, body) = d.http("GET", path, None);
        assert_eq!(code, 200, "{path}: {body}");
        outputs.push((path.to_string(), body));
    }
    let (_, body) = d.http("POST", "/v1/shops/badm2/test", Some("{}"));
    outputs.push(("POST test".into(), body));
    outputs.push(("daemon log".into(), d.log()));
    let daemon_proc = format!("/proc/{}", d.pid());
    for f in ["cmdline", "environ"] {
        let raw = std::fs::read(format!("{daemon_proc}/{f}")).unwrap();
        outputs.push((
            format!("daemon {f}"),
            String::from_utf8_lossy(&raw).into_owned(),
        ));
    }
    for (i, argv) in argv_during_add.0.iter().enumerate() {
        outputs.push((format!("argv #{i}"), argv.clone()));
    }
    // The secrets were in use: the shop accepted them.
    assert!(sim.counters().m1_logins > 0);
    secrets.sort();
    for (what, text) in &outputs {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "secret {}… leaked in {what}:\n{text}",
                &s[..8]
            );
        }
    }
    // Redacted forms are there instead (the last four characters).
    let list = d.json("/v1/shops/m2");
    assert_eq!(list["credentials"]["consumer_secret"], "****1a2f");
    assert!(
        d.log().contains("shop added"),
        "log too quiet to mean anything"
    );
}
