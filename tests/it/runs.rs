//! Sync requests and the runs that answer them, the first sync of a shop,
//! `sync --wait`, and the per-shop request limiter.

use crate::harness::*;
use crate::sync_util::*;
use cobbyd::sim::{Fault, SimConfig};
use std::time::{Duration, Instant};

/// The value of one series in `/metrics` (`None`: absent).
fn metric(d: &Daemon, series: &str) -> Option<f64> {
    let (code, text) = d.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A shop that answers 429 with `Retry-After` halves its request limit
/// (once per episode), which status and the metrics show, and the run
/// still ends `ok` once the shop accepts requests again.
#[test]
fn backpressure_halves_the_shops_request_limit() {
    let sim = Sim::start_with(SimConfig {
        products: 300,
        ..Default::default()
    });
    let d = daemon("shop_concurrency = 4\nm1_batch_size = 10\n");
    let first = add(&d, &sim, "acme", P::M1, &[]);
    assert_eq!(
        first["sync"]["concurrency"]["max"], 4,
        "{:#}",
        first["sync"]
    );
    assert_eq!(first["sync"]["concurrency"]["decreases_total"], 0);
    sim.set_fault(Fault::RateLimited { retry_after_s: 1 });
    let before = start_sync(&d, "acme", true);
    let t = Instant::now();
    while sim.counters().faults_injected == 0 {
        assert!(t.elapsed() < WAIT, "the sync never met the 429");
        std::thread::sleep(Duration::from_millis(10));
    }
    sim.set_fault(Fault::None);
    let s = wait_idle_after(&d, "acme", before);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{:#}", s["sync"]);
    let c = &s["sync"]["concurrency"];
    assert!(
        c["decreases_total"].as_u64().unwrap_or(0) >= 1
            && c["backpressure_total"].as_u64().unwrap_or(0) >= 1,
        "{c:#}"
    );
    assert!(c["limit"].as_u64().unwrap_or(0) >= 1);
    assert!(
        metric(&d, "cobbyd_shop_backpressure_total{shop=\"acme\"}").unwrap_or(0.0) >= 1.0,
        "no backpressure in the metrics"
    );
    let limit = metric(&d, "cobbyd_shop_concurrency_limit{shop=\"acme\"}");
    assert!(limit.is_some_and(|l| (1.0..=4.0).contains(&l)), "{limit:?}");
}

/// A daemon whose scheduled syncs never fire during a test, with small
/// pages so a run of a few hundred products takes several requests.
fn quiet_daemon() -> Daemon {
    daemon("page_size = 20\nm1_batch_size = 10\n")
}

fn sim(products: usize) -> Sim {
    Sim::start_with(SimConfig {
        products,
        ..Default::default()
    })
}

/// Starts a CLI command in the background (output to files, so that a
/// child that hangs never blocks on a pipe).
struct Bg {
    child: std::process::Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

fn spawn_cli(d: &Daemon, tag: &str, args: &[&str]) -> Bg {
    let out = d.dir.path().join(format!("{tag}.out"));
    let err = d.dir.path().join(format!("{tag}.err"));
    let child = std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    Bg { child, out, err }
}

impl Bg {
    /// Waits (bounded by [`WAIT`]) for the exit; returns (code, stdout, stderr).
    fn finish(mut self, d: &Daemon, what: &str) -> (Option<i32>, String, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > WAIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{what} did not end within {WAIT:?}\nstderr:\n{}\nstatus: {:#}\nlog tail:\n{}",
                    std::fs::read_to_string(&self.err).unwrap_or_default(),
                    d.json("/v1/status"),
                    tail(d, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status.code(),
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default(),
        )
    }
}

/// "(run 12)" in a `sync --wait` summary.
fn run_of_summary(out: &str) -> u64 {
    out.split("(run ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {out:?}"))
}

/// The issue's repro: `sync acme --full --wait &`, then `sync acme` 50 ms
/// later. The incremental run ends after the full one; the wait follows
/// the full run that answers its request and returns with it (before,
/// it waited for "the last run" to be a full one, forever).
#[test]
fn full_wait_returns_with_its_run_when_an_incremental_run_ends_after_it() {
    let sim = sim(400);
    let d = quiet_daemon();
    add(&d, &sim, "acme", P::M2, &[]);
    // Every answer 30 ms late: the full run takes a while, and so does the
    // incremental run after it.
    sim.set_fault(Fault::Slow(Duration::from_millis(30)));
    let wait = spawn_cli(&d, "full-wait", &["sync", "acme", "--full", "--wait"]);
    std::thread::sleep(Duration::from_millis(50));
    let out = d.cli(&["sync", "acme"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, stdout, stderr) = wait.finish(&d, "`sync acme --full --wait`");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("full_sync ok (run "), "{stdout}");
    let run = run_of_summary(&stdout);
    let runs = runs(&d, "acme");
    let full = runs
        .iter()
        .find(|r| r["run_id"] == run)
        .unwrap_or_else(|| panic!("run {run} not recorded: {runs:#?}"));
    assert_eq!(full["kind"], "full_sync", "{full:#}");
    // The incremental request is answered by a run of its own, after.
    let s = wait_idle_after(&d, "acme", run);
    assert_eq!(s["sync"]["last_run"]["kind"], "sync", "{:#}", s["sync"]);
    assert!(
        !s["sync"]["last_run"]["sync_requests"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// The control API: the POST answers 202 with a request id; the request,
/// the run answering it and the runs list say where it stands.
#[test]
fn a_sync_request_is_followed_through_the_api() {
    let sim = sim(100);
    let d = quiet_daemon();
    add(&d, &sim, "acme", P::M2, &[]);
    let (code, body) = d.http("POST", "/v1/shops/acme/sync", Some(r#"{"full":true}"#));
    assert_eq!(code, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["request_id"].as_u64().expect("a request id");
    assert_eq!(v["kind"], "full_sync");
    assert_eq!(v["request_url"], format!("/v1/shops/acme/requests/{id}"));
    let t = Instant::now();
    let done = loop {
        let r = d.json(&format!("/v1/shops/acme/requests/{id}"));
        assert_eq!(r["request_id"], id, "{r:#}");
        match r["state"].as_str() {
            Some("done") => break r,
            Some("queued" | "running") => {}
            other => panic!("state {other:?}: {r:#}"),
        }
        assert!(t.elapsed() < WAIT, "request {id} never done: {r:#}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(done["outcome"], "ok", "{done:#}");
    assert_eq!(done["run"]["kind"], "full_sync");
    let run_id = done["run_id"].as_u64().unwrap();
    assert_eq!(done["run"]["sync_requests"], serde_json::json!([id]));
    // The same through the runs routes.
    let by_query = d.json(&format!("/v1/shops/acme/runs?request={id}"));
    assert_eq!(by_query["run_id"], run_id, "{by_query:#}");
    let run = d.json(&format!("/v1/shops/acme/runs/{run_id}"));
    assert_eq!(run["state"], "done");
    assert_eq!(run["run"]["sync_requests"], serde_json::json!([id]));
    // Unknown ids are a 404 that says why.
    let (code, body) = d.http("GET", "/v1/shops/acme/requests/999999", None);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no sync request 999999"), "{body}");
    let (code, _) = d.http("GET", "/v1/shops/acme/runs/999999", None);
    assert_eq!(code, 404);
    // Ids are never reused, also after a restart.
    let mut d = d;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit();
    d.restart();
    let after = d.json(&format!("/v1/shops/acme/requests/{id}"));
    assert_eq!(
        after["state"], "done",
        "found through the run record: {after:#}"
    );
    let (code, body) = d.http("POST", "/v1/shops/acme/sync", Some("{}"));
    assert_eq!(code, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["request_id"].as_u64().unwrap() > id, "{v:#}");
}

/// `sync --wait` right after `shop add` reports the shop's first sync
/// (the whole catalog), not a small run after it.
#[test]
fn wait_right_after_add_reports_the_first_sync() {
    let sim = sim(300);
    sim.set_fault(Fault::Slow(Duration::from_millis(20)));
    let d = quiet_daemon();
    let out = d.add_shop("acme", "magento2", &sim.url(), &P::M2.creds(&sim), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli_bounded(&d, &["sync", "acme", "--wait"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    // The whole catalog, not the follow-up run's "1 fetched".
    assert!(
        text.contains("300 fetched") || text.contains("301 fetched"),
        "{text}"
    );
    let run = run_of_summary(&text);
    let runs = runs(&d, "acme");
    let first = runs
        .iter()
        .filter_map(|r| r["run_id"].as_u64())
        .min()
        .unwrap();
    assert_eq!(
        run, first,
        "the wait reported another run than the first sync: {text}\n{runs:#?}"
    );
}

/// A shop added with `--no-verify` is synced as soon as its first probe
/// finds it reachable, not a `sync.interval` (here a day) later.
#[test]
fn first_sync_after_no_verify_starts_when_the_shop_answers() {
    let sim = sim(50);
    let d = daemon("");
    let out = d.add_shop(
        "acme",
        "magento2",
        &sim.url(),
        &P::M2.creds(&sim),
        &["--no-verify"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = wait_idle_after(&d, "acme", 0);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{:#}", s["sync"]);
    assert_eq!(s["sync"]["products"], 50);
}

/// The same across a restart: a never-synced shop that could not be
/// reached before the restart starts its first sync when it answers.
#[test]
fn first_sync_after_a_restart_starts_when_the_shop_answers() {
    let sim = sim(50);
    sim.set_fault(Fault::Down);
    let mut d = Daemon::start(
        "[probe]\ninterval = \"1h\"\nbackoff_initial = \"1s\"\nbackoff_max = \"2s\"\n\n[sync]\ninterval = \"24h\"\nfull_interval = \"240h\"\n",
    );
    let out = d.add_shop(
        "acme",
        "magento2",
        &sim.url(),
        &P::M2.creds(&sim),
        &["--no-verify"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_shop("acme", "the first probe to fail", |s| {
        s["state"] == "degraded" || s["state"] == "down"
    });
    d.kill9();
    sim.set_fault(Fault::None);
    d.restart();
    let s = wait_idle_after(&d, "acme", 0);
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok", "{:#}", s["sync"]);
    assert_eq!(s["sync"]["products"], 50);
}

/// Not on a terminal, `sync --wait` prints plain progress lines (products
/// done/total, rate) and the summary; no bar, no control characters.
#[test]
fn wait_prints_plain_progress_lines_when_not_a_terminal() {
    let sim = sim(400);
    let d = quiet_daemon();
    add(&d, &sim, "acme", P::M2, &[]);
    sim.set_fault(Fault::Slow(Duration::from_millis(40)));
    let out = cli_bounded(&d, &["sync", "acme", "--full", "--wait"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{}{err}", stdout(&out));
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("acme: run ") && l.contains(" products") && l.contains("/s"))
        .collect();
    assert!(!progress.is_empty(), "no progress line in:\n{err}");
    assert!(
        stdout(&out).contains("full_sync ok (run "),
        "{}",
        stdout(&out)
    );
}

/// Ctrl-C on `sync --wait` stops the client only, and says so; the run
/// goes on in the daemon and ends.
#[test]
fn ctrl_c_on_wait_leaves_the_sync_running() {
    let sim = sim(400);
    let d = quiet_daemon();
    add(&d, &sim, "acme", P::M2, &[]);
    sim.set_fault(Fault::Slow(Duration::from_millis(40)));
    let before = run_id(&d.shop("acme"));
    let wait = spawn_cli(&d, "ctrl-c", &["sync", "acme", "--full", "--wait"]);
    assert!(
        wait_running(&d, "acme", before),
        "the run ended before Ctrl-C"
    );
    // Let the client see the run at least once.
    std::thread::sleep(Duration::from_millis(400));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wait.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let (code, _, err) = wait.finish(&d, "`sync --wait` after Ctrl-C");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("the sync goes on in the daemon"), "{err}");
    let s = wait_idle_after(&d, "acme", before);
    assert_eq!(s["sync"]["last_run"]["kind"], "full_sync");
    assert_eq!(s["sync"]["last_run"]["outcome"], "ok");
}
