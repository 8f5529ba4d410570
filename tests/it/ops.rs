//! Operating against hostile or failing shops: a removal ends the shop's
//! work before it answers, waiting syncs give their slot back, exports
//! survive bad products and neutralise formulas, shop text is escaped,
//! failing syncs make a shop unhealthy, and a slow `shop add` holds back
//! nobody else's.

use crate::harness::*;
use cobbyd::sim::Fault;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` until it holds; panics with `what` after WAIT.
fn wait_for(what: &str, d: &Daemon, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < WAIT,
            "timed out waiting for {what}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn add_m2(d: &Daemon, name: &str, sim: &Sim) {
    let out = d.add_shop(
        name,
        "magento2",
        &sim.url(),
        &sim.credentials().m2_oauth_toml(),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn last_run_id(d: &Daemon, name: &str) -> u64 {
    d.shop(name)["sync"]["last_run"]["run_id"]
        .as_u64()
        .unwrap_or(0)
}

fn start_sync(d: &Daemon, name: &str) {
    let (code, body) = d.http("POST", &format!("/v1/shops/{name}/sync"), Some("{}"));
    assert_eq!(code, 202, "{body}");
}

/// Stops the daemon and runs `check-state` on what it left.
fn stop_and_check(d: &mut Daemon) {
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit();
    let out = d.cli(&["check-state"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-state:\n{}{}\nlog:\n{}",
        stdout(&out),
        stderr(&out),
        d.log()
    );
}

/// A removal while the shop's sync waits, in a stalled request or in a 429
/// backoff: the request in flight is dropped and nothing more reaches the
/// shop once `shop remove --purge` has answered; no run record or mirror
/// is left behind. The removal waits at most 1 s for the sync
/// (`shutdown_timeout`), so on code that only stops between pages it
/// answers while the sync still runs.
#[test]
fn remove_ends_a_waiting_sync_before_it_answers() {
    for (case, fault) in [
        ("429 backoff", Fault::RateLimited { retry_after_s: 3 }),
        ("stalled request", Fault::Slow(Duration::from_secs(6))),
    ] {
        let sim = Sim::start(300);
        let mut d = Daemon::start_with(
            "[probe]\ninterval = \"1h\"\n[sync]\npage_size = 20\n",
            &[("COBBYD__DAEMON__SHUTDOWN_TIMEOUT", "1s")],
        );
        d.add_synced_m2_shop("gone", &sim);
        sim.touch(100);
        sim.set_fault(fault);
        let before = sim.counters().faults_injected;
        start_sync(&d, "gone");
        wait_for(&format!("{case}: the sync meets the fault"), &d, || {
            sim.counters().faults_injected > before
        });
        let out = d.cli(&["shop", "remove", "gone", "--purge"]);
        assert_eq!(out.status.code(), Some(0), "{case}: {}", stderr(&out));
        let sent = sim.counters().requests;
        // Longer than the fault's wait: a sync still going would have sent
        // its next request by then.
        std::thread::sleep(Duration::from_secs(8));
        assert_eq!(
            sim.counters().requests,
            sent,
            "{case}: requests reached the shop after `shop remove` answered\nlog:\n{}",
            d.log()
        );
        stop_and_check(&mut d);
    }
}

/// Four shops whose syncs wait out a `Retry-After` give their sync slots
/// back while they wait: a healthy shop's sync runs and ends meanwhile.
/// A `Retry-After` beyond what a run waits ends the run with a message
/// saying what the daemon does instead.
#[test]
fn waiting_syncs_release_their_slots() {
    let d = Daemon::start("[probe]\ninterval = \"1h\"\n[sync]\nmax_concurrent_syncs = 4\n");
    let sims: Vec<Sim> = (0..5).map(|_| Sim::start(30)).collect();
    for (i, sim) in sims.iter().enumerate() {
        d.add_synced_m2_shop(&format!("s{i}"), sim);
    }
    for (i, sim) in sims.iter().enumerate().take(4) {
        sim.set_fault(Fault::RateLimited { retry_after_s: 20 });
        sim.touch(3);
        start_sync(&d, &format!("s{i}"));
    }
    for i in 0..4 {
        d.wait_shop(&format!("s{i}"), "waiting to retry", |s| {
            s["sync"]["progress"]["waiting"].is_string()
        });
    }
    let before = last_run_id(&d, "s4");
    sims[4].touch(5);
    start_sync(&d, "s4");
    let s4 = d.wait_shop("s4", "the healthy shop's sync ends", |s| {
        s["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0) > before
            && s["sync"]["progress"].is_null()
    });
    assert_eq!(s4["sync"]["last_run"]["outcome"], "ok", "{s4:#}");
    for i in 0..4 {
        let s = d.shop(&format!("s{i}"));
        assert!(
            s["sync"]["progress"].is_object(),
            "s{i} should still be waiting to retry: {s:#}"
        );
    }

    // Absurd: 31 years.
    let sim = Sim::start(30);
    d.add_synced_m2_shop("absurd", &sim);
    sim.set_fault(Fault::RateLimited {
        retry_after_s: 999_999_999,
    });
    sim.touch(3);
    let before = last_run_id(&d, "absurd");
    start_sync(&d, "absurd");
    let s = d.wait_shop("absurd", "the run ends", |s| {
        s["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0) > before
    });
    let msg = s["sync"]["last_run"]["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(s["sync"]["last_run"]["outcome"], "failed", "{s:#}");
    assert!(
        msg.contains("asked to retry after 31 years") && msg.contains("next sync tries in 10m"),
        "{msg}"
    );
    // The next sync is due in about 10 minutes, not in 31 years.
    let next = s["sync"]["next_sync"].as_str().unwrap_or("");
    let next = chrono::DateTime::parse_from_rfc3339(next).expect("next_sync");
    let in_s = (next.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    assert!((300..=660).contains(&in_s), "next sync in {in_s}s");
}

/// A product nested 100,000 levels deep, or with a lone surrogate, does
/// not end a CSV export: every product is exported, the bad ones with
/// their problem in `_export_problem`, named on stderr and in the log.
/// Formula-like cells are neutralised in CSV and exact in JSONL.
#[test]
fn csv_export_survives_bad_products_and_neutralises_formulas() {
    let sim = Sim::start(20);
    let skus = sim.skus();
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let raw = [
        (0, "x_deep", deep.as_str()),
        (1, "x_name", r#""Caf\u00e9 \ud800""#),
        (
            2,
            "x_formula",
            r#""=HYPERLINK(\"http://evil.example\",\"x\")""#,
        ),
        (3, "x_formula", r#""@SUM(1+1)""#),
        (4, "x_formula", r#""+cmd""#),
        (5, "x_formula", r#""\tx""#),
        (6, "x_formula", r#""-12.5""#),
    ];
    for (i, code, value) in raw {
        sim.set_raw_attribute(&skus[i], code, value).unwrap();
    }
    let d = Daemon::start("[probe]\ninterval = \"1h\"\n");
    d.add_synced_m2_shop("acme", &sim);
    let out = d.cli(&["products", "acme", "--format", "csv"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(header.last().map(String::as_str), Some("_export_problem"));
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 20, "{text}");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let row = |sku: &str| rows.iter().find(|r| &r[0] == sku).unwrap().clone();
    let problem = col("_export_problem");
    let deep_row = row(&skus[0]);
    assert!(
        deep_row[problem].contains("nested more than 128 levels deep"),
        "{deep_row:?}"
    );
    let name_row = row(&skus[1]);
    assert_eq!(&name_row[col("x_name")], "Café \u{fffd}");
    assert!(name_row[problem].contains("invalid escape"), "{name_row:?}");
    let f = col("x_formula");
    assert_eq!(
        &row(&skus[2])[f],
        "'=HYPERLINK(\"http://evil.example\",\"x\")"
    );
    assert_eq!(&row(&skus[3])[f], "'@SUM(1+1)");
    assert_eq!(&row(&skus[4])[f], "'+cmd");
    assert_eq!(&row(&skus[5])[f], "'\tx");
    assert_eq!(&row(&skus[6])[f], "-12.5");
    assert_eq!(&row(&skus[7])[problem], "");
    let err = stderr(&out);
    assert!(
        err.contains("2 product(s)") && err.contains(&skus[0]) && err.contains(&skus[1]),
        "{err}"
    );
    assert!(
        d.log().contains("CSV export: 2 product(s)") && d.log().contains(&skus[1]),
        "{}",
        d.log()
    );
    // JSONL is the stored JSON, exactly.
    let out = d.cli(&["products", "acme"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let jsonl = stdout(&out);
    assert!(jsonl.contains(r#""=HYPERLINK(\"http://evil.example\",\"x\")""#));
    assert!(jsonl.contains(r#""Caf\u00e9 \ud800""#));
    assert!(jsonl.contains(&deep));
}

/// Control characters, CR/LF and bidi overrides in a shop's error text
/// are escaped wherever a person sees them (status, shop test, shop add,
/// sync --wait) and in the log; JSON keeps the exact text.
#[test]
fn shop_text_is_escaped_for_people_and_the_log() {
    const NASTY: &str = "Internal Error.\u{1b}[2J\r\nacme  magento2  healthy\u{202e}";
    let raw = |s: &str| s.contains('\u{1b}') || s.contains('\r') || s.contains('\u{202e}');
    let sim = Sim::start(20);
    let d = Daemon::start("[probe]\ninterval = \"1h\"\n");
    d.add_synced_m2_shop("acme", &sim);
    sim.set_fault(Fault::Message {
        message: NASTY.into(),
    });

    let out = d.cli(&["shop", "test", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = stdout(&out);
    assert!(!raw(&shown), "shop test: {shown:?}");
    assert!(
        shown.contains("Internal Error.\\u{1b}[2J\\r\\nacme  magento2  healthy\\u{202e}"),
        "{shown:?}"
    );

    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = stdout(&out) + &stderr(&out);
    assert!(!raw(&shown), "status: {shown:?}");
    assert!(shown.contains("\\u{202e}"), "{shown}");
    // JSON: the exact text.
    let v: Value = serde_json::from_str(&stdout(&d.cli(&["status", "--json"]))).unwrap();
    let message = v["shops"][0]["problem"]["message"].as_str().unwrap();
    assert!(message.contains(NASTY), "{message:?}");

    let out = d.add_shop(
        "other",
        "magento2",
        &sim.url(),
        &sim.credentials().m2_oauth_toml(),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let shown = stdout(&out) + &stderr(&out);
    assert!(!raw(&shown), "shop add: {shown:?}");
    assert!(shown.contains("\\r\\n"), "{shown}");

    let out = d.cli(&["sync", "acme", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let shown = stdout(&out) + &stderr(&out);
    assert!(!raw(&shown), "sync --wait: {shown:?}");
    assert!(shown.contains("\\u{1b}"), "{shown}");

    let log = d.log();
    assert!(!raw(&log), "log: {log:?}");
    // Not split: the forged line is on the line of the message.
    for l in log
        .lines()
        .filter(|l| l.contains("acme  magento2  healthy"))
    {
        assert!(l.contains("Internal Error."), "{l}");
    }
    assert!(log.contains("acme  magento2  healthy"), "{log}");
}

/// A shop whose probes pass but whose syncs fail (an answer over
/// `max_response_mb`) is not healthy: status says so and exits 1, `/health`
/// and the metrics agree.
#[test]
fn a_shop_whose_sync_fails_is_not_healthy() {
    let sim = Sim::start(20);
    let d = Daemon::start("[probe]\ninterval = \"1h\"\n[sync]\nmax_response_mb = 1\n");
    d.add_synced_m2_shop("acme", &sim);
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
    // The highest id: the probe's one-product page is the lowest.
    let items = sim.m2_items("default");
    let last = items
        .iter()
        .max_by_key(|i| i["id"].as_u64())
        .and_then(|i| i["sku"].as_str())
        .unwrap()
        .to_string();
    let big = serde_json::to_string(&"x".repeat(2 * 1024 * 1024)).unwrap();
    sim.set_raw_attribute(&last, "x_big", &big).unwrap();
    sim.touch_skus(std::slice::from_ref(&last));
    let before = last_run_id(&d, "acme");
    start_sync(&d, "acme");
    let s = d.wait_shop("acme", "the sync fails", |s| {
        s["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0) > before
    });
    assert_eq!(s["sync"]["last_run"]["outcome"], "failed", "{s:#}");
    // The probe still passes.
    assert_eq!(d.cli(&["shop", "test", "acme"]).status.code(), Some(0));
    let s = d.shop("acme");
    assert_eq!(s["state"], "healthy");
    assert_eq!(s["healthy"], false, "{s:#}");
    assert!(s["sync"]["problem"]["kind"].is_string(), "{s:#}");

    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("last sync failed"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("not healthy: acme (last sync failed)"),
        "{}",
        stderr(&out)
    );
    let (code, body) = d.http("GET", "/health", None);
    assert_eq!(code, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        h,
        json!({"status": "degraded", "unhealthy_shops": 1, "shops": ["acme"]})
    );
    let (_, metrics) = d.http("GET", "/metrics", None);
    assert!(
        metrics.contains("cobbyd_shop_healthy{shop=\"acme\"} 0")
            && metrics.contains("cobbyd_shop_last_sync_failed{shop=\"acme\"} 1"),
        "{metrics}"
    );
}

/// `shop add` of a shop that does not answer does not hold back the
/// addition of another: probes run outside the admin lock.
#[test]
fn a_slow_shop_add_does_not_block_another() {
    let slow = Sim::start(5);
    slow.set_fault(Fault::Slow(Duration::from_secs(120)));
    let fine = Sim::start(5);
    let d = Daemon::start("[probe]\ninterval = \"1h\"\ntimeout = \"40s\"\n");
    let mut child = Command::new(BIN)
        .args([
            "shop",
            "add",
            "slow",
            "--platform",
            "magento2",
            "--url",
            &slow.url(),
            "--allow-insecure-http",
            "--credentials-file",
            "-",
            "--config",
        ])
        .arg(&d.config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(slow.credentials().m2_oauth_toml().as_bytes())
            .unwrap();
    }
    wait_for("the slow shop's probe arrives", &d, || {
        slow.counters().faults_injected > 0
    });
    add_m2(&d, "fine", &fine);
    let still = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        still,
        "the second `shop add` waited for the first one's probe"
    );
}
