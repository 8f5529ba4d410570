//! `cobbyd demo`: a new user sees the daemon do its job in one command.
//! Starts the built-in simulator and a real daemon (this binary, `run`) on
//! a temporary state directory and socket, adds the shop over the control
//! socket, follows the first sync with a progress bar, prints the status and
//! the first products, and keeps running until Ctrl-C (or exits at once with
//! `--non-interactive` or when stdout is not a terminal). Everything it
//! created is removed on the way out.

use crate::cli::DemoArgs;
use crate::commands::{Style, render_status, thousands};
use crate::control_client::Client;
use crate::shop::Platform;
use crate::sim::{SimConfig, SimHandle};
use hyper::Method;
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the demo waits for the daemon to start or the sync to end.
const PATIENCE: Duration = Duration::from_secs(300);

pub fn run(args: DemoArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cobbyd demo: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let dir = match tempfile::Builder::new().prefix("cobbyd-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cobbyd demo: cannot create a temporary directory: {e}");
            return 1;
        }
    };
    let mut daemon: Option<Child> = None;
    let code = runtime.block_on(demo(&args, dir.path(), &mut daemon));
    if let Some(mut child) = daemon {
        stop_daemon(&mut child);
    }
    println!(
        "Stopped the demo daemon and simulator; removed {}.",
        dir.path().display()
    );
    drop(dir);
    code
}

