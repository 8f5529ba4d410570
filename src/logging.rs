//! Logging: the native journal protocol when stderr is the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), readable lines on
//! stderr otherwise. Event fields become journal fields in upper case, so
//! `shop = "acme"` is queried with `journalctl -u cobbyd SHOP=acme`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// True for the characters that must not reach a terminal or the journal
/// as they are: control characters (ESC starts terminal escape sequences,
/// CR/LF forge or split lines), the Unicode line and paragraph separators,
/// and the bidirectional controls that reorder what is shown (U+202E
/// "right-to-left override" makes `txt.exe` read as `exe.txt`).
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// Text from outside (a shop's message, a product's field) made safe to
/// show to a person or write to the journal: every character of
/// [`needs_escape`] becomes a visible escape (`\n`, `\r`, `\t`, `\u{1b}`,
/// `\u{202e}`); everything else is kept. The one escaping function of the
/// daemon and the CLI; JSON output is not passed through it (serde escapes
/// what JSON needs, and JSON consumers get the exact text).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Changes the filter after a config reload.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    env_override: bool,
}

/// Parses a log filter (`daemon.log_level`, `RUST_LOG`). Log filters are
/// ASCII; anything else is refused here because tracing-subscriber 0.3's
/// directive parser slices at byte offsets and panics on a multi-byte
/// character (found by the `config` fuzz target).
pub fn parse_filter(s: &str) -> Result<EnvFilter, String> {
    if s.len() > 4096 {
        return Err(format!(
            "{} bytes long; a log filter is at most 4096",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(format!("contains {c:?}; a log filter is plain ASCII"));
    }
    EnvFilter::builder().parse(s).map_err(|e| e.to_string())
}

/// `RUST_LOG`, when set and not empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty())
}

impl LogHandle {
    /// Applies `daemon.log_level` unless `RUST_LOG` is set (it wins).
    pub fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        match parse_filter(level) {
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

/// Field formatting for readable lines: every value through [`escape`], so
/// that text from a shop cannot split a log line (CR/LF) or reach the
/// terminal as escape sequences, whatever event carries it.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        if field.name() == "message" {
            write!(w, "{}", escape(&text))
        } else {
            write!(w, "{}={}", field.name(), escape(&text))
        }
    })
    .delimited(" ")
}

/// Installs the global subscriber for the daemon.
pub fn init_daemon(level: &str) -> LogHandle {
    let rust_log = rust_log();
    let env_override = rust_log.is_some();
    let filter = parse_filter(rust_log.as_deref().unwrap_or(level))
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
                    .fmt_fields(escaped_fields())
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
    let filter = rust_log()
        .and_then(|s| parse_filter(&s).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_controls_and_bidi_visible() {
        assert_eq!(escape("plain Größe"), "plain Größe");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\x1b[2Jb\r\nstate healthy\u{202e}txt\u{7f}\t"),
            "a\\u{1b}[2Jb\\r\\nstate healthy\\u{202e}txt\\u{7f}\\t"
        );
        assert_eq!(
            escape("\u{2028}\u{2066}\u{85}"),
            "\\u{2028}\\u{2066}\\u{85}"
        );
    }

    #[test]
    fn filters_with_multibyte_characters_are_refused_not_a_panic() {
        // The fuzz target's input: tracing-subscriber panicked on it.
        let e = parse_filter("rob \u{f1}\u{f1}[\u{f1}es\"").unwrap_err();
        assert!(e.contains("plain ASCII"), "{e}");
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("cobbyd=debug,warn").is_ok());
        assert!(parse_filter(&"a".repeat(5000)).is_err());
    }
}
