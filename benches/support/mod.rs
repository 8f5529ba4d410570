//! What the benchmarks share: a daemon child process on a temporary state
//! directory (errors as `Result`, never a panic mid-measurement), and
//! readings of `/proc` and of the disk.

#![allow(dead_code)]

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness;

pub const BIN: &str = env!("CARGO_BIN_EXE_cobbyd");
// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

pub struct Daemon {
    pub _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(extra: &str) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("cobbyd-bench").tempdir()?;
        let config = dir.path().join("cobbyd.toml");
        let socket = dir.path().join("cobbyd.sock");
        let state_dir = dir.path().join("state");
        let log_path = dir.path().join("daemon.log");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\nsocket_group = \"cobbyd-bench-no-such-group\"\nlog_level = \"info\"\n\n{extra}\n",
                state_dir.display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(BIN);
        // If the bench dies without unwinding (Ctrl-C), the daemon stops too.
        // SAFETY: the closure only makes one async-signal-safe system call.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {BIN}"))?;
        let mut d = Daemon {
            _dir: dir,
            config,
            socket,
            state_dir,
            log_path,
            child: Some(child),
        };
        let t = Instant::now();
        loop {
            if let Ok((200, _)) = http_unix(&d.socket, "GET", "/health") {
                return Ok(d);
            }
            d.check_alive()?;
            if t.elapsed() > Duration::from_secs(60) {
                bail!("daemon not ready within 60 s\n{}", d.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("the daemon exited ({status})\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "daemon log ({}), last lines:\n{}",
            self.log_path.display(),
            lines[from..].join("\n")
        )
    }

    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output> {
        let mut child = Command::new(BIN)
            .args(args)
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
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(s) = stdin
            && let Some(mut w) = child.stdin.take()
        {
            w.write_all(s.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// The shop's status object.
    pub fn shop(&self, name: &str) -> Result<Value> {
        let (code, body) = http_unix(&self.socket, "GET", &format!("/v1/status?shop={name}"))?;
        if code != 200 {
            bail!("GET /v1/status: {code} {body}");
        }
        let v: Value = serde_json::from_str(&body).context("status JSON")?;
        Ok(v["shops"][0].clone())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 request over a Unix socket: the integration tests' client.
pub fn http_unix(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    Ok(harness::http_unix(socket, method, path, None)?)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
pub fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {field}"))
}

/// User + system CPU seconds a process has used so far.
pub fn proc_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {i}"))
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// (allocated bytes as du counts them, apparent bytes) of a directory tree.
pub fn dir_size(p: &Path) -> Result<(u64, u64)> {
    let (mut du, mut apparent) = (0, 0);
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        if m.is_dir() {
            let (a, b) = dir_size(&e.path())?;
            du += a;
            apparent += b;
        } else {
            du += m.blocks() * 512;
            apparent += m.len();
        }
    }
    Ok((du, apparent))
}

pub fn median_ms(v: &[f64]) -> f64 {
    percentile_ms(v, 0.5)
}

pub fn percentile_ms(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A benchmark's `main`: parses its arguments, runs it, prints the JSON
/// report when asked; exit 2 for bad arguments, 1 for a failed run.
pub fn main<A>(
    name: &str,
    parse: fn() -> Result<A>,
    run: fn(&A) -> Result<Value>,
    json: fn(&A) -> bool,
) -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name} bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(v) => {
            if json(&args) {
                println!("{v}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} bench failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reads `--name value` / `--name=value` arguments: `f(name, value)` applies
/// one (`value` fetches its value) and says whether it knew the name.
/// `--bench` (which cargo passes) is skipped; `--help` prints `usage`.
pub fn each_arg(
    usage: &str,
    mut f: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<()> {
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        match name.as_str() {
            "--bench" => continue,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            _ => {}
        }
        let mut value = || -> Result<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| anyhow!("{name} needs a value\n{usage}"))
        };
        if !f(&name, &mut value)? {
            bail!("unknown argument {name:?}\n{usage}");
        }
    }
    Ok(())
}
