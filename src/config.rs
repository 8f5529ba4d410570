//! Configuration: built-in defaults, then the TOML file, then
//! `COBBYD__SECTION__KEY` environment variables (layered by the `config`
//! crate). Unknown keys and bad values are refused with the file, the key and
//! the reason, so `cobbyd check-config` can say exactly what to fix.

use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cobbyd/cobbyd.toml";
/// Largest config file read; a config is a few KiB.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The whole configuration. Every key is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub probe: ProbeConfig,
    pub sync: SyncConfig,
    pub metrics: MetricsConfig,
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The sled database and the lock file live here.
    pub state_dir: PathBuf,
    /// The control socket (HTTP/1.1 over a Unix socket).
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660). Missing group: a warning.
    pub socket_group: String,
    /// How long running work may take to finish after SIGTERM.
    #[serde(with = "human")]
    pub shutdown_timeout: Duration,
    /// Log filter (`info`, `debug`, `cobbyd=debug,warn`); `RUST_LOG` wins.
    pub log_level: String,
    /// Most control connections served at once.
    pub max_connections: usize,
    /// sled page cache, in MiB.
    pub cache_mb: u64,
}

/// `[probe]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Between probes of a healthy shop (plus per-shop jitter).
    #[serde(with = "human")]
    pub interval: Duration,
    /// Per probe request.
    #[serde(with = "human")]
    pub timeout: Duration,
    /// First retry delay of a failing shop; grows exponentially with jitter.
    #[serde(with = "human")]
    pub backoff_initial: Duration,
    /// Ceiling of the retry delay; credential failures wait this long.
    #[serde(with = "human")]
    pub backoff_max: Duration,
    /// A shop unreachable for longer than this is `down`, not `degraded`.
    #[serde(with = "human")]
    pub down_after: Duration,
}

/// `[sync]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Between incremental syncs of a shop (plus per-shop jitter).
    #[serde(with = "human")]
    pub interval: Duration,
    /// Between full reconciles (finds deletions).
    #[serde(with = "human")]
    pub full_interval: Duration,
    /// Products per page (Magento 2 caps it at 300 by default).
    pub page_size: u32,
    /// Syncs running at once across all shops.
    pub max_concurrent_syncs: usize,
    /// Requests in flight per shop during a sync.
    pub shop_concurrency: usize,
    /// Per sync request.
    #[serde(with = "human")]
    pub request_timeout: Duration,
    /// Magento 1: products per `multiCall` of `catalog_product.info`.
    pub m1_batch_size: u32,
    /// Magento 1: width of a `product_id` range per `catalog_product.list`.
    pub m1_id_range: u32,
    /// Largest answer body accepted from a shop, in MiB.
    pub max_response_mb: u64,
    /// Sync runs kept per shop in the `runs` tree.
    pub keep_runs: usize,
    /// Largest share of a store view's mirror (0..=1) one full reconcile
    /// may delete; a run that would delete more deletes nothing and asks
    /// for `cobbyd sync NAME --full --allow-mass-delete`.
    pub max_delete_share: f64,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Optional TCP listener for Prometheus (`"127.0.0.1:9184"`); off when absent.
    pub listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state_dir: PathBuf::from("/var/lib/cobbyd"),
            socket: PathBuf::from("/run/cobbyd/cobbyd.sock"),
            socket_group: "cobbyd".into(),
            shutdown_timeout: Duration::from_secs(30),
            log_level: "info".into(),
            max_connections: 64,
            cache_mb: 16,
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            down_after: Duration::from_secs(300),
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            interval: Duration::from_secs(15 * 60),
            full_interval: Duration::from_secs(24 * 3600),
            page_size: 200,
            max_concurrent_syncs: 4,
            shop_concurrency: 2,
            request_timeout: Duration::from_secs(60),
            m1_batch_size: 50,
            m1_id_range: 1000,
            max_response_mb: 64,
            keep_runs: 20,
            max_delete_share: 0.1,
        }
    }
}

