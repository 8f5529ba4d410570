//! Helpers of the product synchronisation tests: a daemon with sync
//! settings, a shop added and first synced, exports parsed, and mirror vs
//! catalog comparisons that say what differs.

#![allow(dead_code)]

use crate::harness::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// Storage and connection-pool chatter, left out of failure messages.
const NOISE: [&str; 9] = [
    "mark_interval",
    "wrote lsns",
    "advancing offset",
    "make_stable",
    "new highest interval",
    "idle connection",
    "starting new connection",
    "connecting to",
    "connected to",
];

/// The last `n` lines of the daemon's log (storage chatter left out), for
/// failure messages.
pub fn tail(d: &Daemon, n: usize) -> String {
    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !NOISE.iter().any(|x| l.contains(x)))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A daemon whose probes stay out of the way (one at `shop add`, then
/// rarely) and whose scheduled syncs never fire by themselves: every sync
/// in these tests is one the test asked for (or the first one after `shop
/// add`). `sync` holds extra `[sync]` keys.
pub fn daemon(sync: &str) -> Daemon {
    Daemon::start(&format!(
        "[probe]\ninterval = \"1h\"\n\n[sync]\ninterval = \"24h\"\nfull_interval = \"240h\"\n{sync}\n"
    ))
}

/// `magento1` or `magento2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum P {
    M1,
    M2,
}

impl P {
    pub fn platform(self) -> &'static str {
        match self {
            P::M1 => "magento1",
            P::M2 => "magento2",
        }
    }

    /// The catalog as the API returns it, sorted by SKU.
    pub fn items(self, sim: &Sim, store: &str) -> Vec<Value> {
        match self {
            P::M1 => sim.m1_items(store),
            P::M2 => sim.m2_items(store),
        }
    }

    pub fn creds(self, sim: &Sim) -> String {
        match self {
            P::M1 => sim.credentials().m1_toml(),
            P::M2 => sim.credentials().m2_oauth_toml(),
        }
    }
}

/// Adds a shop (verified) and waits for its first sync to end.
pub fn add(d: &Daemon, sim: &Sim, name: &str, p: P, extra: &[&str]) -> Value {
    let out = d.add_shop(name, p.platform(), &sim.url(), &p.creds(sim), extra);
    assert!(
        out.status.success(),
        "shop add {name} failed: {}{}\nlog:\n{}",
        stdout(&out),
        stderr(&out),
        tail(d, 60)
    );
    wait_idle_after(d, name, 0)
}

/// Waits until a run newer than `after` ended and the shop's sync is idle;
/// returns the shop status.
pub fn wait_idle_after(d: &Daemon, name: &str, after: u64) -> Value {
    wait_idle_after_for(d, name, after, WAIT)
}

