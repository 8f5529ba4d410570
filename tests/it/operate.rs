//! Operability: the demo, metrics checked against the Prometheus text
//! format, the man page and the completion scripts.
//!
//! Everything here runs with nothing but the Rust toolchain: the exposition
//! format and the roff are parsed in-process ([`exposition`], [`roff`]).
//! The external checkers (promtool, mandoc, zsh, fish) run on top when they
//! are installed; `COBBYD_REQUIRE_TOOLS=1` (set by .ci/run, which installs
//! them) makes a missing one a failure, elsewhere it is a visible skip.

use crate::harness::*;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// An external checker: its path when it is installed; `None` (after a
/// loud skip line) when it is not and `COBBYD_REQUIRE_TOOLS` is unset.
fn optional_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| {
                use std::os::unix::fs::PermissionsExt;
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    });
    let required = std::env::var_os("COBBYD_REQUIRE_TOOLS").is_some_and(|v| v == "1");
    match found {
        Some(p) => Some(p),
        None if required => panic!(
            "{name} is not installed and COBBYD_REQUIRE_TOOLS=1 requires it: run .ci/run or apt-get install it"
        ),
        None => {
            // Straight to the file descriptor: the test harness captures
            // `eprintln!` of passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: the extra check with {name} (not installed; the in-process check ran; .ci/run installs it and sets COBBYD_REQUIRE_TOOLS=1)"
            );
            None
        }
    }
}

/// The Prometheus text exposition format (version 0.0.4), checked the way
/// `promtool check metrics` does: the syntax of every line, one `# TYPE`
/// and `# HELP` per family before its samples, families not interleaved,
/// no series twice, counters named `_total`, histograms complete and
/// cumulative with the `+Inf` bucket equal to `_count`.
mod exposition {
    use std::collections::{BTreeMap, HashMap, HashSet};

    /// One sample: metric name, labels, value.
    #[derive(Debug, Clone)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    fn is_metric_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }

