//! Sync benchmark (the performance targets in BENCHMARKS.md).
//!
//! `cargo bench --bench sync -- [--products N] [--page-size N] [--platform m2|m1]
//! [--latency-ms N] [--concurrency N] [--json]`
//!
//! With `--latency-ms N` every simulator answer is N ms late (a real shop's
//! page time) and the report sets the daemon's wall time beside the
//! sequential limit (requests × latency) and the concurrent limit (requests
//! × latency / `sync.shop_concurrency`); the bare client is skipped then (its
//! sequential walk would take the sequential limit twice).
//!
//! 1. Starts the simulator in-process with N products (default 100,000).
//! 2. Baseline, the "bare client": fetches the pages the daemon fetches, in
//!    the same order and with the same concurrency (the Magento 2 catch-up is
//!    sequential keyset paging: page 1 of "after (updated_at, id)" each time),
//!    through the same `M2Client`, storing nothing. Run once before and once
//!    after the daemon; the faster run is the baseline.
//! 3. The real daemon (the release binary) on a temporary state directory:
//!    idle RSS, `shop add`, the first sync's duration (`last_run.duration_ms`)
//!    and its rate relative to the baseline, `cobbyd status` latency while the
//!    sync runs, peak RSS (VmHWM), state directory size against the raw JSON
//!    size, and the JSONL export rate of `cobbyd products`.
//! 4. Prints a report; with `--json`, the report goes to stderr and one JSON
//!    object to stdout.
//!
//! Exits non-zero when anything fails (the sync, a count that does not match,
//! the daemon dying). Targets are reported, not asserted: timings on a shared
//! machine are not a pass/fail signal.

#[path = "../tests/it/harness.rs"]
mod harness;
mod support;

use support::{BIN, Daemon, dir_size, median_ms, mib, percentile_ms, proc_cpu_s, proc_kib};

use anyhow::{Context, Result, anyhow, bail};
use cobbyd::magento::m2::{M2Auth, M2Client, ProductQuery};
use cobbyd::secret::Secret;
use cobbyd::sim::{SimConfig, SimHandle};
use serde_json::{Value, json};
use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const SHOP: &str = "bench";
const STORE: &str = "default";
/// `cobbyd status` calls timed while the sync runs.
const STATUS_SAMPLES: usize = 20;

const USAGE: &str = "usage: cargo bench --bench sync -- [--products N] [--page-size N] [--platform m2|m1] [--latency-ms N] [--concurrency N] [--json]
  --products N     catalog size (default 100000; k and M suffixes accepted: 1M)
  --page-size N    products per page, for the daemon and the baseline (default 200, at most 300);
                   Magento 1: products per multiCall
  --platform P     m2 (default) or m1
  --latency-ms N   every simulator answer N ms late; reports the sequential and concurrent limits
  --concurrency N  sync.shop_concurrency of the daemon (default 4)
  --json           print one JSON object on stdout (the readable report goes to stderr)";

struct Args {
    products: usize,
    page_size: u32,
    m1: bool,
    latency_ms: u64,
    concurrency: u64,
    json: bool,
}

