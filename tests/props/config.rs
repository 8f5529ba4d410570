//! Config loader: arbitrary TOML text and `COBBYD__` values; values that
//! parse are preserved; errors name their source and key.

use cobbyd::config;
use cobbyd::fuzzing;
use proptest::prelude::*;
use std::time::Duration;

/// (section, key, TOML value, env value, expected when read back).
#[derive(Debug, Clone)]
enum Expect {
    Secs(u64),
    Int(u64),
    Text(String),
}

fn setting() -> impl Strategy<Value = (&'static str, &'static str, Expect)> {
    let dur = |s: &'static str, k: &'static str| {
        (1u64..10_000_000).prop_map(move |n| (s, k, Expect::Secs(n)))
    };
    let int = |s: &'static str, k: &'static str, lo: u64, hi: u64| {
        (lo..=hi).prop_map(move |n| (s, k, Expect::Int(n)))
    };
    prop_oneof![
        dur("probe", "interval"),
        dur("probe", "timeout"),
        dur("probe", "down_after"),
        dur("sync", "interval"),
        dur("sync", "full_interval"),
        dur("sync", "request_timeout"),
        dur("daemon", "shutdown_timeout"),
        int("sync", "page_size", 1, 10_000),
        int("sync", "max_concurrent_syncs", 1, 256),
        int("sync", "shop_concurrency", 1, 16),
        int("sync", "m1_batch_size", 1, 1000),
        int("sync", "keep_runs", 1, 10_000),
        int("daemon", "max_connections", 1, 4096),
        "[a-z]{1,10}".prop_map(|g| ("daemon", "socket_group", Expect::Text(g))),
        "(/[a-z0-9_.-]{1,12}){1,4}".prop_map(|p| ("daemon", "state_dir", Expect::Text(p))),
        prop::sample::select(vec!["info", "debug", "warn", "cobbyd=debug,warn", "error"])
            .prop_map(|l| ("daemon", "log_level", Expect::Text(l.to_string()))),
    ]
}

fn literal(e: &Expect) -> (String, String) {
    match e {
        Expect::Secs(n) => (format!("\"{n}s\""), format!("{n}s")),
        Expect::Int(n) => (n.to_string(), n.to_string()),
        Expect::Text(t) => (format!("{t:?}"), t.clone()),
    }
}

fn read_back(c: &config::Config, section: &str, key: &str) -> String {
    let v = serde_json::to_value(c).unwrap();
    match &v[section][key] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn expected(e: &Expect) -> String {
    match e {
        Expect::Secs(n) => humantime::format_duration(Duration::from_secs(*n)).to_string(),
        Expect::Int(n) => n.to_string(),
        Expect::Text(t) => t.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    /// A value that parses is the value in force, whether it came from the
    /// file or from the environment.
    #[test]
    fn values_that_parse_are_preserved(settings in prop::collection::vec(setting(), 1..8),
                                       via_env in prop::collection::vec(any::<bool>(), 8)) {
        let mut seen = std::collections::BTreeMap::new();
        for (i, (section, key, e)) in settings.into_iter().enumerate() {
            seen.entry((section, key)).or_insert((via_env[i], e));
        }
        let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
        let mut env = Vec::new();
        for ((section, key), (in_env, e)) in &seen {
            let (toml_lit, env_lit) = literal(e);
            if *in_env {
                env.push((format!("COBBYD__{}__{}", section.to_uppercase(), key.to_uppercase()), env_lit));
            } else {
                sections.entry(section).or_default().push_str(&format!("{key} = {toml_lit}\n"));
            }
        }
        let text: String = sections.iter().map(|(s, body)| format!("[{s}]\n{body}")).collect();
        let c = config::parse("t.toml", Some(&text), env.clone())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}\n{env:?}")))?;
        for ((section, key), (_, e)) in &seen {
            prop_assert_eq!(read_back(&c, section, key), expected(e), "{}.{}", section, key);
        }
        fuzzing::check_config_text(&text, env);
    }

    #[test]
    fn arbitrary_text_is_refused_cleanly(text in ".{0,300}") {
        fuzzing::check_config_text(&text, Vec::new());
    }

    #[test]
    fn arbitrary_toml_shaped_text(lines in prop::collection::vec(
        ("\\[?(daemon|probe|sync|metrics|x)\\]?", "[a-z_]{1,20}", "(\"[^\"\\\\]{0,12}\"|[0-9-]{1,12}|true|\\[\\]|\\{\\})"), 0..8)) {
        let text: String = lines.iter().map(|(s, k, v)| {
            if s.starts_with('[') && s.ends_with(']') { format!("{s}\n{k} = {v}\n") } else { format!("{k} = {v}\n") }
        }).collect();
        fuzzing::check_config_text(&text, Vec::new());
    }

    /// An environment value the config refuses is reported as coming from
    /// the environment variable, whatever the reason (type or range).
    #[test]
    fn env_errors_name_the_variable(key in prop::sample::select(vec![
            "SYNC__PAGE_SIZE", "SYNC__INTERVAL", "PROBE__TIMEOUT", "DAEMON__MAX_CONNECTIONS",
            "DAEMON__STATE_DIR", "SYNC__KEEP_RUNS", "DAEMON__LOG_LEVEL", "METRICS__LISTEN",
            "SYNC__MAX_RESPONSE_MB", "DAEMON__SOCKET"]),
        value in prop_oneof![".{0,12}", "-?[0-9]{1,25}", "[0-9]{1,4}(ms|s|h|d|y)", Just(String::new())]) {
        let var = format!("COBBYD__{key}");
        if let Err(e) = config::parse("t.toml", Some(""), vec![(var.clone(), value.clone())]) {
            prop_assert_eq!(&e.source_name, &format!("environment {var}"), "{} for {:?}", e, value);
            prop_assert_eq!(e.key.to_uppercase().replace('.', "__"), key);
        }
        fuzzing::check_config_text("", vec![(var, value)]);
    }
}

/// A config bigger than the cap is refused by size, not parsed.
#[test]
fn huge_config_is_refused_by_size() {
    let text = format!("# {}\n", "x".repeat(2 << 20));
    let e = config::parse("big.toml", Some(&text), Vec::new()).unwrap_err();
    assert!(e.problem.contains("at most"), "{e}");
}

/// Deeply nested TOML is refused by the parser's depth limit.
#[test]
fn deep_toml_is_refused() {
    for text in [
        format!("x = {}", "[".repeat(100_000)),
        format!("x = {}", "{a = ".repeat(100_000)),
        format!("[{}]", "a.".repeat(50_000) + "b"),
    ] {
        fuzzing::check_config_text(&text, Vec::new());
    }
}