fn stop_daemon(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn demo(args: &DemoArgs, dir: &Path, daemon: &mut Option<Child>) -> u8 {
    let interactive = !args.non_interactive && std::io::stdout().is_terminal();
    let style = Style::detect();
    let me = program();
    let platform = args.platform;
    println!(
        "{}",
        style.bold("cobbyd demo: a simulated Magento shop, a real daemon, a real sync")
    );
    println!();

    // 1. The simulated shop.
    let sim = match SimHandle::start(SimConfig {
        products: args.products,
        ..SimConfig::default()
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cobbyd demo: cannot start the simulator: {e}");
            return 1;
        }
    };
    let kind = match platform {
        Platform::Magento2 => "Magento 2 (REST, OAuth 1.0a)",
        Platform::Magento1 => "Magento 1 (XML-RPC)",
    };
    println!(
        "  shop      {} — simulated {kind}, {} products",
        sim.url(),
        thousands(sim.product_count() as u64)
    );

    // 2. The daemon, this very binary, on a private state dir and socket.
    let socket = dir.join("cobbyd.sock");
    let config = dir.join("cobbyd.toml");
    let state = dir.join("state");
    let log = dir.join("daemon.log");
    let text = format!(
        "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\nsocket_group = \"{}\"\nshutdown_timeout = \"10s\"\n\n[probe]\ninterval = \"30s\"\n\n[sync]\ninterval = \"1m\"\n",
        state.display(),
        socket.display(),
        current_group(),
    );
    if let Err(e) = std::fs::write(&config, text) {
        eprintln!("cobbyd demo: cannot write {}: {e}", config.display());
        return 1;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cobbyd demo: cannot find my own binary: {e}");
            return 1;
        }
    };
    let log_file = match std::fs::File::create(&log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cobbyd demo: {e}");
            return 1;
        }
    };
    match Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
    {
        Ok(c) => *daemon = Some(c),
        Err(e) => {
            eprintln!("cobbyd demo: cannot start the daemon: {e}");
            return 1;
        }
    }
    let client = Client::new(&socket);
    let started = Instant::now();
    loop {
        if let Ok(a) = client.get("/health").await
            && a.status.is_success()
        {
            break;
        }
        if let Some(Ok(Some(status))) = daemon.as_mut().map(Child::try_wait) {
            eprintln!(
                "cobbyd demo: the daemon exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            return 1;
        }
        if started.elapsed() > PATIENCE {
            eprintln!("cobbyd demo: the daemon did not start in time");
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  daemon    pid {} — state {}, socket {}",
        daemon.as_ref().map_or(0, Child::id),
        state.display(),
        socket.display()
    );

    // 3. The credentials file an operator would write, and `shop add`.
    let (creds, creds_name) = match platform {
        Platform::Magento2 => (sim.credentials().m2_oauth_toml(), "m2-oauth.toml"),
        Platform::Magento1 => (sim.credentials().m1_toml(), "m1.toml"),
    };
    let creds_path = dir.join(creds_name);
    if let Err(e) = write_private(&creds_path, &creds) {
        eprintln!("cobbyd demo: cannot write {}: {e}", creds_path.display());
        return 1;
    }
    println!();
    // What an operator would type. Without a terminal the demo's directory
    // is gone when this is read: only the file's name, then.
    let shown_creds = if interactive {
        shell_word(&creds_path.display().to_string())
    } else {
        creds_name.to_string()
    };
    println!(
        "$ {me} shop add demo --platform {platform} --url {} --allow-insecure-http --credentials-file {shown_creds}",
        sim.url(),
    );
    let table: toml::Table = match creds.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cobbyd demo: {e}");
            return 1;
        }
    };
    let body = json!({"name": "demo", "platform": platform, "url": sim.url(), "credentials": table,
               "allow_insecure_http": true});
    match client.request(Method::POST, "/v1/shops", Some(&body)).await {
        Ok(a) if a.status.is_success() => {
            let v = a.json().unwrap_or_default();
            println!(
                "  connection tested: {} — the first sync starts now",
                style.state(v["state"].as_str().unwrap_or("?"))
            );
        }
        Ok(a) => {
            eprintln!("cobbyd demo: the shop was refused: {}", a.error_message());
            return 1;
        }
        Err(e) => {
            eprintln!("cobbyd demo: {e}");
            return 1;
        }
    }

    // 4. Follow the sync.
    println!();
    let outcome = follow_sync(&client, interactive, sim.product_count() as u64).await;
    let Some(last_run) = outcome else {
        eprintln!(
            "cobbyd demo: the sync did not finish; daemon log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        return 1;
    };
    let ok = last_run["outcome"] == "ok";
    println!(
        "  sync {}: {} products fetched, {} created, in {:.1}s with {} requests",
        if ok {
            style.state("healthy").replace("healthy", "finished")
        } else {
            style.state("failed")
        },
        thousands(last_run["fetched"].as_u64().unwrap_or(0)),
        thousands(last_run["created"].as_u64().unwrap_or(0)),
        last_run["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        last_run["requests"],
    );

    // 5. Status and the first products.
    println!();
    println!("$ {me} status");
    let status = match client.get("/v1/status").await.and_then(|a| a.json()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cobbyd demo: {e}");
            return 1;
        }
    };
    print!("{}", render_status(&status, &style));
    let healthy = status["shops"][0]["state"] == "healthy";
    println!();
    println!(
        "$ {me} products demo | head -5   (each line is a product's JSON as the shop answered; here only its SKU, name and price)"
    );
    let mut export = Vec::new();
    match client
        .stream_to("/v1/shops/demo/products?format=jsonl", &mut export, |_| {})
        .await
    {
        Ok(Ok(())) => {
            for line in export
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .take(5)
            {
                if let Ok(p) = serde_json::from_slice::<Value>(line) {
                    println!(
                        "  {:<28} {:<40} {}",
                        truncate(p["sku"].as_str().unwrap_or("?"), 28),
                        truncate(p["name"].as_str().unwrap_or("?"), 40),
                        price(&p["price"])
                    );
                }
            }
        }
        Ok(Err(a)) => eprintln!("cobbyd demo: export refused: {}", a.error_message()),
        Err(e) => eprintln!("cobbyd demo: export: {e}"),
    }

    // 6. What to try next: commands that work as printed (this binary's
    // own path unless `cobbyd` on PATH is this binary).
    println!();
    if interactive {
        let s = shell_word(&socket.display().to_string());
        println!(
            "{}",
            style.bold("Try next (in another terminal, while this runs):")
        );
        println!("  {me} status --socket {s}");
        println!("  {me} status --json --socket {s}");
        println!("  {me} products demo --format csv --socket {s} | head");
        println!("  {me} sync demo --full --wait --socket {s}");
        println!("  {me} shop test demo --socket {s}");
        println!("  curl --unix-socket {s} http://localhost/metrics");
        println!(
            "  curl -X POST {}/fault -d '{{\"mode\":\"maintenance\"}}'   # then watch status; mode none to heal",
            sim.control_url()
        );
        println!("  daemon log: {}", shell_word(&log.display().to_string()));
    } else {
        // The daemon, the simulator and the directory are gone once this
        // is read: nothing that points at them.
        println!("{}", style.bold("Try next:"));
        println!(
            "  {me} demo                        # in a terminal: keeps the daemon running and prints commands to try on it"
        );
        println!("  {me} demo --platform magento1   # the same with a Magento 1 shop");
        println!("  {me} --help");
        println!(
            "  Your own shop: README.md, \"Your first shop\" (`cargo install --path .` puts cobbyd on PATH)."
        );
    }

    let code = if ok && healthy { 0 } else { 1 };
    if interactive {
        println!();
        println!("The demo keeps running. Press Ctrl-C to stop it and remove its files.");
        let _ = wait_for_stop().await;
        println!();
    }
    sim.shutdown().await;
    code
}

