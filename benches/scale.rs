//! Scale benchmark: many shops on one daemon (issue 6, "Scale").
//!
//! `cargo bench --bench scale -- [--shops N] [--sims K] [--interval S] [--rounds R] [--json]`
//!
//! 1. Starts K simulators in-process (default 4, a few products each); each
//!    serves both APIs, so shops alternate between Magento 2 (OAuth) and
//!    Magento 1 over the simulators.
//! 2. Starts the real daemon (release binary) with `probe.interval = S`
//!    (default 30 s) and registers N shops (default 1,000) with `cobbyd shop
//!    add`, four at a time, each probed on the way in, as an operator would.
//!    Waits until every shop is healthy and its first sync has finished.
//! 3. Waits one interval (steady state), then watches R probe intervals
//!    (default 2): every 100 ms it reads the
//!    simulators' probe counters (M2 `GET /V1/store/storeConfigs`, M1
//!    `core_magento.info`), so it sees how many probes start in each second;
//!    meanwhile, on another thread, twice a second it times `cobbyd status --json` (the CLI, process start
//!    included) and a raw `GET /v1/status` over the socket.
//! 4. Reports probes per second, the busiest second's share of the shops,
//!    status latency, peak RSS (VmHWM), RSS and CPU use while watching.
//!
//! Exits non-zero when something fails (a shop that does not get healthy, a
//! status call that errs, the daemon dying). Nothing is asserted about time.

#[path = "../tests/it/harness.rs"]
mod harness;
mod support;

use anyhow::{Context, Result, bail};
use cobbyd::sim::{SimConfig, SimHandle};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{Daemon, http_unix, median_ms, mib, percentile_ms, proc_cpu_s, proc_kib};

const USAGE: &str = "usage: cargo bench --bench scale -- [--shops N] [--sims K] [--interval S] [--rounds R] [--json]
  --shops N      shops to register (default 1000)
  --sims K       simulator instances they are spread over (default 4)
  --interval S   probe interval in seconds (default 30)
  --rounds R     probe intervals to watch (default 2)
  --json         print one JSON object on stdout (the readable report goes to stderr)";

const M2_PROBE: &str = "GET /V1/store/storeConfigs";
const M1_PROBE: &str = "xmlrpc call core_magento.info";
/// Products per simulated shop: small, this is about many shops.
const PRODUCTS: usize = 20;
/// How long every shop may take to be healthy and synced after the adds.
const SETTLE_S: u64 = 120;