fn parse_count(s: &str) -> Result<u64> {
    let t = s.trim().replace('_', "");
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000),
        _ => (t.as_str(), 1),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("not a number: {s:?}"))?;
    Ok(n * mult)
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        products: 100_000,
        page_size: 200,
        m1: false,
        latency_ms: 0,
        concurrency: 4,
        json: false,
    };
    support::each_arg(USAGE, |name, value| {
        match name {
            "--products" => a.products = usize::try_from(parse_count(&value()?)?)?,
            "--page-size" => a.page_size = u32::try_from(parse_count(&value()?)?)?,
            "--platform" => {
                a.m1 = match value()?.as_str() {
                    "m1" | "magento1" => true,
                    "m2" | "magento2" => false,
                    other => bail!("--platform is m1 or m2, not {other:?}"),
                }
            }
            "--latency-ms" => a.latency_ms = parse_count(&value()?)?,
            "--concurrency" => a.concurrency = parse_count(&value()?)?,
            "--json" => a.json = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.products == 0 {
        bail!("--products must be at least 1");
    }
    if !(1..=16).contains(&a.concurrency) {
        bail!("--concurrency must be 1..=16 (sync.shop_concurrency's range)");
    }
    if !(1..=300).contains(&a.page_size) {
        bail!("--page-size must be 1..=300 (the simulated shop's maximum is 300)");
    }
    Ok(a)
}

// ---------------------------------------------------------------------------
// Baseline: the bare client
// ---------------------------------------------------------------------------

struct Baseline {
    seconds: f64,
    products: u64,
    pages: u64,
    bytes: u64,
}

impl Baseline {
    fn rate(&self) -> f64 {
        self.products as f64 / self.seconds.max(1e-9)
    }
}

/// The daemon's catch-up loop (src/sync/m2.rs) without the storage.
async fn bare_client(sim: &SimHandle, page_size: u32) -> Result<Baseline> {
    let c = sim.credentials();
    let auth = M2Auth::Oauth {
        consumer_key: Secret::new(c.consumer_key.clone()),
        consumer_secret: Secret::new(c.consumer_secret.clone()),
        access_token: Secret::new(c.access_token.clone()),
        access_token_secret: Secret::new(c.access_token_secret.clone()),
    };
    let opts = cobbyd::registry::client_options(&cobbyd::config::Config::default());
    let client =
        M2Client::new(SHOP, &sim.url(), auth, &opts).map_err(|e| anyhow!("client: {e}"))?;
    let started = Instant::now();
    let mut after: Option<(String, i64)> = None;
    let (mut products, mut pages, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        let q = ProductQuery {
            after: after.clone(),
            page_size,
            ..ProductQuery::default()
        };
        let page = client
            .list_products(STORE, &q)
            .await
            .map_err(|e| anyhow!("bare client, page {}: {e}", pages + 1))?;
        pages += 1;
        bytes += page.body_bytes as u64;
        let Some(last) = page
            .items
            .iter()
            .max_by(|a, b| (a.updated_at.as_str(), a.id).cmp(&(b.updated_at.as_str(), b.id)))
        else {
            break;
        };
        after = Some((last.updated_at.clone(), last.id));
        let n = page.items.len() as u64;
        products += n;
        if n >= page.total_count || n < u64::from(page_size) {
            break;
        }
    }
    Ok(Baseline {
        seconds: started.elapsed().as_secs_f64(),
        products,
        pages,
        bytes,
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

fn run(args: &Args) -> Result<Value> {
    let n = args.products;
    let say = |s: String| {
        if args.json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    };
    let platform = if args.m1 {
        "Magento 1 (XML-RPC)"
    } else {
        "Magento 2 (OAuth)"
    };
    say(format!(
        "cobbyd sync benchmark: {n} products, page size {}, {platform}, store view {STORE}, latency {} ms per answer, shop_concurrency {}",
        args.page_size, args.latency_ms, args.concurrency
    ));

    // 1. The simulator, on its own runtime.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim")
        .enable_all()
        .build()?;
    let t = Instant::now();
    let sim = sim_rt.block_on(SimHandle::start(SimConfig {
        products: n,
        store_codes: vec![STORE.to_string()],
        ..SimConfig::default()
    }))?;
    let sim_generate_s = t.elapsed().as_secs_f64();
    say(format!(
        "simulator     {} at {} ({n} products generated in {sim_generate_s:.2} s)",
        sim.url(),
        STORE
    ));

    // 2. Baseline, first run (Magento 2 without latency only: with latency
    // the limits below are the yardstick). The client gets its own
    // runtime, as the daemon has its own process.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client")
        .enable_all()
        .build()?;
    let with_baseline = !args.m1 && args.latency_ms == 0;
    let b1 = if with_baseline {
        let b1 = client_rt.block_on(bare_client(&sim, args.page_size))?;
        if b1.products != n as u64 {
            bail!(
                "bare client fetched {} products, the shop has {n}",
                b1.products
            );
        }
        say(format!(
            "bare client   run 1: {} products, {} pages, {:.1} MiB in {:.2} s = {:.0} products/s",
            b1.products,
            b1.pages,
            mib(b1.bytes),
            b1.seconds,
            b1.rate()
        ));
        Some(b1)
    } else {
        None
    };
    if args.latency_ms > 0 {
        sim.set_fault(cobbyd::sim::Fault::Slow(Duration::from_millis(
            args.latency_ms,
        )));
    }

    // 3. The daemon.
    let mut d = Daemon::start(&format!(
        "[sync]\npage_size = {p}\nm1_batch_size = {p}\nshop_concurrency = {}\n",
        args.concurrency,
        p = args.page_size
    ))?;
    let pid = d.pid();
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kib = proc_kib(pid, "VmRSS")?;
    let idle_hwm_kib = proc_kib(pid, "VmHWM")?;
    let cpu_before = proc_cpu_s(pid)?;
    let creds = if args.m1 {
        sim.credentials().m1_toml()
    } else {
        sim.credentials().m2_oauth_toml()
    };
    let url = sim.url();
    let out = d.cli(
        &[
            "shop",
            "add",
            SHOP,
            "--platform",
            if args.m1 { "magento1" } else { "magento2" },
            "--url",
            &url,
            "--store-code",
            STORE,
            "--allow-insecure-http",
            "--credentials-file",
            "-",
        ],
        Some(&creds),
    )?;
    if !out.status.success() {
        bail!(
            "cobbyd shop add failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.log_tail()
        );
    }
    let added = Instant::now();
    let deadline = Duration::from_secs(300) + Duration::from_millis(n as u64 * 2);
    let mut cli_ms: Vec<f64> = Vec::new();
    let mut socket_ms: Vec<f64> = Vec::new();
    let mut last_sample: Option<Instant> = None;
    let mut peak_sampled_kib = 0;
    let mut last_progress = Value::Null;
    let shop = loop {
        d.check_alive()?;
        peak_sampled_kib = peak_sampled_kib.max(proc_kib(pid, "VmRSS").unwrap_or(0));
        let t = Instant::now();
        let s = d.shop(SHOP)?;
        let socket_took = t.elapsed().as_secs_f64() * 1e3;
        let sync = &s["sync"];
        if let Some(outcome) = sync["last_run"]["outcome"].as_str() {
            if outcome == "ok" {
                break s;
            }
            bail!(
                "the sync ended {outcome}: {:#}\n{}",
                sync["last_run"],
                d.log_tail()
            );
        }
        if sync["state"] == "running" {
            last_progress = sync["progress"].clone();
            socket_ms.push(socket_took);
            let due = last_sample.is_none_or(|t| t.elapsed() >= Duration::from_millis(50));
            if cli_ms.len() < STATUS_SAMPLES && due {
                let t = Instant::now();
                let o = d.cli(&["status", SHOP, "--json"], None)?;
                let took = t.elapsed().as_secs_f64() * 1e3;
                // 0: healthy, 1: running but not healthy; both answered.
                if !matches!(o.status.code(), Some(0 | 1)) {
                    bail!(
                        "cobbyd status failed ({}): {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                cli_ms.push(took);
                last_sample = Some(Instant::now());
            }
        }
        if added.elapsed() > deadline {
            bail!(
                "the first sync did not end within {deadline:?}; progress: {last_progress:#}\n{}",
                d.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let run = &shop["sync"]["last_run"];
    let duration_ms = run["duration_ms"]
        .as_u64()
        .ok_or_else(|| anyhow!("last_run without duration_ms: {run}"))?;
    let fetched = run["fetched"].as_u64().unwrap_or(0);
    let mirrored = shop["sync"]["products"].as_u64().unwrap_or(0);
    if fetched != n as u64 || mirrored != n as u64 {
        bail!(
            "the sync fetched {fetched} and mirrors {mirrored} products; the shop has {n}\n{run:#}"
        );
    }
    let peak_rss_kib = proc_kib(pid, "VmHWM")?;
    let rss_after_kib = proc_kib(pid, "VmRSS")?;
    let sync_cpu_s = proc_cpu_s(pid)? - cpu_before;
    let daemon_rate = n as f64 / (duration_ms as f64 / 1e3).max(1e-9);
    say(format!(
        "daemon sync   {fetched} products, {} pages, {} requests in {:.2} s = {daemon_rate:.0} products/s; daemon CPU {sync_cpu_s:.2} s",
        run["pages"],
        run["requests"],
        duration_ms as f64 / 1e3
    ));
    let requests = run["requests"].as_u64().unwrap_or(0);
    let wall_s = duration_ms as f64 / 1e3;
    let sequential_s = requests as f64 * args.latency_ms as f64 / 1e3;
    let concurrent_s = sequential_s / args.concurrency as f64;
    if args.latency_ms > 0 {
        say(format!(
            "latency       {} ms per answer, {requests} requests: daemon {wall_s:.1} s | sequential limit {sequential_s:.1} s | concurrent limit {concurrent_s:.1} s (x{}) | daemon / concurrent limit = {:.2} (target <= 1.1)",
            args.latency_ms,
            args.concurrency,
            wall_s / concurrent_s.max(1e-9)
        ));
        sim.set_fault(cobbyd::sim::Fault::None);
    }

    // `cobbyd status` with the daemon idle: the cost of the CLI itself
    // (process start, config, connect), for comparison.
    let mut idle_cli_ms = Vec::new();
    for _ in 0..STATUS_SAMPLES {
        let t = Instant::now();
        let o = d.cli(&["status", SHOP, "--json"], None)?;
        idle_cli_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if !matches!(o.status.code(), Some(0 | 1)) {
            bail!(
                "cobbyd status failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }

    // State directory against the raw JSON.
    let (state_du, state_apparent) = dir_size(&d.state_dir)?;

    // Export.
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .args(["products", SHOP, "--config"])
        .arg(&d.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut first_line = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = stdout.read(&mut buf)?;
        if k == 0 {
            break;
        }
        if lines == 0 {
            let end = buf[..k].iter().position(|b| *b == b'\n').unwrap_or(k);
            first_line.extend_from_slice(&buf[..end]);
        }
        lines += buf[..k].iter().filter(|b| **b == b'\n').count() as u64;
        bytes += k as u64;
    }
    let status = child.wait()?;
    let export_s = t.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("cobbyd products failed ({status}): {err}");
    }
    if lines != n as u64 {
        bail!("cobbyd products wrote {lines} lines; the mirror has {n} products");
    }
    let first: Value =
        serde_json::from_slice(&first_line).context("the first exported line is not JSON")?;
    if !first["sku"].is_string() {
        bail!("the first exported line has no sku: {first}");
    }
    let raw_json = bytes - lines;
    let peak_with_export_kib = proc_kib(pid, "VmHWM")?;

    // 2b. Baseline, second run (the shop is idle again).
    let (base_rate, ratio, base_json) = match &b1 {
        Some(b1) => {
            let b2 = client_rt.block_on(bare_client(&sim, args.page_size))?;
            say(format!(
                "bare client   run 2: {} products, {} pages in {:.2} s = {:.0} products/s",
                b2.products,
                b2.pages,
                b2.seconds,
                b2.rate()
            ));
            let base = if b2.rate() > b1.rate() { &b2 } else { b1 };
            (
                base.rate(),
                daemon_rate / base.rate(),
                json!({
                    "products_per_s": base.rate(),
                    "seconds": base.seconds,
                    "pages": base.pages,
                    "bytes": base.bytes,
                    "runs_s": [b1.seconds, b2.seconds],
                }),
            )
        }
        None => (0.0, 0.0, Value::Null),
    };

    d.stop();

    let status_line = if cli_ms.is_empty() {
        "not sampled: the sync ended before the first call".to_string()
    } else {
        format!(
            "median {:.2} ms, p90 {:.2} ms, max {:.2} ms over {} calls while syncing (target < 10 ms; idle: median {:.2} ms); GET /v1/status over the socket while syncing: median {:.2} ms, p90 {:.2} ms over {} calls",
            median_ms(&cli_ms),
            percentile_ms(&cli_ms, 0.9),
            percentile_ms(&cli_ms, 1.0),
            cli_ms.len(),
            median_ms(&idle_cli_ms),
            median_ms(&socket_ms),
            percentile_ms(&socket_ms, 0.9),
            socket_ms.len()
        )
    };
    say(String::new());
    if b1.is_some() {
        say(format!(
            "sync rate     daemon {daemon_rate:.0} products/s vs bare client {base_rate:.0} products/s = {:.1}% (target >= 90%)",
            ratio * 100.0
        ));
    }
    say(format!(
        "daemon memory idle {:.1} MiB RSS (before the shop); peak {:.1} MiB during the sync (VmHWM; highest RSS sampled {:.1} MiB; target < 64 MiB at 1M); {:.1} MiB after it; peak {:.1} MiB once the export ran",
        idle_rss_kib as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0,
        peak_sampled_kib as f64 / 1024.0,
        rss_after_kib as f64 / 1024.0,
        peak_with_export_kib as f64 / 1024.0
    ));
    say(format!("cobbyd status {status_line}"));
    say(format!(
        "state dir     {:.1} MiB on disk (du; {:.1} MiB apparent) for {:.1} MiB of product JSON = {:.2}x",
        mib(state_du),
        mib(state_apparent),
        mib(raw_json),
        state_du as f64 / raw_json.max(1) as f64
    ));
    say(format!(
        "export        {lines} lines, {:.1} MiB in {export_s:.2} s = {:.0} lines/s ({:.0} MiB/s)",
        mib(bytes),
        lines as f64 / export_s.max(1e-9),
        mib(bytes) / export_s.max(1e-9)
    ));

    sim_rt.block_on(sim.shutdown());
    Ok(json!({
        "products": n,
        "page_size": args.page_size,
        "sim_generate_s": sim_generate_s,
        "platform": if args.m1 { "magento1" } else { "magento2" },
        "latency_ms": args.latency_ms,
        "shop_concurrency": args.concurrency,
        "limits_s": {
            "daemon_wall": wall_s,
            "sequential": sequential_s,
            "concurrent": concurrent_s,
            "ratio_to_concurrent": wall_s / concurrent_s.max(1e-9),
        },
        "baseline": base_json,
        "daemon": {
            "products_per_s": daemon_rate,
            "duration_ms": duration_ms,
            "pages": run["pages"],
            "requests": run["requests"],
            "ratio_to_baseline": ratio,
            "cpu_s": sync_cpu_s,
        },
        "rss_kib": {
            "idle": idle_rss_kib,
            "idle_hwm": idle_hwm_kib,
            "peak_hwm": peak_rss_kib,
            "peak_sampled": peak_sampled_kib,
            "after_sync": rss_after_kib,
            "peak_hwm_with_export": peak_with_export_kib,
        },
        "status_ms": {
            "cli_median": median_ms(&cli_ms),
            "cli_p90": percentile_ms(&cli_ms, 0.9),
            "cli_max": percentile_ms(&cli_ms, 1.0),
            "cli_samples": cli_ms.len(),
            "cli_idle_median": median_ms(&idle_cli_ms),
            "socket_median": median_ms(&socket_ms),
            "socket_p90": percentile_ms(&socket_ms, 0.9),
            "socket_samples": socket_ms.len(),
        },
        "state_dir": {
            "du_bytes": state_du,
            "apparent_bytes": state_apparent,
            "raw_json_bytes": raw_json,
            "ratio": state_du as f64 / raw_json.max(1) as f64,
        },
        "export": {
            "lines": lines,
            "bytes": bytes,
            "seconds": export_s,
            "lines_per_s": lines as f64 / export_s.max(1e-9),
        },
    }))
}

fn main() -> ExitCode {
    support::main("sync", parse_args, run, |a| a.json)
}