    fn is_label_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    }

    fn parse_value(s: &str) -> Option<f64> {
        match s {
            "+Inf" | "Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => s.parse().ok(),
            _ => None,
        }
    }

    /// `{a="x",b="y"}` (the braces included) → labels; the rest of the line.
    fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
        loop {
            rest = rest.trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix('}') {
                return Ok((labels, r));
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let name = rest[..eq].trim();
            if !is_label_name(name) {
                return Err(format!("bad label name {name:?}"));
            }
            rest = rest[eq + 1..]
                .trim_start_matches(' ')
                .strip_prefix('"')
                .ok_or_else(|| format!("label {name}: value not in double quotes"))?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err(format!("label {name}: unterminated value")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => {
                            return Err(format!("label {name}: bad escape {other:?}"));
                        }
                    },
                    Some((_, '\n')) => return Err(format!("label {name}: raw newline")),
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(name.to_string(), value).is_some() {
                return Err(format!("label {name} twice"));
            }
            rest = rest[end + 1..].trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err("expected ',' or '}' after a label".into());
            }
        }
    }

    /// The family a sample belongs to, given the declared types.
    fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return base;
            }
        }
        name
    }

    /// Checks a whole exposition; returns its samples.
    pub fn check(text: &str) -> Result<Vec<Sample>, String> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the last line does not end with a line feed".into());
        }
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut seen_samples: HashSet<String> = HashSet::new();
        let mut closed: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
        let mut samples = Vec::new();
        let mut enter = |fam: &str, current: &mut Option<String>| -> Result<(), String> {
            if current.as_deref() != Some(fam) {
                if closed.contains(fam) {
                    return Err(format!("the lines of {fam} are not one group"));
                }
                if let Some(c) = current.take() {
                    closed.insert(c);
                }
                *current = Some(fam.to_string());
            }
            Ok(())
        };
        for (i, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.trim_start().splitn(3, ' ');
                let word = parts.next().unwrap_or("");
                if word != "HELP" && word != "TYPE" {
                    continue;
                }
                let name = parts.next().unwrap_or("");
                if !is_metric_name(name) {
                    return Err(at(format!("bad metric name {name:?}")));
                }
                let arg = parts.next().unwrap_or("");
                enter(name, &mut current).map_err(at)?;
                if word == "TYPE" {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                        return Err(at(format!("unknown type {arg:?}")));
                    }
                    if seen_samples.contains(name) {
                        return Err(at("TYPE after the family's samples".into()));
                    }
                    if types.insert(name.to_string(), arg.to_string()).is_some() {
                        return Err(at("second TYPE line".into()));
                    }
                    if arg == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter's name should end in _total".into()));
                    }
                } else {
                    if !helps.insert(name.to_string()) {
                        return Err(at("second HELP line".into()));
                    }
                    if arg.trim().is_empty() {
                        return Err(at("empty HELP text".into()));
                    }
                    let mut esc = arg.chars();
                    while let Some(c) = esc.next() {
                        if c == '\\' && !matches!(esc.next(), Some('\\' | 'n')) {
                            return Err(at("bad escape in HELP".into()));
                        }
                    }
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(at)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let mut fields = rest.split(' ').filter(|f| !f.is_empty());
            let value = fields
                .next()
                .and_then(parse_value)
                .ok_or_else(|| at("bad or missing value".into()))?;
            if let Some(ts) = fields.next()
                && ts.parse::<i64>().is_err()
            {
                return Err(at(format!("bad timestamp {ts:?}")));
            }
            if fields.next().is_some() {
                return Err(at("text after the timestamp".into()));
            }
            let fam = family(name, &types).to_string();
            enter(&fam, &mut current).map_err(at)?;
            if !types.contains_key(&fam) {
                return Err(at(format!("no TYPE line for {fam}")));
            }
            if !helps.contains(&fam) {
                return Err(at(format!("no HELP line for {fam}")));
            }
            seen_samples.insert(fam.clone());
            if types[&fam] == "histogram" && name == fam {
                return Err(at("a histogram sample without _bucket/_sum/_count".into()));
            }
            if name.ends_with("_bucket") && types[&fam] == "histogram" {
                let le = labels
                    .get("le")
                    .ok_or_else(|| at("a bucket without le".into()))?;
                parse_value(le).ok_or_else(|| at(format!("bad le {le:?}")))?;
            }
            if !series.insert((name.to_string(), labels.clone())) {
                return Err(at("this series appears twice".into()));
            }
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        check_histograms(&samples, &types)?;
        Ok(samples)
    }

    /// Buckets cumulative, `+Inf` present and equal to `_count`, `_sum`
    /// and `_count` present, for every label set of every histogram.
    fn check_histograms(samples: &[Sample], types: &HashMap<String, String>) -> Result<(), String> {
        type Key = (String, BTreeMap<String, String>);
        let mut buckets: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
        let mut sums: HashSet<Key> = HashSet::new();
        for s in samples {
            let fam = family(&s.name, types);
            if types.get(fam).map(String::as_str) != Some("histogram") {
                continue;
            }
            let mut labels = s.labels.clone();
            if s.name.ends_with("_bucket") {
                let le = labels
                    .remove("le")
                    .and_then(|v| parse_value(&v))
                    .unwrap_or(f64::NAN);
                buckets
                    .entry((fam.to_string(), labels))
                    .or_default()
                    .push((le, s.value));
            } else if s.name.ends_with("_count") {
                counts.insert((fam.to_string(), labels), s.value);
            } else {
                sums.insert((fam.to_string(), labels));
            }
        }
        for (key, mut b) in buckets {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            if b.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{key:?}: buckets are not cumulative"));
            }
            let last = b.last().copied().unwrap_or((0.0, 0.0));
            if last.0 != f64::INFINITY {
                return Err(format!("{key:?}: no le=\"+Inf\" bucket"));
            }
            match counts.get(&key) {
                Some(c) if *c == last.1 => {}
                other => {
                    return Err(format!(
                        "{key:?}: _count {other:?} is not the +Inf bucket {}",
                        last.1
                    ));
                }
            }
            if !sums.contains(&key) {
                return Err(format!("{key:?}: no _sum"));
            }
        }
        Ok(())
    }
}

/// roff as clap_mangen writes it (the man(7) macros), checked the way
/// `mandoc -T lint` would complain: only known macros and requests, a
/// `.TH` with name, section 1 and a date before the first section, the
/// sections a man page needs, valid escapes, fonts set back on the line
/// they were changed, `.RS`/`.RE` balanced, a tag after every `.TP`.
/// Returns the page as plain text.
mod roff {
    const KNOWN: &[&str] = &[
        "TH", "SH", "SS", "PP", "P", "LP", "TP", "IP", "RS", "RE", "B", "I", "BR", "BI", "IB",
        "IR", "RB", "RI", "SM", "SB", "br", "sp", "nf", "fi", "ie", "el", "ds", "EX", "EE", "UR",
        "UE", "in", "ti",
    ];

