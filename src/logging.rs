//! Logging: the native journal protocol when stderr is the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), readable lines on
//! stderr otherwise. Event fields become journal fields in upper case, so
//! `shop = "acme"` is queried with `journalctl -u cobbyd SHOP=acme`.

use std::os::unix::fs::MetadataExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Changes the filter after a config reload.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    env_override: bool,
}

impl LogHandle {
    /// Applies `daemon.log_level` unless `RUST_LOG` is set (it wins).
    pub fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        match EnvFilter::builder().parse(level) {
            Ok(f) => {
                if let Err(e) = self.reload.reload(f) {
                    tracing::warn!(error = %e, "could not change the log level");
                }
            }
            Err(e) => tracing::warn!(error = %e, level, "invalid log level kept out"),
        }
    }
}

/// True when systemd connected stderr to the journal.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Installs the global subscriber for the daemon.
pub fn init_daemon(level: &str) -> LogHandle {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let env_override = rust_log.is_some();
    let filter = EnvFilter::builder()
        .parse(rust_log.as_deref().unwrap_or(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload) = reload::Layer::new(filter);
    let journal = if stderr_is_journal() {
        tracing_journald::layer()
            .ok()
            // No `F_` prefix: fields land as SHOP=, RUN=, JOB= so that
            // `journalctl -u cobbyd SHOP=acme` works. Our field names do
            // not collide with journald's own (MESSAGE, PRIORITY, ...).
            .map(|l| {
                l.with_syslog_identifier("cobbyd".into())
                    .with_field_prefix(None)
            })
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j.boxed()).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false)
                    .boxed(),
            )
            .init(),
    }
    LogHandle {
        reload,
        env_override,
    }
}

/// For client commands: warnings and errors only, to stderr.
pub fn init_client() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