/// A refused configuration: where, which key, why. Displays as
/// `file: key: problem`, the `check-config` contract.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {key}: {problem}")]
pub struct ConfigError {
    /// The file path, or `environment` for a `COBBYD__` variable.
    pub source_name: String,
    /// Dotted key (`probe.interval`), or `-` when the file as a whole is bad.
    pub key: String,
    pub problem: String,
}

/// A loaded configuration and the file it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file that was read; `None` when the default path was absent.
    pub path: Option<PathBuf>,
}

/// Reads the configuration. `explicit` is `--config`: when given, the file
/// must exist; the default path may be absent (built-in defaults apply).
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    load_with_env(explicit, std::env::vars())
}

/// [`load`] with the environment given, for tests.
pub fn load_with_env(
    explicit: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let path = explicit.map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), Path::to_path_buf);
    let shown = path.display().to_string();
    let bad = |key: &str, problem: String| ConfigError {
        source_name: shown.clone(),
        key: key.to_string(),
        problem,
    };
    let text = match std::fs::metadata(&path) {
        Ok(meta) if meta.len() > MAX_CONFIG_BYTES => {
            return Err(bad(
                "-",
                format!(
                    "file is {} bytes; a config is at most {MAX_CONFIG_BYTES}",
                    meta.len()
                ),
            ));
        }
        Ok(_) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| bad("-", format!("cannot read the file: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => None,
        Err(e) => return Err(bad("-", format!("cannot read the file: {e}"))),
    };
    let config = parse(&shown, text.as_deref(), env)?;
    Ok(Loaded {
        config,
        path: text.map(|_| path),
    })
}

/// Parses a configuration from its text (`None`: no file, defaults) and
/// the environment; `shown` names the file in errors. No file system
/// access: [`load_with_env`] reads the file, the fuzz targets call this.
pub fn parse(
    shown: &str,
    text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let bad = |key: &str, problem: String| ConfigError {
        source_name: shown.to_string(),
        key: key.to_string(),
        problem,
    };
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("COBBYD__"))
        .collect();
    let mut builder = config::Config::builder();
    if let Some(text) = text {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(bad(
                "-",
                format!(
                    "file is {} bytes; a config is at most {MAX_CONFIG_BYTES}",
                    text.len()
                ),
            ));
        }
        // Parse with `toml` first: its errors carry line and column.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(bad(
                "-",
                format!("not valid TOML: {}", e.to_string().trim()),
            ));
        }
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("COBBYD")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(env.clone().into_iter().collect())),
    );
    let built = builder.build().map_err(|e| bad("-", e.to_string()))?;
    let config: Config = serde_path_to_error::deserialize(built).map_err(|e| {
        let key = e.path().to_string();
        let env_name = format!("COBBYD__{}", key.replace('.', "__").to_uppercase());
        let source_name = if env.contains_key(&env_name) {
            format!("environment {env_name}")
        } else {
            shown.to_string()
        };
        ConfigError {
            source_name,
            // `.` or nothing: the top level (e.g. the variable `COBBYD__`).
            key: if key == "." || key.is_empty() {
                "-".into()
            } else {
                key
            },
            problem: clean_serde_message(&e.into_inner().to_string()),
        }
    })?;
    validate(&config).map_err(|(key, problem)| {
        // A value set by the environment is reported as coming from there.
        let env_name = format!("COBBYD__{}", key.replace('.', "__").to_uppercase());
        if env.contains_key(&env_name) {
            ConfigError {
                source_name: format!("environment {env_name}"),
                key: key.to_string(),
                problem,
            }
        } else {
            bad(key, problem)
        }
    })?;
    Ok(config)
}

/// The `config` crate appends its own location; keep serde's reason only.
fn clean_serde_message(msg: &str) -> String {
    msg.split(" for key `")
        .next()
        .unwrap_or(msg)
        .trim()
        .to_string()
}