/// Polls the status until the first sync ends; a bar on a terminal, a line
/// per second otherwise. Returns the finished run.
///
/// `catalog` is the simulated catalog's size: the demo's first sync reads
/// all of it, so it is the bar's total even when the run's own estimate
/// covers only the part it has listed so far (Magento 1 lists id ranges).
async fn follow_sync(client: &Client, interactive: bool, catalog: u64) -> Option<Value> {
    let bar = if interactive {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "  syncing {bar:40.cyan/blue} {pos:>7}/{len:7} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        Some(b)
    } else {
        None
    };
    let started = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let v = client.get("/v1/status?shop=demo").await.ok()?.json().ok()?;
        let sync = &v["shops"][0]["sync"];
        let p = &sync["progress"];
        if !p.is_null() {
            let done = p["done"].as_u64().unwrap_or(0);
            let total = bar_total(p["total"].as_u64(), catalog, done);
            let msg = format!(
                "{} products/s, {}",
                thousands(p["rate_per_s"].as_f64().unwrap_or(0.0) as u64),
                p["phase"].as_str().unwrap_or("")
            );
            match &bar {
                Some(b) => {
                    b.set_length(total.max(1));
                    b.set_position(done);
                    b.set_message(msg);
                }
                None if total > 0 && last_print.elapsed() >= Duration::from_secs(1) => {
                    println!("  syncing {}/{} ({msg})", thousands(done), thousands(total));
                    last_print = Instant::now();
                }
                None => {}
            }
        } else if !sync["last_run"].is_null() {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Some(sync["last_run"].clone());
        }
        if started.elapsed() > PATIENCE {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bar's total: never less than the catalog the first sync reads, nor
/// than what is done.
fn bar_total(run_total: Option<u64>, catalog: u64, done: u64) -> u64 {
    run_total.unwrap_or(0).max(catalog).max(done)
}

/// How the demo names this binary in the commands it prints: `cobbyd`
/// when that is what PATH finds, else this binary's own path (after
/// `cargo run`, cobbyd is not on PATH).
fn program() -> String {
    let Ok(me) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "cobbyd".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .filter_map(|d| std::fs::canonicalize(d.join("cobbyd")).ok())
            .next()
            .is_some_and(|found| found == me)
    });
    if on_path {
        "cobbyd".into()
    } else {
        shell_word(&me.display().to_string())
    }
}

/// A path as one shell word: quoted when it holds anything but the
/// characters paths usually have.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A price as people read it: Magento 1 sends a decimal string
/// (`"942.2900"`), Magento 2 a number; both print as `942.29`.
fn price(v: &Value) -> String {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() => format!("{n:.2}"),
        _ => match v {
            Value::String(s) => truncate(s, 12),
            Value::Null => "-".into(),
            other => truncate(&other.to_string(), 12),
        },
    }
}

fn truncate(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The caller's primary group, so the socket stays usable by the caller.
fn current_group() -> String {
    nix::unistd::Group::from_gid(nix::unistd::getgid())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "cobbyd".into())
}

fn write_private(path: &PathBuf, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

async fn wait_for_stop() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_print_as_numbers() {
        assert_eq!(price(&json!("942.2900")), "942.29");
        assert_eq!(price(&json!(12.5)), "12.50");
        assert_eq!(price(&json!(null)), "-");
        assert_eq!(price(&json!("n/a")), "n/a");
    }

    #[test]
    fn the_bar_counts_the_whole_catalog() {
        // A Magento 1 run estimates only the ids listed so far.
        assert_eq!(bar_total(Some(979), 5000, 979), 5000);
        assert_eq!(bar_total(None, 5000, 10), 5000);
        assert_eq!(bar_total(Some(5000), 5000, 5000), 5000);
        assert_eq!(bar_total(Some(10), 5, 20), 20);
    }

    #[test]
    fn paths_become_one_shell_word() {
        assert_eq!(
            shell_word("/tmp/cobbyd-demo-x/cobbyd.sock"),
            "/tmp/cobbyd-demo-x/cobbyd.sock"
        );
        assert_eq!(shell_word("/home/a b/cobbyd"), "'/home/a b/cobbyd'");
        assert_eq!(shell_word("/it's"), r"'/it'\''s'");
    }
}
