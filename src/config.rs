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
/// `file: key: problem`, the `check-config` contract, one line per problem
/// when there are several (`others`).
#[derive(Debug)]
pub struct ConfigError {
    /// The file path, or `environment` for a `COBBYD__` variable.
    pub source_name: String,
    /// Dotted key (`probe.interval`), or `-` when the file as a whole is bad.
    pub key: String,
    /// Why, with the file's line where it is known (`(line 7)`).
    pub problem: String,
    /// The further problems found in the same configuration, in file order.
    pub others: Vec<ConfigError>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.source_name, self.key, self.problem)?;
        for e in &self.others {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(source_name: &str, key: &str, problem: String) -> ConfigError {
        ConfigError {
            source_name: source_name.to_string(),
            key: key.to_string(),
            problem,
            others: Vec::new(),
        }
    }

    /// The first problem, carrying the others.
    fn gather(mut all: Vec<ConfigError>) -> Option<ConfigError> {
        if all.is_empty() {
            return None;
        }
        let mut first = all.remove(0);
        first.others = all;
        Some(first)
    }

    /// Every problem, this one first.
    pub fn all(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(self).chain(self.others.iter())
    }
}

/// A loaded configuration and the file it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file that was read; `None` when the default path was absent.
    pub path: Option<PathBuf>,
}

/// A reload: the configuration in force and the one just read. Each part
/// of the daemon applies what concerns it; [`ConfigChange::restart_keys`]
/// names the changed keys that only a restart applies.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    pub old: std::sync::Arc<Config>,
    pub new: std::sync::Arc<Config>,
}

/// Whether a key differs between two configurations.
type Changed = fn(&Config, &Config) -> bool;

/// Keys read once at start-up (the socket and the database are open, the
/// listener bound): a reload cannot apply them.
const RESTART_ONLY: &[(&str, Changed)] = &[
    ("daemon.state_dir", |a, b| {
        a.daemon.state_dir != b.daemon.state_dir
    }),
    ("daemon.socket", |a, b| a.daemon.socket != b.daemon.socket),
    ("daemon.socket_group", |a, b| {
        a.daemon.socket_group != b.daemon.socket_group
    }),
    ("daemon.max_connections", |a, b| {
        a.daemon.max_connections != b.daemon.max_connections
    }),
    ("daemon.cache_mb", |a, b| {
        a.daemon.cache_mb != b.daemon.cache_mb
    }),
    ("metrics.listen", |a, b| {
        a.metrics.listen != b.metrics.listen
    }),
];

impl ConfigChange {
    pub fn new(old: std::sync::Arc<Config>, new: std::sync::Arc<Config>) -> ConfigChange {
        ConfigChange { old, new }
    }