/// Checks the values serde cannot: ranges and relations.
fn validate(c: &Config) -> Result<(), (&'static str, String)> {
    let nonzero = [
        ("daemon.shutdown_timeout", c.daemon.shutdown_timeout),
        ("probe.interval", c.probe.interval),
        ("probe.timeout", c.probe.timeout),
        ("probe.backoff_initial", c.probe.backoff_initial),
        ("probe.backoff_max", c.probe.backoff_max),
        ("sync.interval", c.sync.interval),
        ("sync.full_interval", c.sync.full_interval),
        ("sync.request_timeout", c.sync.request_timeout),
    ];
    for (key, d) in nonzero {
        if d.is_zero() {
            return Err((key, "must be longer than zero".into()));
        }
    }
    if c.probe.backoff_initial > c.probe.backoff_max {
        return Err((
            "probe.backoff_initial",
            format!(
                "is longer than probe.backoff_max ({}); make it shorter",
                humantime::format_duration(c.probe.backoff_max)
            ),
        ));
    }
    if !(1..=10_000).contains(&c.sync.page_size) {
        return Err((
            "sync.page_size",
            "must be between 1 and 10000 (Magento's default cap is 300)".into(),
        ));
    }
    if !(1..=256).contains(&c.sync.max_concurrent_syncs) {
        return Err((
            "sync.max_concurrent_syncs",
            "must be between 1 and 256".into(),
        ));
    }
    if !(1..=16).contains(&c.sync.shop_concurrency) {
        return Err(("sync.shop_concurrency", "must be between 1 and 16".into()));
    }
    if !(1..=1000).contains(&c.sync.m1_batch_size) {
        return Err(("sync.m1_batch_size", "must be between 1 and 1000".into()));
    }
    if !(1..=1_000_000).contains(&c.sync.m1_id_range) {
        return Err(("sync.m1_id_range", "must be between 1 and 1000000".into()));
    }
    if !(1..=4096).contains(&c.sync.max_response_mb) {
        return Err(("sync.max_response_mb", "must be between 1 and 4096".into()));
    }
    if !(1..=10_000).contains(&c.sync.keep_runs) {
        return Err(("sync.keep_runs", "must be between 1 and 10000".into()));
    }
    // NaN fails the range check too.
    if !(0.0..=1.0).contains(&c.sync.max_delete_share) {
        return Err((
            "sync.max_delete_share",
            "must be a share between 0 and 1 (0.1: at most 10% of a mirror per run)".into(),
        ));
    }
    if !(1..=4096).contains(&c.daemon.max_connections) {
        return Err((
            "daemon.max_connections",
            "must be between 1 and 4096".into(),
        ));
    }
    if !(1..=65536).contains(&c.daemon.cache_mb) {
        return Err(("daemon.cache_mb", "must be between 1 and 65536".into()));
    }
    if c.daemon.state_dir.as_os_str().is_empty() || !c.daemon.state_dir.is_absolute() {
        return Err(("daemon.state_dir", "must be an absolute path".into()));
    }
    if c.daemon.socket.as_os_str().is_empty() || !c.daemon.socket.is_absolute() {
        return Err(("daemon.socket", "must be an absolute path".into()));
    }
    // sun_path is 108 bytes on Linux, including the terminating NUL.
    if c.daemon.socket.as_os_str().len() > 107 {
        return Err((
            "daemon.socket",
            "is longer than the 107 bytes a Unix socket path may have".into(),
        ));
    }
    if let Err(e) = crate::logging::parse_filter(&c.daemon.log_level) {
        return Err((
            "daemon.log_level",
            format!("is not a log filter ({e}); use e.g. \"info\" or \"cobbyd=debug,warn\""),
        ));
    }
    Ok(())
}