struct Args {
    shops: usize,
    sims: usize,
    interval_s: u64,
    rounds: u64,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        shops: 1000,
        sims: 4,
        interval_s: 30,
        rounds: 2,
        json: false,
    };
    support::each_arg(USAGE, |name, value| {
        let mut number = || -> Result<u64> {
            let v = value()?;
            let n: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("{name}: not a whole number: {v:?}\n{USAGE}"))?;
            if n == 0 {
                bail!("{name} must be at least 1\n{USAGE}");
            }
            Ok(n)
        };
        match name {
            "--shops" => a.shops = number()? as usize,
            "--sims" => a.sims = number()? as usize,
            "--interval" => a.interval_s = number()?,
            "--rounds" => a.rounds = number()?,
            "--json" => a.json = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(a)
}

/// Probes the simulators have answered so far.
fn probes_so_far(sims: &[SimHandle]) -> u64 {
    sims.iter()
        .map(|s| {
            let c = s.counters();
            c.by_route.get(M2_PROBE).copied().unwrap_or(0)
                + c.by_route.get(M1_PROBE).copied().unwrap_or(0)
        })
        .sum()
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn run(args: &Args) -> Result<Value> {
    let say = |s: String| {
        if args.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    };
    say(format!(
        "cobbyd scale benchmark: {} shops over {} simulators, probe interval {} s, watching {} intervals",
        args.shops, args.sims, args.interval_s, args.rounds
    ));

    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim")
        .enable_all()
        .build()?;
    let sims: Vec<SimHandle> = (0..args.sims)
        .map(|_| {
            sim_rt.block_on(SimHandle::start(SimConfig {
                products: PRODUCTS,
                ..SimConfig::default()
            }))
        })
        .collect::<Result<_, _>>()?;

    let mut d = Daemon::start(&format!(
        "[probe]\ninterval = \"{}s\"\n\n[sync]\ninterval = \"6h\"\n",
        args.interval_s
    ))?;
    let pid = d.pid();
    let idle_rss_kib = proc_kib(pid, "VmRSS")?;

    // Register, four CLI processes at a time.
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.shops {
                        return;
                    }
                    let sim = &sims[i % sims.len()];
                    let name = format!("shop-{i:04}");
                    let (platform, creds) = if i % 2 == 0 {
                        ("magento2", sim.credentials().m2_oauth_toml())
                    } else {
                        ("magento1", sim.credentials().m1_toml())
                    };
                    let url = sim.url();
                    let out = d.cli(
                        &[
                            "shop",
                            "add",
                            &name,
                            "--platform",
                            platform,
                            "--url",
                            &url,
                            "--credentials-file",
                            "-",
                            // The simulators speak plain http on loopback.
                            "--allow-insecure-http",
                        ],
                        Some(&creds),
                    );
                    let problem = match out {
                        Ok(o) if o.status.success() => continue,
                        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                        Err(e) => e.to_string(),
                    };
                    if let Ok(mut f) = failures.lock() {
                        f.push(format!("{name}: {problem}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    if !failures.is_empty() {
        bail!(
            "{} shops could not be added, first: {}",
            failures.len(),
            failures[0]
        );
    }
    let register_s = t.elapsed().as_secs_f64();
    say(format!(
        "registered    {} shops in {register_s:.1} s ({:.0} shops/s, each probed on the way in)",
        args.shops,
        args.shops as f64 / register_s
    ));

    // Every shop healthy, every first sync done.
    let t = Instant::now();
    loop {
        d.check_alive()?;
        let (code, body) = http_unix(&d.socket, "GET", "/v1/status")?;
        if code != 200 {
            bail!("GET /v1/status: {code}");
        }
        let v: Value = serde_json::from_str(&body).context("status JSON")?;
        let shops = v["shops"].as_array().cloned().unwrap_or_default();
        let ready = shops
            .iter()
            .filter(|s| s["state"] == "healthy" && s["sync"]["last_run"]["outcome"] == "ok")
            .count();
        if ready == args.shops {
            break;
        }
        if t.elapsed() > Duration::from_secs(SETTLE_S) {
            let stuck: Vec<String> = shops
                .iter()
                .filter(|s| !(s["state"] == "healthy" && s["sync"]["last_run"]["outcome"] == "ok"))
                .take(3)
                .map(|s| s.to_string())
                .collect();
            bail!(
                "only {ready} of {} shops healthy and synced after {SETTLE_S} s; for example:\n{}\n{}",
                args.shops,
                stuck.join("\n"),
                d.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let settle_s = t.elapsed().as_secs_f64();
    let after_setup_rss_kib = proc_kib(pid, "VmRSS")?;
    say(format!(
        "first syncs   done {settle_s:.1} s after the last add; RSS {:.1} MiB",
        after_setup_rss_kib as f64 / 1024.0
    ));

    // Watch, after one interval: every shop has been probed once since it
    // was added, so the schedule is in its steady state.
    std::thread::sleep(Duration::from_secs(args.interval_s));
    let window = Duration::from_secs(args.interval_s * args.rounds);
    let cpu_before = proc_cpu_s(pid)?;
    let start = Instant::now();
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last = probes_so_far(&sims);
    let first_probes = last;
    // Status is timed on its own thread so that the counter sampling keeps
    // its 100 ms rhythm.
    type Timings = (Vec<f64>, Vec<f64>, Vec<f64>);
    let timed = std::thread::scope(|scope| -> Result<Timings> {
        let d = &d;
        let status = scope.spawn(move || -> Result<Timings> {
            let (mut cli_ms, mut raw_ms, mut one_ms) = (Vec::new(), Vec::new(), Vec::new());
            while start.elapsed() < window {
                let t = Instant::now();
                let out = d.cli(&["status", "--json"], None)?;
                if !out.status.success() && out.status.code() != Some(1) {
                    bail!(
                        "cobbyd status failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                cli_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                let (code, _) = http_unix(&d.socket, "GET", "/v1/status")?;
                if code != 200 {
                    bail!("GET /v1/status: {code}");
                }
                raw_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                let t = Instant::now();
                let out = d.cli(&["status", "shop-0001"], None)?;
                if !out.status.success() {
                    bail!(
                        "cobbyd status shop-0001 failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                one_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok((cli_ms, raw_ms, one_ms))
        });
        while start.elapsed() < window {
            std::thread::sleep(Duration::from_millis(100));
            let now = probes_so_far(&sims);
            *per_second.entry(unix_s(SystemTime::now())).or_default() += now - last;
            last = now;
        }
        status
            .join()
            .map_err(|_| anyhow::anyhow!("the status thread panicked"))?
    });
    let (cli_ms, raw_ms, one_ms) = timed?;
    d.check_alive()?;
    let watched_s = start.elapsed().as_secs_f64();
    let cpu_s = proc_cpu_s(pid)? - cpu_before;
    let probes = last - first_probes;
    // The first and last seconds are partial.
    let full: Vec<u64> = {
        let v: Vec<u64> = per_second.values().copied().collect();
        if v.len() > 2 {
            v[1..v.len() - 1].to_vec()
        } else {
            v
        }
    };
    let busiest = full.iter().copied().max().unwrap_or(0);
    let quietest = full.iter().copied().min().unwrap_or(0);
    let even = args.shops as f64 / args.interval_s as f64;
    let hwm_kib = proc_kib(pid, "VmHWM")?;
    let rss_kib = proc_kib(pid, "VmRSS")?;
    let state = support::dir_size(&d.state_dir)?;
    d.stop();

    let rate = probes as f64 / watched_s;
    let busiest_pct = 100.0 * busiest as f64 / args.shops as f64;
    say(format!(
        "probes        {probes} in {watched_s:.0} s = {rate:.1}/s (evenly spread would be {even:.1}/s)"
    ));
    say(format!(
        "busiest s     {busiest} probes = {busiest_pct:.1}% of the shops; quietest {quietest}"
    ));
    say(format!(
        "status        cobbyd status --json median {:.1} ms, p95 {:.1} ms; GET /v1/status median {:.1} ms, p95 {:.1} ms ({} samples)",
        median_ms(&cli_ms),
        percentile_ms(&cli_ms, 0.95),
        median_ms(&raw_ms),
        percentile_ms(&raw_ms, 0.95),
        cli_ms.len()
    ));
    say(format!(
        "one shop      cobbyd status shop-0001 median {:.1} ms, p95 {:.1} ms",
        median_ms(&one_ms),
        percentile_ms(&one_ms, 0.95)
    ));
    say(format!(
        "memory        idle (no shops) {:.1} MiB, after setup {:.1} MiB, while watching {:.1} MiB, peak (VmHWM) {:.1} MiB",
        idle_rss_kib as f64 / 1024.0,
        after_setup_rss_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0
    ));
    say(format!(
        "cpu           {cpu_s:.1} s in {watched_s:.0} s ({:.1}% of one core); state dir {:.1} MiB",
        100.0 * cpu_s / watched_s,
        mib(state.0)
    ));
    Ok(json!({
        "shops": args.shops,
        "sims": args.sims,
        "probe_interval_s": args.interval_s,
        "register_s": register_s,
        "settle_s": settle_s,
        "watched_s": watched_s,
        "probes": probes,
        "probes_per_s": rate,
        "even_probes_per_s": even,
        "busiest_second": busiest,
        "busiest_second_pct": busiest_pct,
        "quietest_second": quietest,
        "per_second": full,
        "status_cli_ms": {"median": median_ms(&cli_ms), "p95": percentile_ms(&cli_ms, 0.95)},
        "status_raw_ms": {"median": median_ms(&raw_ms), "p95": percentile_ms(&raw_ms, 0.95)},
        "status_one_shop_cli_ms": {"median": median_ms(&one_ms), "p95": percentile_ms(&one_ms, 0.95)},
        "rss_idle_mib": idle_rss_kib as f64 / 1024.0,
        "rss_after_setup_mib": after_setup_rss_kib as f64 / 1024.0,
        "rss_mib": rss_kib as f64 / 1024.0,
        "peak_rss_mib": hwm_kib as f64 / 1024.0,
        "cpu_s": cpu_s,
        "state_dir_mib": mib(state.0),
    }))
}

fn main() -> ExitCode {
    support::main("scale", parse_args, run, |a| a.json)
}