    /// A text line's escapes replaced by what they print; an error for an
    /// escape roff does not know or a font left changed at the line's end.
    fn text(line: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut font_open = false;
        let mut chars = line.chars().peekable();
        let name = |chars: &mut std::iter::Peekable<std::str::Chars>| -> Result<String, String> {
            match chars.next() {
                Some('(') => Ok(chars.by_ref().take(2).collect()),
                Some('[') => Ok(chars.by_ref().take_while(|c| *c != ']').collect()),
                Some(c) => Ok(c.to_string()),
                None => Err("escape cut off at the line's end".into()),
            }
        };
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('\\') | Some('e') => out.push('\\'),
                Some('-') => out.push('-'),
                Some('&') | Some('|') | Some('^') => {}
                Some(' ') | Some('0') | Some('~') => out.push(' '),
                Some('f') => {
                    let f = name(&mut chars)?;
                    match f.as_str() {
                        "B" | "I" | "BI" | "CW" => font_open = true,
                        "R" | "P" => font_open = false,
                        other => return Err(format!("unknown font \\f{other}")),
                    }
                }
                Some('(') => {
                    let glyph: String = chars.by_ref().take(2).collect();
                    out.push_str(match glyph.as_str() {
                        "aq" => "'",
                        "dq" => "\"",
                        "em" | "en" => "-",
                        "bu" => "*",
                        other => return Err(format!("unknown glyph \\({other}")),
                    });
                }
                Some('*') => match name(&mut chars)?.as_str() {
                    "Aq" => out.push('\''),
                    other => return Err(format!("undefined string \\*({other}")),
                },
                Some('"') => break,
                other => return Err(format!("unknown escape \\{other:?}")),
            }
        }
        if font_open {
            return Err("a \\fB or \\fI is not set back with \\fR on its line".into());
        }
        Ok(out)
    }

    pub fn check(page: &str) -> Result<String, String> {
        let mut rendered = String::new();
        let mut sections = Vec::new();
        let mut th = false;
        let mut depth = 0i32;
        let mut want_tag = false;
        for (i, line) in page.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
            if let Some(req) = line.strip_prefix('.').or_else(|| line.strip_prefix('\'')) {
                let (mac, args) = req.split_once(' ').unwrap_or((req, ""));
                if !KNOWN.contains(&mac) {
                    return Err(at(format!("unknown macro .{mac}")));
                }
                if want_tag {
                    return Err(at(".TP without a tag line".into()));
                }
                match mac {
                    "ie" | "el" | "ds" => continue,
                    "TH" => {
                        let f: Vec<&str> = args.split_whitespace().collect();
                        if th || f.len() < 3 || f[1] != "1" {
                            return Err(at("want one .TH NAME 1 DATE".into()));
                        }
                        let d = f[2].as_bytes();
                        if !(d.len() == 10 && d[4] == b'-' && d[7] == b'-') {
                            return Err(at("the .TH date is not YYYY-MM-DD".into()));
                        }
                        th = true;
                        continue;
                    }
                    _ if !th => return Err(at("before .TH".into())),
                    "SH" | "SS" => {
                        if args.trim().is_empty() {
                            return Err(at("a section without a title".into()));
                        }
                        sections.push(args.trim().trim_matches('"').to_string());
                        rendered.push_str(&format!("\n{}\n", args.trim()));
                    }
                    "RS" => depth += 1,
                    "RE" => {
                        depth -= 1;
                        if depth < 0 {
                            return Err(at(".RE without .RS".into()));
                        }
                    }
                    "TP" => want_tag = true,
                    _ => {
                        rendered.push_str(&text(args).map_err(at)?);
                        rendered.push('\n');
                    }
                }
                continue;
            }
            if !th {
                return Err(at("text before .TH".into()));
            }
            want_tag = false;
            rendered.push_str(&text(line).map_err(at)?);
            rendered.push('\n');
        }
        if depth != 0 {
            return Err(".RS without .RE".into());
        }
        for want in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
            if !sections.iter().any(|s| s == want) {
                return Err(format!("no {want} section (has {sections:?})"));
            }
        }
        if !rendered.contains("cobbyd - ") {
            return Err("the NAME section is not `cobbyd \\- summary`".into());
        }
        Ok(rendered)
    }
}