/// Human durations (`"30s"`, `"15m"`, `"1h 30m"`) in and out.
mod human {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "must be a duration in quotes, such as \"30s\", \"15m\" or \"24h\"",
            )
        })?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write e.g. \"30s\", \"15m\" or \"24h\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_with_env(Some(f.path()), env)
    }

    /// Found by the `config` fuzz target: the variable `COBBYD__` (no key)
    /// gave an error with an empty key (`environment COBBYD__: : ...`).
    #[test]
    fn env_without_a_key_is_named() {
        let err = load_text("", &[("COBBYD__", "x")]).unwrap_err();
        assert_eq!(err.source_name, "environment COBBYD__");
        assert_eq!(err.key, "-");
        assert!(err.problem.contains("unknown field"), "{err}");
    }

    #[test]
    fn defaults_when_default_file_absent() {
        // The default path is absent on build machines; explicit paths must exist.
        let err = load_with_env(Some(Path::new("/nonexistent/cobbyd.toml")), vec![]).unwrap_err();
        assert_eq!(err.key, "-");
        assert!(err.problem.contains("cannot read"));
    }

    #[test]
    fn file_and_env_layers() {
        let l = load_text(
            "[probe]\ninterval = \"5s\"\n[sync]\npage_size = 50\n",
            &[
                ("COBBYD__SYNC__PAGE_SIZE", "77"),
                ("COBBYD__DAEMON__LOG_LEVEL", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(l.config.probe.interval, Duration::from_secs(5));
        assert_eq!(l.config.sync.page_size, 77);
        assert_eq!(l.config.daemon.log_level, "debug");
        assert_eq!(l.config.sync.interval, Duration::from_secs(900));
    }

    #[test]
    fn unknown_key_named() {
        let e = load_text("[probe]\nintervall = \"5s\"\n", &[]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("probe"), "{s}");
        assert!(s.contains("intervall"), "{s}");
        let e = load_text("[deamon]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("deamon"), "{e}");
    }

    #[test]
    fn bad_duration_named() {
        let e = load_text("[sync]\ninterval = \"soon\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "sync.interval", "{e}");
        assert!(e.problem.contains("not a duration"), "{e}");
        let e = load_text("[sync]\ninterval = 5\n", &[]).unwrap_err();
        assert_eq!(e.key, "sync.interval", "{e}");
        let e = load_text("", &[("COBBYD__PROBE__TIMEOUT", "xyz")]).unwrap_err();
        assert!(e.source_name.contains("COBBYD__PROBE__TIMEOUT"), "{e}");
    }

    #[test]
    fn ranges_checked() {
        let e = load_text("[sync]\npage_size = 0\n", &[]).unwrap_err();
        assert_eq!(e.key, "sync.page_size");
        let e = load_text(
            "[probe]\nbackoff_initial = \"1h\"\nbackoff_max = \"1m\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "probe.backoff_initial");
        let e = load_text("[daemon]\nlog_level = \"=\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "daemon.log_level");
        for bad in ["1.5", "-0.1", "nan"] {
            let e = load_text(&format!("[sync]\nmax_delete_share = {bad}\n"), &[]).unwrap_err();
            assert_eq!(e.key, "sync.max_delete_share", "{bad}: {e}");
        }
        for good in ["0", "0.25", "1"] {
            let l = load_text(&format!("[sync]\nmax_delete_share = {good}\n"), &[]).unwrap();
            assert_eq!(l.config.sync.max_delete_share, good.parse::<f64>().unwrap());
        }
        let l = load_text("", &[("COBBYD__SYNC__MAX_DELETE_SHARE", "0.5")]).unwrap();
        assert_eq!(l.config.sync.max_delete_share, 0.5);
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/cobbyd.toml");
        let l = load_with_env(Some(&path), vec![]).unwrap();
        // The example documents the defaults, apart from `metrics.listen`
        // which it shows commented out.
        assert_eq!(l.config, Config::default());
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("{key} = ")),
                "etc/cobbyd.toml lacks {key}"
            );
        }
        assert!(
            text.contains("listen = "),
            "etc/cobbyd.toml lacks metrics.listen"
        );
    }
}
