//! Operability: the demo, metrics validated by a real Prometheus parser,
//! the man page and the completion scripts.

use crate::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn tool(name: &str) -> String {
    // CI installs these (.ci/run); a missing tool is a failure, not a skip.
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: run .ci/run or apt-get install it"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_string()
}

#[test]
fn demo_runs_non_interactively_and_shows_a_finished_sync() {
    let out = Command::new(BIN)
        .args(["demo", "--non-interactive", "--products", "800"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("sync finished: 800 products fetched"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("demo ") && l.contains("healthy")),
        "{text}"
    );
    assert!(text.contains("Try next"), "{text}");
    // It cleaned up after itself.
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("Stopped the demo daemon and simulator; removed "))
        .unwrap()
        .trim_end_matches('.');
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

#[test]
fn metrics_parse_with_promtool_and_match_status() {
    let promtool = tool("promtool");
    let sim = Sim::start(600);
    let d = Daemon::start("[sync]\npage_size = 100\n");
    d.add_synced_m2_shop("acme", &sim);
    let (code, metrics) = d.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let res = check.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool: {}{}\n{metrics}",
        stdout(&res),
        stderr(&res)
    );
    let exported = d.cli(&["products", "acme"]);
    let lines = stdout(&exported).lines().count();
    assert_eq!(lines, 600);
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("cobbyd_products_in_mirror{shop=\"acme\",store=\"default\"}") as usize,
        lines
    );
    assert_eq!(
        value("cobbyd_shop_health_state{shop=\"acme\",state=\"healthy\"}"),
        1.0
    );
    assert_eq!(
        value("cobbyd_products_created_total{shop=\"acme\"}") as usize,
        lines
    );
    assert!(value("cobbyd_probe_duration_seconds_count{shop=\"acme\"}") >= 1.0);
    assert!(value("cobbyd_sync_duration_seconds_count{shop=\"acme\",kind=\"sync\"}") >= 1.0);
    assert!(value("cobbyd_last_successful_sync_timestamp_seconds{shop=\"acme\"}") > 1.0e9);
    assert!(value("cobbyd_shop_requests_total{shop=\"acme\",outcome=\"ok\"}") >= 6.0);
    assert!(value("cobbyd_queue_depth") >= 1.0);
    // The optional TCP listener serves the same exposition.
    drop(d);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("cobbyd_build_info"), "{body}");
    drop(d);
}

#[test]
fn man_page_renders_and_completions_load() {
    let man = Command::new(BIN).arg("manpage").output().unwrap();
    assert!(man.status.success());
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("cobbyd.1");
    std::fs::write(&page, &man.stdout).unwrap();
    let mandoc = tool("mandoc");
    let lint = Command::new(&mandoc)
        .args(["-T", "lint", "-W", "error"])
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "mandoc: {}{}",
        stdout(&lint),
        stderr(&lint)
    );
    let rendered = Command::new(&mandoc)
        .args(["-T", "ascii"])
        .arg(&page)
        .output()
        .unwrap();
    let text = stdout(&rendered);
    for cmd in [
        "run",
        "check-config",
        "status",
        "shop",
        "sync",
        "products",
        "demo",
    ] {
        assert!(text.contains(cmd), "man page lacks {cmd}:\n{text}");
    }
    for (shell, check) in [
        ("bash", vec!["-n"]),
        ("zsh", vec!["-n"]),
        ("fish", vec!["--no-execute"]),
    ] {
        let script = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(script.status.success());
        let path = dir.path().join(format!("cobbyd.{shell}"));
        std::fs::write(&path, &script.stdout).unwrap();
        let exe = tool(shell);
        let res = Command::new(exe).args(&check).arg(&path).output().unwrap();
        assert!(res.status.success(), "{shell}: {}", stderr(&res));
        assert!(
            stdout(&script).contains("shop"),
            "{shell} completion lacks subcommands"
        );
    }
}

#[test]
fn a_closed_pipe_ends_client_commands_quietly() {
    let sim = Sim::start(3000);
    let d = Daemon::start("");
    d.add_synced_m2_shop("acme", &sim);
    for cmd in [
        "products acme",
        "products acme --format csv",
        "shop show acme",
        "status",
    ] {
        let script = format!(
            "'{BIN}' {cmd} --config '{}' | head -c 10 >/dev/null",
            d.config.display()
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        assert!(err.is_empty(), "{cmd}: {err}");
    }
    // The daemon is unaffected by the reader going away mid-export.
    assert_eq!(d.http("GET", "/health", None).0, 200);
}