pub fn wait_idle_after_for(d: &Daemon, name: &str, after: u64, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let s = d.shop(name);
        let sync = &s["sync"];
        if sync["state"] == "idle" && sync["progress"].is_null() && run_id(&s) > after {
            return s;
        }
        assert!(
            t.elapsed() < limit,
            "timed out waiting for a sync of {name} newer than run {after} to end\nlast status: {s:#}\nlog tail:\n{}",
            tail(d, 80)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The id of the last finished run (0: none).
pub fn run_id(shop: &Value) -> u64 {
    shop["sync"]["last_run"]["run_id"].as_u64().unwrap_or(0)
}

/// `cobbyd sync NAME [--full] --wait`; asserts it succeeds and returns the
/// last run as status shows it afterwards.
pub fn sync_wait(d: &Daemon, name: &str, full: bool) -> Value {
    let mut args = vec!["sync", name, "--wait"];
    if full {
        args.push("--full");
    }
    let out = cli_bounded(d, &args);
    assert!(
        out.status.success(),
        "`cobbyd {}` failed ({:?}):\n{}{}\nstatus: {:#}\nlog tail:\n{}",
        args.join(" "),
        out.status.code(),
        stdout(&out),
        stderr(&out),
        d.shop(name),
        tail(d, 80)
    );
    let s = d.shop(name);
    assert_eq!(
        s["sync"]["last_run"]["outcome"],
        "ok",
        "{s:#}\nlog tail:\n{}",
        tail(d, 60)
    );
    s["sync"]["last_run"].clone()
}

/// Runs the CLI like [`Daemon::cli`], but kills it and fails the test
/// (with the daemon's log) if it has not ended within [`WAIT`]: `sync
/// --wait` that never returns is a defect to report, not to hang on.
pub fn cli_bounded(d: &Daemon, args: &[&str]) -> std::process::Output {
    use std::io::Read;
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes on threads so that a chatty child never blocks.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
            panic!(
                "`cobbyd {}` did not end within {WAIT:?}\nits stderr:\n{err}\nlog tail:\n{}",
                args.join(" "),
                tail(d, 80)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// `cobbyd products NAME [--store-code C]` parsed, one value per line.
pub fn export(d: &Daemon, name: &str, store: Option<&str>) -> Vec<Value> {
    let mut args = vec!["products", name];
    if let Some(s) = store {
        args.extend(["--store-code", s]);
    }
    let out = d.cli(&args);
    assert!(
        out.status.success(),
        "`cobbyd {}` failed: {}\nlog tail:\n{}",
        args.join(" "),
        stderr(&out),
        tail(d, 40)
    );
    let text = stdout(&out);
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("export line {} is not JSON ({e}): {:.300}", i + 1, l))
        })
        .collect()
}

/// `cobbyd products NAME --format csv [--store-code C]`, raw.
pub fn export_csv(d: &Daemon, name: &str, store: Option<&str>) -> String {
    let mut args = vec!["products", name, "--format", "csv"];
    if let Some(s) = store {
        args.extend(["--store-code", s]);
    }
    let out = d.cli(&args);
    assert!(
        out.status.success(),
        "csv export failed: {}\nlog tail:\n{}",
        stderr(&out),
        tail(d, 40)
    );
    stdout(&out)
}

pub fn sku(v: &Value) -> String {
    v["sku"]
        .as_str()
        .unwrap_or_else(|| panic!("item without sku: {v:.200}"))
        .to_string()
}

/// Asserts that an export is exactly the expected catalog: as many lines
/// as products, no SKU twice, every product equal field by field.
pub fn assert_same(what: &str, got: &[Value], want: &[Value]) {
    let mut seen = HashSet::new();
    let dups: Vec<String> = got
        .iter()
        .map(sku)
        .filter(|s| !seen.insert(s.clone()))
        .collect();
    let got_by: BTreeMap<String, &Value> = got.iter().map(|v| (sku(v), v)).collect();
    let want_by: BTreeMap<String, &Value> = want.iter().map(|v| (sku(v), v)).collect();
    let missing: Vec<&String> = want_by
        .keys()
        .filter(|k| !got_by.contains_key(*k))
        .collect();
    let extra: Vec<&String> = got_by
        .keys()
        .filter(|k| !want_by.contains_key(*k))
        .collect();
    let mut differ = Vec::new();
    for (k, w) in &want_by {
        if let Some(g) = got_by.get(k)
            && g != w
        {
            differ.push(k.clone());
        }
    }
    if dups.is_empty()
        && missing.is_empty()
        && extra.is_empty()
        && differ.is_empty()
        && got.len() == want.len()
    {
        return;
    }
    let mut msg = format!(
        "{what}: mirror differs from the catalog: {} lines for {} products; {} duplicated, {} missing, {} extra, {} different\n",
        got.len(),
        want.len(),
        dups.len(),
        missing.len(),
        extra.len(),
        differ.len()
    );
    msg += &format!(
        "duplicated: {:?}\nmissing: {:?}\nextra: {:?}\n",
        first(&dups),
        first(&missing),
        first(&extra)
    );
    for k in differ.iter().take(3) {
        let (g, w) = (got_by[k], want_by[k]);
        msg += &format!("{k}: fields differing:");
        if let (Some(go), Some(wo)) = (g.as_object(), w.as_object()) {
            for f in go
                .keys()
                .chain(wo.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                if go.get(f) != wo.get(f) {
                    msg += &format!(
                        "\n  {f}: mirror {:.200} / shop {:.200}",
                        fmt(go.get(f)),
                        fmt(wo.get(f))
                    );
                }
            }
        }
        msg.push('\n');
    }
    panic!("{msg}");
}

fn fmt(v: Option<&Value>) -> String {
    v.map_or("(absent)".to_string(), Value::to_string)
}

fn first<T: std::fmt::Debug>(v: &[T]) -> String {
    let shown: Vec<&T> = v.iter().take(5).collect();
    if v.len() > 5 {
        format!("{shown:?} and {} more", v.len() - 5)
    } else {
        format!("{shown:?}")
    }
}

/// Asserts the export of `store` equals the simulator's catalog.
pub fn assert_mirror(d: &Daemon, sim: &Sim, name: &str, p: P, store: Option<&str>) {
    let got = export(d, name, store);
    let want = p.items(sim, store.unwrap_or("default"));
    assert_same(
        &format!("{name} ({:?}, store {})", p, store.unwrap_or("default")),
        &got,
        &want,
    );
}

/// Every SKU of an export, with a check that none repeats.
pub fn unique_skus(got: &[Value]) -> HashSet<String> {
    let set: HashSet<String> = got.iter().map(sku).collect();
    assert_eq!(set.len(), got.len(), "duplicate SKUs in the export");
    set
}

/// The shop's runs, oldest first.
pub fn runs(d: &Daemon, name: &str) -> Vec<Value> {
    d.json(&format!("/v1/shops/{name}/runs"))["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A small deterministic pseudo-random generator (no dependency).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A seed from the clock, printed so that a failing run can be repeated
/// with `COBBYD_TEST_SEED`.
pub fn seed(what: &str) -> u64 {
    let s = std::env::var("COBBYD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{what}: seed {s} (COBBYD_TEST_SEED={s} repeats it)");
    s
}

/// `cobbyd sync NAME [--full]` without waiting; returns the id of the last
/// finished run before it.
pub fn start_sync(d: &Daemon, name: &str, full: bool) -> u64 {
    let before = run_id(&d.shop(name));
    let mut args = vec!["sync", name];
    if full {
        args.push("--full");
    }
    let out = d.cli(&args);
    assert!(
        out.status.success(),
        "`cobbyd {}`: {}{}\nlog tail:\n{}",
        args.join(" "),
        stdout(&out),
        stderr(&out),
        tail(d, 40)
    );
    before
}

/// Every exported line is one version of the product, old or new: a sync
/// that stopped half way left whole products, never pieces. Returns how
/// many lines are the new version.
pub fn assert_old_or_new(what: &str, got: &[Value], old: &[Value], new: &[Value]) -> usize {
    let old_by: BTreeMap<String, &Value> = old.iter().map(|v| (sku(v), v)).collect();
    let new_by: BTreeMap<String, &Value> = new.iter().map(|v| (sku(v), v)).collect();
    unique_skus(got);
    let mut fresh = 0;
    for v in got {
        let k = sku(v);
        let is_new = new_by.get(&k) == Some(&v);
        let is_old = old_by.get(&k) == Some(&v);
        assert!(
            is_new || is_old,
            "{what}: {k} is neither the old nor the new product: {v:.300}"
        );
        if is_new && !is_old {
            fresh += 1;
        }
    }
    fresh
}

/// Seconds from now until an RFC 3339 time in status (`None`: absent).
pub fn secs_until(v: &Value) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    Some((t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds())
}

/// Waits until nothing about the shop's sync is pending: no run going, no
/// checkpoint of an unfinished run, no sync job due soon. Returns the status.
pub fn wait_settled(d: &Daemon, name: &str) -> Value {
    let t = Instant::now();
    loop {
        let s = d.shop(name);
        let sync = &s["sync"];
        let resumable = sync["stores"]
            .as_object()
            .is_some_and(|m| m.values().any(|c| c["resumable"] == true));
        let later = |k: &str| secs_until(&sync[k]).is_some_and(|x| x > 60);
        if sync["state"] == "idle"
            && sync["progress"].is_null()
            && !resumable
            && later("next_sync")
            && later("next_full_sync")
        {
            return s;
        }
        assert!(
            t.elapsed() < WAIT,
            "{name} did not settle\nlast status: {s:#}\nlog tail:\n{}",
            tail(d, 80)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until a run is going (`progress` set) or a run newer than `after`
/// ended; returns whether a run was seen going.
pub fn wait_running(d: &Daemon, name: &str, after: u64) -> bool {
    let t = Instant::now();
    loop {
        let s = d.shop(name);
        if !s["sync"]["progress"].is_null() {
            return true;
        }
        if run_id(&s) > after {
            return false;
        }
        assert!(
            t.elapsed() < WAIT,
            "no sync of {name} started\nlast status: {s:#}\nlog tail:\n{}",
            tail(d, 80)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A full reconcile, waited for until a `full_sync` run newer than the
/// ones known ended (`sync --wait` may return for another run that was
/// already due); asserts it succeeded and returns it.
pub fn full_sync(d: &Daemon, name: &str) -> Value {
    let before = runs(d, name)
        .iter()
        .filter_map(|r| r["run_id"].as_u64())
        .max()
        .unwrap_or(0);
    let _ = sync_wait_any(d, name, true);
    let t = Instant::now();
    loop {
        if let Some(r) = runs(d, name)
            .into_iter()
            .find(|r| r["kind"] == "full_sync" && r["run_id"].as_u64().unwrap_or(0) > before)
        {
            assert_eq!(r["outcome"], "ok", "{r:#}\nlog tail:\n{}", tail(d, 60));
            wait_idle_after(d, name, 0);
            return r;
        }
        assert!(
            t.elapsed() < WAIT,
            "no full sync of {name} ended\nstatus: {:#}\nlog tail:\n{}",
            d.shop(name),
            tail(d, 80)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cobbyd sync NAME [--full] --wait`, whatever the outcome.
pub fn sync_wait_any(d: &Daemon, name: &str, full: bool) -> std::process::Output {
    let mut args = vec!["sync", name, "--wait"];
    if full {
        args.push("--full");
    }
    cli_bounded(d, &args)
}
