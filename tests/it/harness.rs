//! Test harness: starts the real `cobbyd` binary on a temporary state
//! directory and socket, runs its CLI, talks HTTP over its socket, and
//! starts simulated shops in-process (real HTTP on 127.0.0.1).

#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cobbyd");
/// Generous: these bound waiting, they do not assert speed.
pub const WAIT: Duration = Duration::from_secs(90);

/// A running daemon in its own temporary directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    envs: Vec<(String, String)>,
    /// The daemon binary (`BIN` unless a test measures another build).
    bin: PathBuf,
}

/// Writes a config with the temporary paths plus `extra` TOML. Sections in
/// `extra` other than `[daemon]` are appended as is; daemon keys go to
/// `daemon_extra`.
pub fn write_config(dir: &Path, daemon_extra: &str, extra: &str) -> PathBuf {
    let config = dir.join("cobbyd.toml");
    let text = format!(
        "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\nsocket_group = \"cobbyd-test-no-such-group\"\nshutdown_timeout = \"20s\"\nlog_level = \"debug\"\n{daemon_extra}\n{extra}\n",
        dir.join("state").display(),
        dir.join("cobbyd.sock").display(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

impl Daemon {
    /// Starts a daemon with default test settings plus `extra` config.
    pub fn start(extra: &str) -> Daemon {
        Self::start_with(extra, &[])
    }

    pub fn start_with(extra: &str, envs: &[(&str, &str)]) -> Daemon {
        Self::start_bin(Path::new(BIN), extra, envs)
    }

    /// [`Daemon::start_with`] running `bin` as the daemon (the CLI stays
    /// `BIN`).
    pub fn start_bin(bin: &Path, extra: &str, envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("cobbyd-it")
            .tempdir()
            .unwrap();
        let config = write_config(dir.path(), "", extra);
        let mut d = Daemon {
            socket: dir.path().join("cobbyd.sock"),
            state_dir: dir.path().join("state"),
            log_path: dir.path().join("daemon.log"),
            config,
            dir,
            child: None,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bin: bin.to_path_buf(),
        };
        d.spawn();
        d.wait_healthy();
        d
    }

    /// Starts the process without waiting for it to be ready.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Waits until `/health` answers 200.
    pub fn wait_healthy(&mut self) {
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = self.try_http("GET", "/health", None) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("daemon exited during start-up ({status}):\n{}", self.log());
            }
            assert!(
                t.elapsed() < WAIT,
                "daemon not ready in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(s) = stdin {
            // The CLI may refuse its arguments before reading stdin.
            let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
        }
        child.wait_with_output().unwrap()
    }

    /// One HTTP request over the control socket.
    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        http_unix(&self.socket, method, path, body)
    }

    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.try_http(method, path, body).unwrap()
    }

    pub fn json(&self, path: &str) -> Value {
        let (code, body) = self.http("GET", path, None);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn status(&self) -> Value {
        self.json("/v1/status")
    }

    /// The status object of one shop.
    pub fn shop(&self, name: &str) -> Value {
        self.json(&format!("/v1/status?shop={name}"))["shops"][0].clone()
    }

    /// Polls a shop's status until `f` holds; panics with context after WAIT.
    pub fn wait_shop(&self, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let s = self.shop(name);
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < WAIT,
                "timed out waiting for {name}: {what}\nlast status: {s:#}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let t = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > WAIT {
                let _ = child.kill();
                panic!("daemon did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same state (after a kill or stop).
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    /// Adds a Magento 2 shop of `sim` (OAuth) and waits for its first sync.
    pub fn add_synced_m2_shop(&self, name: &str, sim: &Sim) {
        let out = self.add_shop(
            name,
            "magento2",
            &sim.url(),
            &sim.credentials().m2_oauth_toml(),
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        self.wait_shop(name, "first sync", |s| {
            s["sync"]["last_run"]["outcome"] == "ok"
        });
    }

    /// `shop add` with credentials on stdin; an `http://` URL (the
    /// simulator's) gets `--allow-insecure-http`.
    pub fn add_shop(
        &self,
        name: &str,
        platform: &str,
        url: &str,
        creds: &str,
        extra: &[&str],
    ) -> Output {
        let mut args = vec![
            "shop",
            "add",
            name,
            "--platform",
            platform,
            "--url",
            url,
            "--credentials-file",
            "-",
        ];
        if url.starts_with("http://") {
            args.push("--allow-insecure-http");
        }
        args.extend_from_slice(extra);
        self.cli_stdin(&args, Some(creds))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Minimal HTTP/1.1 client over a Unix socket (Connection: close).
pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    // One write: `write!` on an unbuffered stream may split the request, and
    // a body that arrives after the answer was sent is unread data at close
    // (ECONNRESET on a Unix socket).
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: cobbyd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer: {text:?}")))?;
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// A simulated shop running in this test process.
pub struct Sim {
    pub rt: tokio::runtime::Runtime,
    pub handle: Option<cobbyd::sim::SimHandle>,
}

impl Sim {
    pub fn start(products: usize) -> Sim {
        Self::start_with(cobbyd::sim::SimConfig {
            products,
            ..Default::default()
        })
    }

    pub fn start_with(cfg: cobbyd::sim::SimConfig) -> Sim {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.block_on(cobbyd::sim::SimHandle::start(cfg)).unwrap();
        Sim {
            rt,
            handle: Some(handle),
        }
    }
}

impl std::ops::Deref for Sim {
    type Target = cobbyd::sim::SimHandle;
    fn deref(&self) -> &Self::Target {
        self.handle.as_ref().unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