#[test]
fn the_in_process_checkers_refuse_what_the_tools_refuse() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{shop=\"x\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 4.5\nh_count 2\n";
    exposition::check(good).unwrap();
    for bad in [
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3",
        "# HELP a_total A.\na_total 3\n",
        "# TYPE a_total counter\na_total 3\n",
        "# HELP a A.\n# TYPE a counter\na 3\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{shop=x} 3\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{shop=\"x\"} 3\na_total{shop=\"x\"} 4\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total{shop=\"a\\q\"} 3\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total three\n",
        "# HELP g G.\n# TYPE g gauge\ng 1\n# HELP f F.\n# TYPE f gauge\nf 1\ng{x=\"1\"} 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# HELP 1x X.\n# TYPE 1x gauge\n1x 1\n",
    ] {
        assert!(exposition::check(bad).is_err(), "accepted:\n{bad}");
    }
    let page = ".TH cobbyd 1 2026-01-01 \"cobbyd 0.1.0\"\n.SH NAME\ncobbyd \\- x\n.SH SYNOPSIS\n\\fBcobbyd\\fR\n.SH DESCRIPTION\nd\n.SH OPTIONS\n.TP\n\\fB\\-\\-config\\fR\nc\n.SH SUBCOMMANDS\n.TP\ncobbyd\\-run(1)\nr\n";
    roff::check(page).unwrap();
    for (from, to) in [
        (".TH cobbyd 1 2026-01-01", ".TH cobbyd 1"),
        (".SH OPTIONS", ".SH OPTION"),
        ("\\fBcobbyd\\fR", "\\fBcobbyd"),
        ("\\fBcobbyd\\fR", "\\qcobbyd"),
        (".TP\ncobbyd", ".TP\n.PP\ncobbyd"),
        (".SH NAME", ".XX\n.SH NAME"),
        ("\nd\n", "\n.RS\nd\n"),
    ] {
        let broken = page.replacen(from, to, 1);
        assert!(roff::check(&broken).is_err(), "accepted:\n{broken}");
    }
}

/// Runs `cobbyd demo --non-interactive` and returns its output and the
/// temporary directory it says it removed.
fn run_demo(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .arg("--non-interactive")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("Stopped the demo daemon and simulator; removed "))
        .unwrap_or_else(|| panic!("no removal line in\n{text}"))
        .trim_end_matches('.')
        .to_string();
    // It cleaned up after itself.
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    (text, dir)
}

#[test]
fn demo_runs_non_interactively_and_shows_a_finished_sync() {
    let (text, dir) = run_demo(&["--products", "800"]);
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
    // Nothing it prints to type points into the directory it deleted: only
    // the lines saying where the daemon ran (its own, and status's header)
    // and what was removed name it.
    for line in text.lines().filter(|l| l.contains(&dir)) {
        assert!(
            line.starts_with("  daemon    pid")
                || line.starts_with("Stopped the demo")
                || line.starts_with("cobbyd 0"),
            "points into the removed {dir}: {line}\n{text}"
        );
    }
    // The commands are this binary's path (cobbyd is not on PATH after
    // `cargo run`), and they work as printed.
    let me = std::fs::canonicalize(BIN).unwrap();
    let me = me.to_str().unwrap();
    let commands: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("$ ").or_else(|| l.strip_prefix("  ")))
        .filter(|l| l.contains(" demo") || l.contains("--help") || l.contains(" status"))
        .collect();
    assert!(commands.len() >= 4, "{text}");
    for c in &commands {
        assert!(c.starts_with(me), "not runnable as shown: {c}\n{text}");
        assert!(!c.starts_with("cobbyd "), "{c}");
    }
    let help = format!("{me} --help");
    assert!(commands.contains(&help.as_str()), "{text}");
    let ran = Command::new("sh").arg("-c").arg(&help).output().unwrap();
    assert!(ran.status.success(), "{help}: {}", stderr(&ran));
    // The sample products are a table of SKU, name and price, and say so.
    assert!(
        text.contains("products demo | head -5   (each line is a product's JSON as the shop answered; here only its SKU, name and price)"),
        "{text}"
    );
}