    /// The changed keys that take effect only at the next restart.
    pub fn restart_keys(&self) -> Vec<&'static str> {
        RESTART_ONLY
            .iter()
            .filter(|(_, changed)| changed(&self.old, &self.new))
            .map(|(key, _)| *key)
            .collect()
    }
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
    let bad = |key: &str, problem: String| ConfigError::new(&shown, key, problem);
    // Read under the cap whatever the path is (a device such as /dev/zero
    // reports size 0 and never ends).
    let text = match crate::bounded::read_text(&path, MAX_CONFIG_BYTES) {
        Ok(text) => Some(text),
        Err(crate::bounded::ReadError::Io(e))
            if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() =>
        {
            None
        }
        Err(crate::bounded::ReadError::TooLarge { .. }) => {
            return Err(bad(
                "-",
                format!(
                    "the file is larger than {MAX_CONFIG_BYTES} bytes, the most a config may be"
                ),
            ));
        }
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
/// The error is the first problem and carries every other one found
/// ([`ConfigError::all`]): all unknown keys and all bad values.
pub fn parse(
    shown: &str,
    text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    parse_all(shown, text, env).map_err(|all| {
        ConfigError::gather(all).unwrap_or_else(|| ConfigError::new(shown, "-", "refused".into()))
    })
}

/// [`parse`], with every problem in a list (never empty on `Err`).
fn parse_all(
    shown: &str,
    text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, Vec<ConfigError>> {
    let bad = |key: &str, problem: String| ConfigError::new(shown, key, problem);
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("COBBYD__"))
        .collect();
    // A value set by the environment is reported as coming from there;
    // one from the file with the file's line when it can be found.
    let located = |key: &str, problem: String| -> ConfigError {
        let env_name = format!("COBBYD__{}", key.replace('.', "__").to_uppercase());
        let key = if key == "." || key.is_empty() {
            "-"
        } else {
            key
        };
        if env.contains_key(&env_name) {
            ConfigError::new(&format!("environment {env_name}"), key, problem)
        } else {
            match text.and_then(|t| line_of(t, key)) {
                Some(line) => bad(key, format!("{problem} (line {line})")),
                None => bad(key, problem),
            }
        }
    };
    let mut builder = config::Config::builder();
    if let Some(text) = text {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(vec![bad(
                "-",
                format!(
                    "file is {} bytes; a config is at most {MAX_CONFIG_BYTES}",
                    text.len()
                ),
            )]);
        }
        // Parse with `toml` first: its errors carry the place.
        if let Err(e) = text.parse::<toml::Table>() {
            let at = e
                .span()
                .map(|span| {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                    let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            return Err(vec![bad(
                "-",
                format!("not valid TOML{at}: {}", e.message().trim()),
            )]);
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
    let built = builder.build().map_err(|e| vec![bad("-", e.to_string())])?;
    let mut value: serde_json::Value = built
        .try_deserialize()
        .map_err(|e| vec![bad("-", clean_serde_message(&e.to_string()))])?;
    let mut errors = Vec::new();
    // Every problem, not only the first: unknown keys found against the
    // defaults' shape, then each bad value reported and set aside (its
    // default stands in) until the rest deserializes.
    for key in unknown_keys(&mut value) {
        let (section, field) = key.rsplit_once('.').unwrap_or(("", key.as_str()));
        errors.push(located(&key, unknown_field_message(section, field)));
    }
    let mut config = None;
    for _ in 0..=64 {
        match serde_path_to_error::deserialize::<_, Config>(&value) {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(e) => {
                let key = e.path().to_string();
                errors.push(located(
                    &key,
                    clean_serde_message(&e.into_inner().to_string()),
                ));
                if !remove_path(&mut value, &key) {
                    break;
                }
            }
        }
    }
    if let Some(c) = &config {
        for (key, problem) in validate(c) {
            // A value already refused stands in as its default: nothing
            // more to say about it.
            if !errors.iter().any(|e| e.key == key) {
                errors.push(located(key, problem));
            }
        }
    }
    match config {
        Some(c) if errors.is_empty() => Ok(c),
        _ => {
            if errors.is_empty() {
                errors.push(bad("-", "cannot be read as a configuration".into()));
            }
            // File order: line, then as found.
            errors.sort_by_key(|e| problem_line(&e.problem).unwrap_or(usize::MAX));
            Err(errors)
        }
    }
}

/// The line a problem names (`... (line 7)`).
fn problem_line(problem: &str) -> Option<usize> {
    problem
        .strip_suffix(')')?
        .rsplit_once("(line ")?
        .1
        .parse()
        .ok()
}

/// Removes (and returns, dotted) every key the configuration does not
/// have: the sections and keys of [`Config::default`].
fn unknown_keys(value: &mut serde_json::Value) -> Vec<String> {
    let known = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut unknown = Vec::new();
    let Some(top) = value.as_object_mut() else {
        return unknown;
    };
    top.retain(|section, body| match known.get(section) {
        None => {
            unknown.push(section.clone());
            false
        }
        Some(fields) => {
            if let Some(body) = body.as_object_mut() {
                body.retain(|k, _| {
                    let ok = fields.get(k).is_some();
                    if !ok {
                        unknown.push(format!("{section}.{k}"));
                    }
                    ok
                });
            }
            true
        }
    });
    unknown
}

/// What an unknown key is told: the keys its section has, and the one it
/// is probably a typo of.
fn unknown_field_message(section: &str, field: &str) -> String {
    let known = serde_json::to_value(Config::default()).unwrap_or_default();
    let names: Vec<String> = if section.is_empty() {
        known
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    } else {
        known
            .get(section)
            .and_then(|o| o.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let close = names
        .iter()
        .map(|n| (edit_distance(n, field), n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4))
        .min();
    let mut msg = format!(
        "unknown field `{field}`, expected one of {}",
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((_, n)) = close {
        msg.push_str(&format!(" (did you mean `{n}`?)"));
    }
    msg
}

/// Levenshtein distance of two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Removes a dotted key; false when there is nothing there to remove.
fn remove_path(value: &mut serde_json::Value, key: &str) -> bool {
    if key == "." || key.is_empty() {
        return false;
    }
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut v = value;
    for p in parts {
        match v.get_mut(p) {
            Some(next) => v = next,
            None => return false,
        }
    }
    v.as_object_mut().is_some_and(|o| o.remove(last).is_some())
}

/// The line of a dotted key (`sync.page_size`, or a section `deamon`) in
/// a TOML text, found the simple way: `[section]` headers and `key =`
/// lines, enough for a config file as people write it.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (section, field) = match key.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (key, None),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_string();
            if field.is_none() && current == section {
                return Some(i + 1);
            }
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        let k = k.trim().trim_matches('"');
        let hit = match field {
            Some(f) => (current == section && k == f) || (current.is_empty() && k == key),
            None => current.is_empty() && (k == section || k.starts_with(&format!("{section}."))),
        };
        if hit {
            return Some(i + 1);
        }
    }
    None
}

/// The `config` crate appends its own location; keep serde's reason only.
fn clean_serde_message(msg: &str) -> String {
    msg.split(" for key `")
        .next()
        .unwrap_or(msg)
        .trim()
        .to_string()
}

/// Checks the values serde cannot: ranges and relations. Every problem.
fn validate(c: &Config) -> Vec<(&'static str, String)> {
    let mut bad = Vec::new();
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
            bad.push((key, "must be longer than zero".into()));
        }
    }
    if c.probe.backoff_initial > c.probe.backoff_max {
        bad.push((
            "probe.backoff_initial",
            format!(
                "is longer than probe.backoff_max ({}); make it shorter",
                humantime::format_duration(c.probe.backoff_max)
            ),
        ));
    }
    if !(1..=10_000).contains(&c.sync.page_size) {
        bad.push((
            "sync.page_size",
            "must be between 1 and 10000 (Magento's default cap is 300)".into(),
        ));
    }
    if !(1..=256).contains(&c.sync.max_concurrent_syncs) {
        bad.push((
            "sync.max_concurrent_syncs",
            "must be between 1 and 256".into(),
        ));
    }
    if !(1..=16).contains(&c.sync.shop_concurrency) {
        bad.push(("sync.shop_concurrency", "must be between 1 and 16".into()));
    }
    if !(1..=1000).contains(&c.sync.m1_batch_size) {
        bad.push(("sync.m1_batch_size", "must be between 1 and 1000".into()));
    }
    if !(1..=1_000_000).contains(&c.sync.m1_id_range) {
        bad.push(("sync.m1_id_range", "must be between 1 and 1000000".into()));
    }
    if !(1..=4096).contains(&c.sync.max_response_mb) {
        bad.push(("sync.max_response_mb", "must be between 1 and 4096".into()));
    }
    if !(1..=10_000).contains(&c.sync.keep_runs) {
        bad.push(("sync.keep_runs", "must be between 1 and 10000".into()));
    }
    // NaN fails the range check too.
    if !(0.0..=1.0).contains(&c.sync.max_delete_share) {
        bad.push((
            "sync.max_delete_share",
            "must be a share between 0 and 1 (0.1: at most 10% of a mirror per run)".into(),
        ));
    }
    if !(1..=4096).contains(&c.daemon.max_connections) {
        bad.push((
            "daemon.max_connections",
            "must be between 1 and 4096".into(),
        ));
    }
    if !(1..=65536).contains(&c.daemon.cache_mb) {
        bad.push(("daemon.cache_mb", "must be between 1 and 65536".into()));
    }
    if c.daemon.state_dir.as_os_str().is_empty() || !c.daemon.state_dir.is_absolute() {
        bad.push(("daemon.state_dir", "must be an absolute path".into()));
    }
    if c.daemon.socket.as_os_str().is_empty() || !c.daemon.socket.is_absolute() {
        bad.push(("daemon.socket", "must be an absolute path".into()));
    }
    // sun_path is 108 bytes on Linux, including the terminating NUL.
    if c.daemon.socket.as_os_str().len() > 107 {
        bad.push((
            "daemon.socket",
            "is longer than the 107 bytes a Unix socket path may have".into(),
        ));
    }
    if let Err(e) = crate::logging::parse_filter(&c.daemon.log_level) {
        bad.push((
            "daemon.log_level",
            format!("is not a log filter ({e}); use e.g. \"info\" or \"cobbyd=debug,warn\""),
        ));
    }
    bad
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

    #[test]
    fn a_reload_names_only_the_changed_keys_a_restart_applies() {
        let old = load_text("[daemon]\nlog_level = \"info\"\n", &[]).unwrap();
        let new = load_text(
            "[daemon]\nlog_level = \"debug\"\nsocket = \"/tmp/other.sock\"\n[sync]\npage_size = 50\n",
            &[],
        )
        .unwrap();
        let change = ConfigChange::new(old.config.clone().into(), new.config.clone().into());
        assert_eq!(change.restart_keys(), ["daemon.socket"]);
        let same = ConfigChange::new(old.config.clone().into(), old.config.into());
        assert!(same.restart_keys().is_empty());
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

    /// `check-config` names every problem, not only the first, each with
    /// its line, in file order.
    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "[probe]\ninterval = \"soon\"\n\n[sync]\npage_sise = 100\npage_size = 0\nkeep_runs = \"x\"\n[deamon]\nsocket = \"/x\"\n";
        let e = load_text(text, &[]).unwrap_err();
        let all: Vec<(&str, &str)> = e
            .all()
            .map(|e| (e.key.as_str(), e.problem.as_str()))
            .collect();
        assert_eq!(all.len(), 5, "{e}");
        assert_eq!(all[0].0, "probe.interval", "{e}");
        assert!(all[0].1.ends_with("(line 2)"), "{e}");
        assert_eq!(all[1].0, "sync.page_sise", "{e}");
        assert!(all[1].1.contains("did you mean `page_size`?"), "{e}");
        assert!(all[1].1.ends_with("(line 5)"), "{e}");
        assert_eq!(all[2].0, "sync.page_size", "{e}");
        assert_eq!(all[3].0, "sync.keep_runs", "{e}");
        assert_eq!(all[4].0, "deamon", "{e}");
        assert!(all[4].1.contains("did you mean `daemon`?"), "{e}");
        assert!(all[4].1.ends_with("(line 8)"), "{e}");
        // One `file: key: problem` line each.
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), 5, "{shown}");
        assert!(
            shown.lines().all(|l| l.starts_with(&e.source_name)),
            "{shown}"
        );
    }

    #[test]
    fn a_toml_syntax_error_names_its_line_and_column() {
        let e = load_text("[sync]\npage_size = 1\ninterval \"5m\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "-");
        assert!(
            e.problem.starts_with("not valid TOML at line 3, column"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "{e}");
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