#[test]
fn magento1_demo_shows_prices_as_numbers() {
    let (text, _) = run_demo(&["--platform", "magento1", "--products", "300"]);
    assert!(
        text.contains("sync finished: 300 products fetched"),
        "{text}"
    );
    let after = text
        .split_once("products demo | head -5")
        .unwrap_or_else(|| panic!("{text}"))
        .1;
    let rows: Vec<&str> = after
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(rows.len(), 5, "{text}");
    for row in rows {
        let price = row.rsplit(' ').next().unwrap();
        assert!(!row.contains('"'), "a quoted price: {row}");
        let (units, cents) = price.split_once('.').unwrap_or_else(|| panic!("{row}"));
        assert!(
            units.chars().all(|c| c.is_ascii_digit()) && cents.len() == 2,
            "{row}"
        );
    }
}

#[test]
fn metrics_parse_as_the_text_format_and_match_status() {
    let sim = Sim::start(600);
    let d = Daemon::start("[sync]\npage_size = 100\n");
    d.add_synced_m2_shop("acme", &sim);
    let (code, metrics) = d.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    let samples = exposition::check(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    if let Some(promtool) = optional_tool("promtool") {
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
    }
    let exported = d.cli(&["products", "acme"]);
    let lines = stdout(&exported).lines().count();
    assert_eq!(lines, 600);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{metrics}"))
            .value
    };
    let acme = [("shop", "acme")];
    assert_eq!(
        value(
            "cobbyd_products_in_mirror",
            &[("shop", "acme"), ("store", "default")]
        ) as usize,
        lines
    );
    assert_eq!(
        value(
            "cobbyd_shop_health_state",
            &[("shop", "acme"), ("state", "healthy")]
        ),
        1.0
    );
    assert_eq!(
        value("cobbyd_products_created_total", &acme) as usize,
        lines
    );
    assert!(value("cobbyd_probe_duration_seconds_count", &acme) >= 1.0);
    assert!(
        value(
            "cobbyd_sync_duration_seconds_count",
            &[("shop", "acme"), ("kind", "sync")]
        ) >= 1.0
    );
    assert!(value("cobbyd_last_successful_sync_timestamp_seconds", &acme) > 1.0e9);
    assert!(
        value(
            "cobbyd_shop_requests_total",
            &[("shop", "acme"), ("outcome", "ok")]
        ) >= 6.0
    );
    assert!(value("cobbyd_queue_depth", &[]) >= 1.0);
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
    let page_text = stdout(&man);
    let mut texts = vec![roff::check(&page_text).unwrap_or_else(|e| panic!("{e}\n{page_text}"))];
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("cobbyd.1");
    std::fs::write(&page, &man.stdout).unwrap();
    if let Some(mandoc) = optional_tool("mandoc") {
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
        texts.push(stdout(&rendered));
    }
    for text in &texts {
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
        let text = stdout(&script);
        for sub in ["shop", "products", "check-config"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
        let path = dir.path().join(format!("cobbyd.{shell}"));
        std::fs::write(&path, &script.stdout).unwrap();
        // bash is part of every Debian system; zsh and fish are extras.
        let Some(exe) = optional_tool(shell) else {
            continue;
        };
        let res = Command::new(exe).args(&check).arg(&path).output().unwrap();
        assert!(res.status.success(), "{shell}: {}", stderr(&res));
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

/// What a newcomer reads first: the two commands, how to get `cobbyd` on
/// PATH before the first shop, and what a user without the package's
/// config must pass to every command.
#[test]
fn readme_gets_a_newcomer_to_a_first_shop() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let block = readme
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap()
        .0;
    let mut commands = block.lines().map(|l| l.split('#').next().unwrap().trim());
    assert_eq!(commands.next(), Some("cargo run --release -- demo"));
    assert_eq!(commands.next(), Some("cargo test --release"));
    let first_shop = readme.find("## Your first shop").unwrap();
    let install = readme.find("cargo install --path .").unwrap();
    assert!(
        install < first_shop,
        "`cargo install --path .` comes after the first shop"
    );
    let section = &readme[first_shop..];
    let section = &section[..section[3..].find("\n## ").unwrap()];
    for needed in [
        "--config",
        "--socket",
        "daemon.state_dir",
        "/etc/cobbyd/cobbyd.toml",
    ] {
        assert!(
            section.contains(needed),
            "the first-shop section lacks {needed}"
        );
    }
}

/// The help a newcomer reads: every option and argument described, the
/// global options apart, and none a command ignores.
#[test]
fn help_describes_every_argument_and_hides_ignored_globals() {
    let help = |args: &[&str]| -> String {
        let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    // The line after an argument's name (or the rest of its line) says
    // what it is.
    let described = |text: &str, arg: &str| -> bool {
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if let Some(rest) = l.trim_start().strip_prefix(arg) {
                return !rest.trim().is_empty()
                    || lines.next().is_some_and(|n| {
                        let n = n.trim();
                        !n.is_empty() && !n.starts_with('-') && !n.starts_with('<')
                    });
            }
        }
        false
    };
    let add = help(&["shop", "add"]);
    assert!(described(&add, "--platform <PLATFORM>"), "{add}");
    assert!(add.contains("magento1") && add.contains("XML-RPC"), "{add}");
    for cmd in [
        &["sync"][..],
        &["products"],
        &["shop", "rotate"],
        &["shop", "remove"],
        &["shop", "show"],
        &["shop", "test"],
        &["shop", "purge"],
        &["shop", "add"],
    ] {
        let text = help(cmd);
        assert!(
            described(&text, "<NAME>"),
            "{cmd:?}: <NAME> undescribed:\n{text}"
        );
    }
    for cmd in [&["simulate"][..], &["demo"]] {
        let text = help(cmd);
        assert!(
            !text.contains("--config") && !text.contains("--socket"),
            "{cmd:?} lists options it ignores:\n{text}"
        );
    }
    for cmd in [&["status"][..], &["shop", "list"], &["products"]] {
        let text = help(cmd);
        let (own, global) = text
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("{cmd:?}: no global options heading:\n{text}"));
        assert!(
            !own.contains("--config") && !own.contains("--socket"),
            "{text}"
        );
        assert!(
            global.contains("--config") && global.contains("--socket"),
            "{text}"
        );
    }
    let run = help(&["run"]);
    assert!(
        !run.contains("--socket") && run.contains("--config"),
        "{run}"
    );
    // Ignored, but still accepted: scripts that pass them everywhere work.
    let out = Command::new(BIN)
        .args([
            "completions",
            "bash",
            "--config",
            "/nonexistent",
            "--socket",
            "/x",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `shop list`, `shop show` and `status` as people read them: a header,
/// aligned columns however long a URL, no auth mode for Magento 1, one
/// line about plain http.
#[test]
fn listings_are_aligned_and_say_each_thing_once() {
    let d = Daemon::start("");
    let long = format!("http://127.0.0.1:9/{}", "a-very-long-shop-path/".repeat(4));
    let sim = Sim::start(50);
    for (name, platform, url, creds) in [
        ("m1", "magento1", sim.url(), sim.credentials().m1_toml()),
        (
            "m2-with-a-long-name",
            "magento2",
            long.clone(),
            sim.credentials().m2_oauth_toml(),
        ),
    ] {
        let out = d.add_shop(name, platform, &url, &creds, &["--no-verify"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let list = stdout(&d.cli(&["shop", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("NAME "), "no header:\n{list}");
    for col in ["PLATFORM", "AUTH", "STORES", "URL"] {
        let at = lines[0].find(col).unwrap();
        for row in &lines[1..] {
            let before = &row[..at];
            assert!(
                before.ends_with("  ") && !row[at..].starts_with(' '),
                "column {col} misaligned:\n{list}"
            );
        }
    }
    let m1 = lines.iter().find(|l| l.starts_with("m1 ")).unwrap();
    let auth_at = lines[0].find("AUTH").unwrap();
    assert!(
        m1[auth_at..].starts_with("- "),
        "auth shown for Magento 1:\n{list}"
    );
    assert!(!m1.contains("oauth"), "{list}");

    let show = stdout(&d.cli(&["shop", "show", "m1"]));
    let fields: Vec<&str> = show.lines().take_while(|l| !l.is_empty()).collect();
    let value_at = |l: &str| {
        l.find(' ')
            .map(|i| i + l[i..].len() - l[i..].trim_start().len())
    };
    let first = value_at(fields[0]);
    for l in &fields {
        assert_eq!(value_at(l), first, "key column misaligned:\n{show}");
    }
    assert_eq!(
        show.lines().filter(|l| l.contains("insecure")).count(),
        1,
        "{show}"
    );
    assert!(
        fields
            .iter()
            .any(|l| l.starts_with("auth") && l.trim_end().ends_with(" -")),
        "{show}"
    );
    assert!(!show.contains("oauth"), "{show}");

    let status = stdout(&d.cli(&["status"]));
    let plain: Vec<&str> = status
        .lines()
        .filter(|l| l.contains("plain http"))
        .collect();
    assert_eq!(plain.len(), 1, "{status}");
    assert!(plain[0].contains("m1, m2-with-a-long-name"), "{status}");
}

/// Products kept by `shop remove` without `--purge` stay reachable: listed,
/// exported, and dropped on request, the way removal drops them.
#[test]
fn retained_mirrors_are_listed_exported_and_purged() {
    let sim = Sim::start(300);
    let mut d = Daemon::start("");
    for name in ["w5", "w6"] {
        d.add_synced_m2_shop(name, &sim);
        let out = d.cli(&["shop", "remove", name]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("cobbyd shop purge {name}")),
            "{}",
            stdout(&out)
        );
    }
    let listed = d.cli(&["shop", "list", "--retained"]);
    let text = stdout(&listed);
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    assert!(text.starts_with("NAME "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["w5", "default", "300"]),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&d.cli(&["shop", "list", "--retained", "--json"]))).unwrap();
    assert_eq!(v["retained"].as_array().unwrap().len(), 2, "{v:#}");
    // Registered shops are not in it, nor are kept mirrors in `shop list`.
    assert!(stdout(&d.cli(&["shop", "list"])).contains("No shops registered"));

    let export = d.cli(&["products", "w5"]);
    assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
    assert_eq!(stdout(&export).lines().count(), 300);
    let csv = d.cli(&["products", "w5", "--format", "csv"]);
    assert_eq!(csv.status.code(), Some(0), "{}", stderr(&csv));
    assert_eq!(
        csv::Reader::from_reader(&csv.stdout[..]).records().count(),
        300
    );

    let again = d.cli(&["shop", "remove", "w5"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("cobbyd shop purge w5"),
        "{}",
        stderr(&again)
    );

    let purge = d.cli(&["shop", "purge", "w5"]);
    assert_eq!(purge.status.code(), Some(0), "{}", stderr(&purge));
    // `shop remove --purge` on a kept mirror purges it too.
    let purge = d.cli(&["shop", "remove", "w6", "--purge"]);
    assert_eq!(purge.status.code(), Some(0), "{}", stderr(&purge));
    assert!(
        stdout(&purge).contains("kept products are now dropped"),
        "{}",
        stdout(&purge)
    );
    assert!(stdout(&d.cli(&["shop", "list", "--retained"])).contains("No kept mirrors"));
    let gone = d.cli(&["products", "w5"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(stdout(&gone).is_empty());
    let twice = d.cli(&["shop", "purge", "w5"]);
    assert_eq!(twice.status.code(), Some(1));
    assert!(
        stderr(&twice).contains("shop list --retained"),
        "{}",
        stderr(&twice)
    );

    // A registered shop is removed with `shop remove --purge`, not purged.
    d.add_synced_m2_shop("live", &sim);
    let refused = d.cli(&["shop", "purge", "live"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("shop remove live --purge"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(stdout(&d.cli(&["products", "live"])).lines().count(), 300);

    // Nothing of the purged mirrors is left for the checker to find.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit().success());
    let check = d.cli(&["check-state", "--json"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}{}",
        stdout(&check),
        stderr(&check)
    );
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let text = v.to_string();
    assert!(
        !text.contains("\"w5\"") && !text.contains("\"w6\""),
        "{v:#}"
    );
}

/// The mistakes of a first hour get messages that say what to do.
#[test]
fn first_mistakes_get_messages_that_fit() {
    let sim = Sim::start(50);
    let d = Daemon::start("");
    let c = sim.credentials();
    // A URL without its scheme.
    let bare = sim.url().trim_start_matches("http://").to_string();
    let out = d.add_shop("a", "magento2", &bare, &c.m2_oauth_toml(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("e.g. https://{bare}")),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("relative URL"), "{}", stderr(&out));
    // The admin panel's URL.
    for (platform, path, creds) in [
        ("magento2", "/admin", c.m2_oauth_toml()),
        ("magento1", "/index.php/admin", c.m1_toml()),
    ] {
        let out = d.add_shop("a", platform, &format!("{}{path}", sim.url()), &creds, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("without /admin ({})", sim.url())),
            "{platform}: {err}"
        );
    }
    // A failed `shop add` is not told to rotate; nor is a failed rotate.
    let wrong = c
        .m2_oauth_toml()
        .replace(&c.consumer_key, "wrongconsumerkey0000");
    let out = d.add_shop("a", "magento2", &sim.url(), &wrong, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing was saved"), "{err}");
    assert!(!err.contains("shop rotate"), "{err}");
    assert!(err.contains("`cobbyd shop add` again"), "{err}");
    d.add_synced_m2_shop("acme", &sim);
    let out = d.cli_stdin(
        &["shop", "rotate", "acme", "--credentials-file", "-"],
        Some(&wrong),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("shop rotate"), "{err}");
    assert!(err.contains("old credentials stay in use"), "{err}");

    // A malformed credentials file: its name and line, said once.
    let file = d.dir.path().join("m1.toml");
    std::fs::write(&file, "api_user = \"cobby\"\napi_key: \"abc\"\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = d.cli(&[
        "shop",
        "add",
        "b",
        "--platform",
        "magento1",
        "--url",
        &sim.url(),
        "--allow-insecure-http",
        "--credentials-file",
        file.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "credentials file {}: line 2, column",
            file.display()
        )),
        "{err}"
    );
    assert!(!err.contains("credentials: credentials"), "{err}");
    std::fs::write(&file, "api_user = \"cobby\"\napi_key = \"abc \"\n").unwrap();
    let out = d.cli(&[
        "shop",
        "add",
        "b",
        "--platform",
        "magento1",
        "--url",
        &sim.url(),
        "--allow-insecure-http",
        "--credentials-file",
        file.to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains(&format!(
            "credentials file {}, line 2: api_key: has leading",
            file.display()
        )),
        "{}",
        stderr(&out)
    );

    // check-config names every problem, with its line.
    let cfg = d.dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[probe]\ninterval = \"soon\"\n[sync]\npage_size = 0\npage_sise = 100\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (line, key, n) in [
        (lines[0], "probe.interval", 2),
        (lines[1], "sync.page_size", 4),
        (lines[2], "sync.page_sise", 5),
    ] {
        assert!(
            line.starts_with(&format!("{}: {key}: ", cfg.display()))
                && line.ends_with(&format!("(line {n})")),
            "{err}"
        );
    }
    assert!(lines[2].contains("did you mean `page_size`?"), "{err}");
}

/// Runs the binary as user nobody (group nogroup, no others).
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(BIN)
        .args(args)
        .env_remove("COBBYD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A daemon started by a user who may not write the default places says
/// which keys to set and that a config of one's own is the way.
#[test]
fn a_daemon_without_its_directories_names_the_keys_and_config() {
    if !crate::security::is_root("a_daemon_without_its_directories_names_the_keys_and_config") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let write = |name: &str, state: &std::path::Path, socket: &std::path::Path| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n",
                state.display(),
                socket.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let cfg = write("state.toml", &closed.join("state"), &open.join("s.sock"));
    let out = as_nobody(&["run", "--config", cfg.to_str().unwrap()]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("daemon.state_dir") && err.contains("--config"),
        "{err}"
    );
    let cfg = write("socket.toml", &open.join("state"), &closed.join("s.sock"));
    let out = as_nobody(&["run", "--config", cfg.to_str().unwrap()]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("daemon.socket") && err.contains("--config"),
        "{err}"
    );
    // No config at all: the defaults are root's places.
    if !std::path::Path::new("/etc/cobbyd/cobbyd.toml").exists()
        && !std::fs::metadata("/var/lib/cobbyd").is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
    {
        let out = as_nobody(&["run"]);
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains("daemon.state_dir") && err.contains("--config"),
            "{err}"
        );
    }
}

/// A socket left with group root (its group does not exist) never gets
/// the advice to join root; the group to create is named.
#[test]
fn a_refused_client_is_never_told_to_join_root() {
    if !crate::security::is_root("a_refused_client_is_never_told_to_join_root") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // The harness's socket_group does not exist: the socket keeps root's.
    let d = Daemon::start("");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = as_nobody(&["status", "--socket", d.socket.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(!err.contains("-aG root"), "{err}");
    assert!(
        err.contains("daemon.socket_group") && err.contains("groupadd"),
        "{err}"
    );
    assert!(
        d.log()
            .contains("groupadd --system cobbyd-test-no-such-group"),
        "{}",
        d.log()
    );
}
